"""Crash consistency: `kill -9` at random moments, then the same command again, ends with outputs
identical to an uninterrupted run (training: the same weights, on CPU).

Runs are forked from a preloaded server process (no interpreter start-up per run), so many kill
points stay cheap: the quick variant (3 points per command) runs with every test run, the full
harness (20 points per command) is marked slow."""

from __future__ import annotations

import multiprocessing as mp
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

CTX = mp.get_context("forkserver")
CTX.set_forkserver_preload(["cpvs.cli", "cpvs.profile.pipeline", "cpvs.predict.runner", "cpvs.train.staining",
                            "cpvs.preprocess.pipeline"])


def _cpvs(argv: list[str]) -> None:
    """``cpvs ARGV`` in a process forked from the server, with worker pools forked from it as from a
    shell-started cpvs (forkserver children inherit that start method, and pool workers forked by the
    server would outlive the run they belong to when it is killed)."""
    from cpvs.cli import run

    mp.set_start_method("fork", force=True)
    run(argv, True)


def run_cli(argv: list[str], kill_after: float | None = None) -> int | None:
    """Exit code of ``cpvs ARGV``, or None when it was killed (SIGKILL) after ``kill_after`` seconds."""
    p = CTX.Process(target=_cpvs, args=(["--quiet", "--device", "cpu", *argv],))
    p.start()
    p.join(kill_after)
    if p.is_alive():
        p.kill()  # its workers die with it (PR_SET_PDEATHSIG)
        p.join()
        return None
    return p.exitcode


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from cpvs.plate import discover_plates
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.simulate import simulate
    from cpvs.train.staining import StainingConfig, train_staining

    root = tmp_path_factory.mktemp("crash")
    plate = simulate(root / "plates", plates=1, wells=4, sites=2, size=128, seed=11, moas=2, masks=False).plates[0]
    preprocess_plates(discover_plates(plate), root / "s.zarr")
    train_staining(StainingConfig("unet", root / "s.zarr", root / "unet", crop=64, depth=3, width=4, epochs=1,
                                  steps_per_epoch=1, batch_size=2, device="cpu", workers=1))
    return {"root": root, "plate": plate, "store": root / "s.zarr", "unet": root / "unet"}


def _store_content(path: Path) -> dict:
    import zarr

    g = zarr.open_group(str(path), mode="r")
    out = {k: np.asarray(g[k][:]) for k in ("images", "done", "stats")}
    out.update({f"illum/{k}": np.asarray(v[:]) for k, v in g["illum"].arrays()})
    out["fields"] = pd.read_parquet(path / "fields.parquet")
    return out


def _files(path: Path, pattern: str) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob(pattern))}


def _weights(path: Path) -> dict:
    from cpvs.checkpoints import load_checkpoint

    return {name: load_checkpoint(path / "checkpoints" / f"{name}.pt")["state_dict"] for name in ("last", "best")}


def _tables(path: Path) -> dict:
    return {p.name: pd.read_parquet(p) for p in sorted(path.glob("*.parquet"))} | _files(path, "masks/**/*.tiff")


def commands(d: dict, out: Path):
    """(argv of a fresh run, argv of the rerun after a kill, what the outputs are) per command."""
    plate, store = str(d["plate"]), str(d["store"])
    train = ["train", "--model", "unet", "--data", store, "-o", str(out), "--crop", "64", "--depth", "3", "--width", "4",
             "--epochs", "3", "--steps-per-epoch", "4", "--batch-size", "2", "--workers", "1"]
    return {
        "preprocess": (["preprocess", plate, "-o", str(out), "--workers", "1"], None, _store_content),
        "predict-plate": (["predict-plate", plate, "--checkpoint", str(d["unet"]), "-o", str(out), "--tile", "64", "--stride", "32",
                           "--workers", "1"], None, lambda p: _files(p, "*.tiff") | _files(p, "load_data.csv")),
        "profile": (["profile", plate, "-o", str(out), "--workers", "2", "--skip", "texture,granularity"], None, _tables),
        "train": (train, train + ["--resume"], _weights),
    }


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, pd.DataFrame):
        return a.equals(b)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b, equal_nan=True)
    return a == b


def crash_and_resume(d: dict, tmp: Path, command: str, points: int, seed: int = 0) -> list[float]:
    """Kill ``command`` at ``points`` random moments, finish each with a rerun, compare with an uninterrupted run."""
    fresh, rerun, content = commands(d, tmp / "ref")[command]
    assert run_cli(fresh) == 0
    reference = content(tmp / "ref")
    t0 = time.perf_counter()  # timed on a second run: the first one also starts the fork server
    assert run_cli(commands(d, tmp / "timed")[command][0]) == 0
    duration = time.perf_counter() - t0
    shutil.rmtree(tmp / "timed")
    rng = random.Random(seed)
    moments = sorted(rng.uniform(0.1, 0.95) * duration for _ in range(points))
    for i, t in enumerate(moments):
        out = tmp / f"k{i}"
        fresh, rerun, _ = commands(d, out)[command]
        killed = run_cli(fresh, kill_after=t) is None
        resume = rerun if (rerun and (out / "checkpoints" / "last.pt").exists()) else fresh
        assert run_cli(resume) == 0, f"{command}: the rerun after a kill at {t:.2f} s failed"
        assert _equal(content(out), reference), f"{command}: outputs differ after a kill at {t:.2f} s (killed: {killed})"
        shutil.rmtree(out)
    return moments


COMMANDS = ["preprocess", "predict-plate", "profile", "train"]


@pytest.mark.parametrize("command", COMMANDS)
def test_kill_9_then_rerun_equals_an_uninterrupted_run_quick(inputs, tmp_path, command):
    crash_and_resume(inputs, tmp_path, command, points=3, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_kill_9_then_rerun_equals_an_uninterrupted_run_20_points(inputs, tmp_path, command):
    moments = crash_and_resume(inputs, tmp_path, command, points=20, seed=2)
    assert len(moments) == 20
