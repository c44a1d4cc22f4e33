"""Shared fixtures: the real data in ../shared/data and small simulated plates."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CPVS_SHARED", REPO.parent / "shared")) / "data"
PEDIATRIC = SHARED / "fields" / "pediatric_BR00143976_C03_f03"
JUMP_PARTIAL = SHARED / "fields" / "jump_BR00117006_A01_f01_partial"
JUMP_BF = SHARED / "fields" / "jump_BR00116991_A01_f01_brightfield"
PEDIATRIC_MAP = "1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA"


def pytest_collection_modifyitems(config, items):
    if not SHARED.exists():
        raise pytest.UsageError(f"the real-data fixtures are missing: {SHARED} (set CPVS_SHARED to the shared folder)")


@pytest.fixture(scope="session")
def pediatric() -> Path:
    return PEDIATRIC


@pytest.fixture
def pediatric_copy(tmp_path) -> Path:
    """A writable copy of the real pediatric field."""
    dst = tmp_path / "pediatric"
    shutil.copytree(PEDIATRIC, dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


@pytest.fixture(scope="session")
def sim_root(tmp_path_factory) -> Path:
    """Two small simulated plates (6 wells x 2 sites of 160² px), made once per session."""
    from cpvs.simulate import simulate

    root = tmp_path_factory.mktemp("sim")
    simulate(root, plates=2, wells=6, sites=2, size=160, seed=3, moas=2)
    return root


@pytest.fixture
def sim_plate(sim_root, tmp_path) -> Path:
    """A writable copy of the first simulated plate."""
    dst = tmp_path / "plate"
    shutil.copytree(sim_root / "SIM3-P01", dst)
    return dst
