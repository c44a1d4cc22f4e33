"""FID, and the self-contained HTML report."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.evaluate.fid import frechet_distance, load_feature_network, stats_of
from conftest import SHARED

runner = CliRunner()
BBBC021 = SHARED / "bbbc021" / "BBBC021_per_well_feature_selected_mad_robustize.csv"


def test_frechet_distance_matches_the_eigenvalue_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6))
    b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 1
    mu1, s1 = stats_of(a)
    mu2, s2 = stats_of(b)
    eig = np.linalg.eigvals(s1 @ s2)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig.real.clip(0)))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


@pytest.mark.slow
def test_fid_network_loads_from_a_local_torchvision_inception_file(tmp_path):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=True).state_dict(), path)
    net = load_feature_network(path)
    feats = net.embed(np.random.default_rng(0).random((3, 120, 100)).astype(np.float32), "DNA")
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()


def test_unknown_network_files_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(3)}, path)
    r = runner.invoke(app, ["evaluate", "--fid", "--pred", str(tmp_path), "--truth", str(tmp_path), "--fid-network", str(path)])
    assert r.exit_code == 2
    from cpvs.errors import CpvsError

    with pytest.raises(CpvsError, match="unrecognized network file"):
        load_feature_network(path)


def test_report_is_self_contained_html(tmp_path):
    r = runner.invoke(app, ["evaluate", str(BBBC021), "--nsc", "--nscb", "--active", "--derive",
                            r"Metadata_Batch=Metadata_Plate:^(Week\d+)", "--report", str(tmp_path / "rep")],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "MOA matching (NSC / NSCB)" in page and "NSCB confusion pairs" in page and "Active subset" in page and "Profiles in two dimensions" in page
    assert len(re.findall(r'src="data:image/png;base64,', page)) >= 3
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from a network


def test_image_grid_names_channels_over_the_stains_not_over_the_lone_brightfield():
    from cpvs.evaluate.figures import image_grid

    img = np.random.default_rng(0).random((16, 16))
    rows = [("brightfield (BF)", [img, None, None]), ("ground truth", [img] * 3), ("prediction", [img] * 3)]
    fig = image_grid(rows, ["DNA", "ER", "RNA"], "P1 A01 site 1")
    axes = np.array(fig.axes).reshape(3, 3)
    assert [ax.get_title() for ax in axes[1]] == ["DNA", "ER", "RNA"]
    assert axes[0][0].get_title() == "" and axes[0][0].get_ylabel() == "brightfield (BF)"
    assert not axes[0][1].axison and not axes[0][2].axison
