"""Virtual staining I: models, training, resume, cWGAN-GP, and the plate runner."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.errors import CpvsError
from cpvs.models import build_model, n_parameters
from cpvs.models.critic import PatchCritic, gradient_penalty
from cpvs.plate import discover_plate, read_image, write_image
from cpvs.plate.shards import Shard
from cpvs.predict.runner import PredictConfig, predict_plate
from cpvs.preprocess.illumination import illumination_function
from cpvs.preprocess.normalize import zscore
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.preprocess.store import Store
from cpvs.checkpoints import load_checkpoint, save_checkpoint
from cpvs.train.staining import StainingConfig, train_staining
from conftest import TINY_UNET

runner = CliRunner()


def test_published_unet_has_about_31m_parameters():
    assert 30.5e6 < n_parameters(build_model("unet", {"in_channels": 3, "out_channels": 5})) < 31.5e6
    one_plane = build_model("unet", {"in_channels": 1, "out_channels": 3, "depth": 3, "width": 4})
    assert one_plane(torch.zeros(2, 1, 64, 64)).shape == (2, 3, 64, 64)


def test_training_writes_metrics_and_self_describing_checkpoints(tiny_unet, sim_store):
    metrics = pd.read_parquet(tiny_unet / "metrics.parquet")
    assert list(metrics["epoch"]) == [1, 2]
    for col in ("train_l1", "val_l1", "pcc", "ssim", "pcc_DNA", "ssim_Mito", "psnr_ER", "mae_AGP", "mse_RNA"):
        assert col in metrics.columns and metrics[col].notna().all()
    ck = load_checkpoint(tiny_unet)
    assert ck["family"] == "unet" and ck["inputs"] == ["BF_low", "BF", "BF_high"]
    assert ck["outputs"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert ck["normalization"]["illum_size"] == 249 and set(ck["normalization"]["channel_stats"]) >= set(ck["outputs"])
    assert ck["data"]["split"] == "fields" and ck["cpvs_version"]
    last = torch.load(tiny_unet / "checkpoints" / "last.pt", weights_only=True)
    assert "optimizer" in last["state"] and last["train"]["epoch"] == 2


def _weights(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)["state_dict"]


def test_resume_continues_exactly_and_seeds_reproduce(sim_store, tmp_path):
    full = dict(TINY_UNET, epochs=3)
    train_staining(StainingConfig("unet", sim_store, tmp_path / "a", device="cpu", **full))
    train_staining(StainingConfig("unet", sim_store, tmp_path / "b", device="cpu", **dict(full, epochs=1)))
    train_staining(StainingConfig("unet", sim_store, tmp_path / "b", device="cpu", resume=True, **full))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (pd.read_parquet(p / "metrics.parquet").drop(columns="seconds") for p in (tmp_path / "a", tmp_path / "b"))
    pd.testing.assert_frame_equal(ma, mb)
    with pytest.raises(CpvsError, match="already holds a training run"):
        train_staining(StainingConfig("unet", sim_store, tmp_path / "a", device="cpu", **full))
    with pytest.raises(CpvsError, match="different settings .*lr"):
        train_staining(StainingConfig("unet", sim_store, tmp_path / "a", device="cpu", resume=True, **dict(full, lr=1e-3)))


def test_gradient_penalty_matches_hand_computation():
    torch.manual_seed(0)
    cond, real, fake = torch.randn(3, 2, 8, 8), torch.randn(3, 5, 8, 8), torch.randn(3, 5, 8, 8)

    class Linear(torch.nn.Module):  # D(x, y) = <w, y>: the gradient is w everywhere
        def __init__(self):
            super().__init__()
            self.w = torch.randn(5, 8, 8)

        def forward(self, c, y):
            return (y * self.w).flatten(1).sum(1)

    lin = Linear()
    assert float(gradient_penalty(lin, cond, real, fake).detach()) == pytest.approx((lin.w.norm() - 1).item() ** 2, rel=1e-5)

    class Quadratic(torch.nn.Module):  # D(x, y) = ½‖y‖²: the gradient is the interpolate itself
        def forward(self, c, y):
            return 0.5 * (y**2).flatten(1).sum(1)

    gen = torch.Generator().manual_seed(7)
    gp = gradient_penalty(Quadratic(), cond, real, fake, generator=gen)
    eps = torch.rand(3, 1, 1, 1, generator=torch.Generator().manual_seed(7))
    mixed = eps * real + (1 - eps) * fake
    expected = ((mixed.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert float(gp.detach()) == pytest.approx(float(expected), rel=1e-5)


def test_patch_critic_scores_patches():
    c = PatchCritic(8)
    assert c.patch_scores(torch.zeros(2, 3, 64, 64), torch.zeros(2, 5, 64, 64)).shape == (2, 1, 8, 8)


def test_cwgan_starts_from_a_unet_and_logs_both_losses(sim_store, tiny_unet, tmp_path):
    res = train_staining(StainingConfig("cwgan", sim_store, tmp_path / "gan", device="cpu", init=tiny_unet, crop=64,
                                        epochs=2, steps_per_epoch=2, batch_size=2, critic_steps=2, workers=1))
    m = res.metrics
    for col in ("loss_critic", "loss_generator", "gradient_penalty", "wasserstein", "train_l1"):
        assert m[col].notna().all()
    assert list(m["lambda_e"]) == [1.0, 0.5]  # λe = 1/epoch
    ck = load_checkpoint(tmp_path / "gan")
    assert ck["family"] == "cwgan" and ck["hparams"] == load_checkpoint(tiny_unet)["hparams"]
    with pytest.raises(CpvsError, match="--init"):
        train_staining(StainingConfig("cwgan", sim_store, tmp_path / "gan2", device="cpu"))


def test_linear_baseline_recovers_a_linear_relation(tmp_path):
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for site in (1, 2):
        bf = ndimage.gaussian_filter(rng.normal(size=(128, 128)), 3) * 3000 + 20000
        write_image(tmp_path / "plate" / f"r01c01f{site:02d}p01-ch8sk1fk1fl1.tiff", bf.astype(np.uint16))
        write_image(tmp_path / "plate" / f"r01c01f{site:02d}p01-ch5sk1fk1fl1.tiff", (0.05 * bf - 500).astype(np.uint16))
    plate = discover_plate(tmp_path / "plate", channels=["DNA", "BF"])
    preprocess_plates([plate], tmp_path / "s.zarr", illum_size=0, clip_z=0)
    res = train_staining(StainingConfig("linear", tmp_path / "s.zarr", tmp_path / "lin", device="cpu", crop=32, val_fraction=0.25))
    w = load_checkpoint(tmp_path / "lin")["state_dict"]
    assert float(w["conv.weight"].squeeze()) == pytest.approx(1.0, abs=0.01)  # z-scores of an affine pair are equal
    assert res.best["pcc"] > 0.99


def _identity_checkpoint(store_path, tmp_path):
    """A BF -> DNA 'model' that returns its (normalized) input: the plate runner must then
    write exactly the preprocessed brightfield, rescaled to DNA intensities."""
    store = Store(store_path)
    model = build_model("linear", {"in_channels": 1, "out_channels": 1})
    with torch.no_grad():
        model.conv.weight.fill_(1.0)
        model.conv.bias.zero_()
    return save_checkpoint(tmp_path / "identity.pt", family="linear", hparams={"in_channels": 1, "out_channels": 1},
                           inputs=["BF"], outputs=["DNA"], normalization=store.normalization(["BF", "DNA"]),
                           state_dict=model.state_dict())


def test_plate_runner_applies_the_checkpoint_preprocessing_exactly(sim_root, sim_store, tmp_path):
    ck = _identity_checkpoint(sim_store, tmp_path)
    plate_dir = sim_root / "SIM3-P02"
    res = predict_plate(PredictConfig(plate_dir, tmp_path / "pred", ck, tile=64, stride=32, batch_size=5, device="cpu",
                                      dtype="float32", illum_fields=4))
    assert res.n_written == 12
    plate = discover_plate(plate_dir, channels=["BF"])
    picks = plate.fields[:: -(-len(plate.fields) // 4)]
    illum = illumination_function(np.mean([read_image(f.files["BF"]).astype(np.float64) for f in picks], axis=0), 249)
    stats = load_checkpoint(ck)["normalization"]["channel_stats"]["DNA"]
    pred_plate = discover_plate(tmp_path / "pred")
    for f, p in zip(plate.fields, pred_plate.fields):
        z, _, _ = zscore(read_image(f.files["BF"]).astype(np.float32) / illum)
        expected = np.clip(z, -15, 15) * np.float32(stats["std"]) + np.float32(stats["mean"])
        np.testing.assert_allclose(read_image(p.files["DNA"]), expected, rtol=1e-5, atol=1e-3)


def _tiffs(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tiff"))}


@pytest.mark.slow
def test_predict_plate_resume_shards_and_evaluate(sim_root, tiny_unet, tmp_path):
    plate_dir = sim_root / "SIM3-P01"
    base = dict(tile=64, stride=32, batch_size=6, device="cpu")
    full = predict_plate(PredictConfig(plate_dir, tmp_path / "full", tiny_unet, **base))
    ref = _tiffs(tmp_path / "full")
    assert full.n_written == 12 and len(ref) == 12 * 5
    assert read_image(next((tmp_path / "full").glob("*.tiff"))).shape == (160, 160)
    pred_plate = discover_plate(tmp_path / "full")
    assert pred_plate.channels == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert "Metadata_MOA" in pred_plate.table().columns

    # Killed mid-plate, then rerun: the same files as an uninterrupted run.
    class Killed(Exception):
        pass

    def kill_after_4(stage, done, total, info=""):
        if done == 4:
            raise Killed

    with pytest.raises(Killed):
        predict_plate(PredictConfig(plate_dir, tmp_path / "killed", tiny_unet, **base), progress=kill_after_4)
    partial = _tiffs(tmp_path / "killed")
    assert 0 < len(partial) < len(ref)
    (tmp_path / "killed" / ".tmp-half.tiff.x").write_bytes(b"half")  # debris of a killed write is ignored
    again = predict_plate(PredictConfig(plate_dir, tmp_path / "killed", tiny_unet, **base))
    assert again.n_resumed >= 4 and _tiffs(tmp_path / "killed") == ref

    # Three shards together equal the unsharded run.
    for i in (1, 2, 3):
        predict_plate(PredictConfig(plate_dir, tmp_path / "sharded", tiny_unet, shard=(i, 3), **base))
    assert _tiffs(tmp_path / "sharded") == ref
    assert len(list((tmp_path / "sharded").glob("cpvs-run.shard-*-of-3.json"))) == 3

    r = runner.invoke(app, ["evaluate", "--images", "--pred", str(tmp_path / "full"), "--truth", str(plate_dir),
                            "-o", str(tmp_path / "eval")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    per_field = pd.read_parquet(tmp_path / "eval" / "image_metrics_per_field.parquet")
    assert len(per_field) == 12 * 5 and per_field["ssim"].between(-1, 1).all()
    import json

    summary = json.loads((tmp_path / "eval" / "results.json").read_text())["images"]
    assert summary["n_fields"] == 12 and summary["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    r = runner.invoke(app, ["evaluate", "--images", "--pred", str(tmp_path / "full"), "--truth", str(plate_dir),
                            "--report", str(tmp_path / "rep")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "brightfield, ground truth, prediction" in page and page.count("data:image/png;base64") == 3


def test_shards_are_disjoint_and_cover_the_plate(sim_root):
    fields = discover_plate(sim_root / "SIM3-P01").fields
    parts = [Shard(i, 4).select(fields) for i in range(1, 5)]
    keys = [f.key for p in parts for f in p]
    assert sorted(keys) == sorted(f.key for f in fields) and len(set(keys)) == len(keys)
    assert Shard.parse("2/3") == (2, 3) and str(Shard.parse("2/3")) == "2/3" and Shard.parse(None).whole
    for bad in ("0/3", "4/3", "x", "1-3"):
        with pytest.raises(CpvsError):
            Shard.parse(bad)


def test_predict_errors_are_clear(sim_root, tiny_unet, tmp_path):
    def run(*args):
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})

    plate = sim_root / "SIM3-P01"
    r = run("predict-plate", plate, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--checkpoint is required" in r.output
    r = run("predict-plate", plate, "-o", tmp_path / "o", "--checkpoint", tmp_path / "missing.pt")
    assert r.exit_code == 2 and "missing.pt" in r.output
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = run("predict-plate", plate, "-o", tmp_path / "o", "--checkpoint", bad)
    assert r.exit_code == 2 and "not a cpvs checkpoint" in r.output and "bad.pt" in r.output and "weights_only" not in r.output
    r = run("predict-plate", plate, "-o", tmp_path / "o", "--checkpoint", tiny_unet, "--model", "cwgan")
    assert r.exit_code == 2 and "checkpoint is a unet model" in r.output
    r = run("predict-plate", plate, "-o", tmp_path / "o", "--checkpoint", tiny_unet, "--steps", "5", "--samples", "2")
    assert r.exit_code == 2 and "--steps, --samples only apply to diffusion checkpoints" in r.output
    r = run("predict-plate", plate, "-o", tmp_path / "o", "--checkpoint", tiny_unet, "--shard", "5/3")
    assert r.exit_code == 2 and "--shard" in r.output
    r = run("predict-plate", plate, "-o", tmp_path / "o", "--checkpoint", tiny_unet, "--tile", "66")
    assert r.exit_code == 2 and "multiple of 4" in r.output
    pediatric_like = tmp_path / "one_plane"
    shutil.copytree(plate, pediatric_like)
    for p in pediatric_like.glob("*ch7sk1*"):
        p.unlink()
    r = run("predict-plate", pediatric_like, "-o", tmp_path / "o", "--checkpoint", tiny_unet)
    assert r.exit_code == 2 and "BF_low" in r.output


def test_train_cli_runs_and_reports(sim_store, tmp_path):
    r = runner.invoke(app, ["--device", "cpu", "train", "--model", "unet", "--data", str(sim_store), "-o", str(tmp_path / "r"),
                            "--crop", "64", "--depth", "3", "--width", "4", "--epochs", "1", "--steps-per-epoch", "2",
                            "--batch-size", "2"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert "best epoch 1 by pcc" in r.output
    r = runner.invoke(app, ["train", "--model", "cwgan", "--data", str(sim_store), "-o", str(tmp_path / "g")])
    assert r.exit_code == 2 and "--init" in r.output


@pytest.mark.slow
def test_ddp_training_under_torchrun_on_cpu(sim_store, tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "cpvs",
           "--device", "cpu", "--quiet", "train", "--model", "unet", "--data", str(sim_store), "-o", str(tmp_path / "ddp"),
           "--crop", "64", "--depth", "3", "--width", "4", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "2",
           "--workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(pd.read_parquet(tmp_path / "ddp" / "metrics.parquet")["epoch"]) == [1, 2]
    assert load_checkpoint(tmp_path / "ddp")["family"] == "unet"


def test_predicted_plate_keeps_the_source_plate_name(sim_root, tiny_unet, tmp_path):
    predict_plate(PredictConfig(sim_root / "SIM3-P01", tmp_path / "anything", tiny_unet, tile=64, stride=32, device="cpu",
                                shard=(1, 6)))
    assert discover_plate(tmp_path / "anything").name == "SIM3-P01"
