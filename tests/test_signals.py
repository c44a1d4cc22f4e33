"""SIGINT and SIGTERM, to the main process alone or to its whole process group, stop every long
command within 10 s with exit code 130 / 143, leave no process behind and release the output.

Each command runs as a user would start it (`python -m cpvs …` in its own session); the signal is
sent once the command holds its output lock, i.e. while it works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
SIGNALS = [("INT", signal.SIGINT, 130), ("TERM", signal.SIGTERM, 143)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A 96-field plate of 512² fields, its store, a tiny U-Net and a tiny DINO checkpoint."""
    from cpvs.plate import discover_plates
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.simulate import simulate
    from cpvs.train.dino import DinoConfig, train_dino
    from cpvs.train.multicrop import CropSpec
    from cpvs.train.staining import StainingConfig, train_staining

    root = tmp_path_factory.mktemp("signals")
    sim = simulate(root / "plates", plates=1, wells=48, sites=2, size=512, seed=5, moas=2, workers=2, masks=False)
    plate = sim.plates[0]
    store = root / "s.zarr"
    preprocess_plates(discover_plates(plate), store, size=(448, 448))
    train_staining(StainingConfig("unet", store, root / "unet", crop=64, depth=3, width=4, epochs=1, steps_per_epoch=1,
                                  batch_size=2, device="cpu", workers=1))
    train_dino(DinoConfig("dino", store, root / "dino", channels=["DNA"], arch="vit_tiny_patch16_224", out_dim=64, hidden=32,
                          bottleneck=16, crops=CropSpec(2, 32, (0.1, 0.2), 2, 16, (0.04, 0.08)), batch_size=2, epochs=1,
                          steps_per_epoch=1, device="cpu"))
    return {"root": root, "plate": plate, "store": store}


def commands(d: dict, out: Path) -> dict[str, tuple[list[str], Path]]:
    """Each long command, and the folder whose lock says it is working."""
    p, s, r = str(d["plate"]), str(d["store"]), d["root"]
    return {
        "simulate": (["simulate", "-o", str(out), "--plates", "1", "--wells", "96", "--sites", "4", "--size", "512",
                      "--workers", "2"], out),
        "preprocess": (["preprocess", p, "-o", str(out), "--workers", "2"], out),
        "train": (["train", "--model", "unet", "--data", s, "-o", str(out), "--crop", "64", "--depth", "3", "--width", "8",
                   "--epochs", "100", "--steps-per-epoch", "50", "--batch-size", "4"], out),
        "predict-plate": (["predict-plate", p, "--checkpoint", str(r / "unet"), "-o", str(out), "--workers", "1"], out),
        "profile": (["profile", p, "-o", str(out), "--workers", "2"], out),
        "embed": (["embed", s, "--checkpoint", str(r / "dino"), "-o", str(out / "emb.parquet")], out),
        "evaluate": (["evaluate", "--images", "--pred", p, "--truth", p, "-o", str(out), "--workers", "1"], out),
    }


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def _wait_working(proc: subprocess.Popen, folder: Path, timeout: float = 90) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"finished before the signal (exit {proc.returncode}): {proc.stderr.read()}")
        if folder.exists() and any(folder.glob(".cpvs-lock*")):
            time.sleep(1.0)  # well inside the work
            return
        time.sleep(0.1)
    raise AssertionError("the command never started working")


@pytest.mark.parametrize("target", ["main", "group"])
@pytest.mark.parametrize("name, signum, code", SIGNALS, ids=[s[0] for s in SIGNALS])
@pytest.mark.parametrize("command", ["simulate", "preprocess", "train", "predict-plate", "profile", "embed", "evaluate"])
def test_signal_stops_the_command_cleanly(data, tmp_path, command, name, signum, code, target):
    args, folder = commands(data, tmp_path / "out")[command]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "cpvs", "--quiet", "--device", "cpu", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _wait_working(proc, folder)
        sent = time.time()
        if target == "group":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        proc.wait(timeout=30)
        took = time.time() - sent
        err = proc.stderr.read()
        assert proc.returncode == code, err
        assert took < 10, f"took {took:.1f} s"
        assert "Traceback" not in err and "rerun the same command to resume" in err
        deadline = time.time() + 5
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert _group_alive(proc.pid) == [], "processes left behind"
        assert not list(folder.glob(".cpvs-lock*")), "the output lock was not released"
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_timeout_int_on_profile_returns_and_leaves_no_process(data, tmp_path):
    """The reported case: `timeout -s INT … cpvs profile … --workers 2` hung forever."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.time()
    proc = subprocess.run(["timeout", "-s", "INT", "12", sys.executable, "-m", "cpvs", "--quiet", "profile", str(data["plate"]),
                           "-o", str(tmp_path / "prof"), "--workers", "2"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode in (124, 130) and time.time() - t0 < 22, proc.stderr
    time.sleep(1)
    out = subprocess.run(["pgrep", "-f", str(tmp_path / "prof")], capture_output=True, text=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("model", ["unet", "ddpm"])
def test_sigterm_during_training_saves_a_step_checkpoint_that_resumes_exactly(data, tmp_path, model):
    """SLURM's time limit (SIGTERM) mid-epoch: a checkpoint of that step, and --resume ends with the weights
    of an uninterrupted run (CPU)."""
    import torch

    from cpvs.checkpoints import load_checkpoint

    arch = (["--depth", "3", "--width", "4", "--crop", "64"] if model == "unet" else
            ["--width", "8", "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-downsample", "2", "--head-channels",
             "8", "--dropout", "0", "--timesteps", "50", "--crop", "32"])
    steps = 200 if model == "unet" else 80  # the signal, 1.5 s into the loop, must land inside epoch 1
    args = ["train", "--model", model, "--data", str(data["store"]), "--epochs", "2", "--steps-per-epoch", str(steps),
            "--batch-size", "2", "--workers", "1", *arch]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "cpvs", "--quiet", "--device", "cpu"]
    subprocess.run(base + args + ["-o", str(tmp_path / "ref")], cwd=REPO, env=env, check=True, capture_output=True)
    proc = subprocess.Popen(base + args + ["-o", str(tmp_path / "run")], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    t0 = time.time()
    while not (tmp_path / "run" / "cpvs-run.json").exists() and time.time() - t0 < 120:  # written as the loop starts
        time.sleep(0.1)
    time.sleep(1.5)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, proc.stderr.read()
    partial = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["train"].get("partial")
    assert partial is not None and 0 < partial["step"] < steps, "no mid-epoch checkpoint"
    r = subprocess.run(base + args + ["-o", str(tmp_path / "run"), "--resume"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
