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


@pytest.fixture(scope="session")
def sim_store(sim_root, tmp_path_factory) -> Path:
    """Both simulated plates preprocessed into one store."""
    from cpvs.plate import discover_plates
    from cpvs.preprocess.pipeline import preprocess_plates

    plates = [p for d in sorted(sim_root.glob("SIM3-P*")) for p in discover_plates(d)]
    out = tmp_path_factory.mktemp("store") / "sim.zarr"
    preprocess_plates(plates, out, workers=2)
    return out


TINY_UNET = dict(crop=64, depth=3, width=4, epochs=2, steps_per_epoch=3, batch_size=2, workers=1)


@pytest.fixture(scope="session")
def tiny_unet(sim_store, tmp_path_factory) -> Path:
    """A U-Net run folder trained for a few steps (enough to exercise every path, not to be good)."""
    from cpvs.train.staining import StainingConfig, train_staining

    run = tmp_path_factory.mktemp("runs") / "unet"
    train_staining(StainingConfig("unet", sim_store, run, device="cpu", **TINY_UNET))
    return run
