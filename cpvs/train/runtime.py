"""What every trainer shares: devices and precision, DDP under torchrun, run folders,
metrics tables, validation and RNG state for exact resumes."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from cpvs.device import autocast, check_precision, resolve_device
from cpvs.errors import CpvsError
from cpvs.jobs import OutputLock
from cpvs.image_metrics import channel_metrics
from cpvs.runinfo import atomic_path

Progress = Callable[..., None]  # (stage, completed, total, info="")


@dataclass
class Dist:
    """torchrun's world: rank 0 alone writes files."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, for every rank (e.g. stopping on a time limit)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)])
        torch.distributed.broadcast(t, 0)
        return bool(t.item())


def setup_distributed(device_spec: str) -> tuple[Dist, torch.device]:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), resolve_device(device_spec)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_spec != "cpu"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return Dist(rank, world, local), device


def start_run(precision: str, device_spec: str, data: Path):
    """What every trainer does first: check the precision, join the process group (if any) and
    open the store. Returns (dist, device, store)."""
    from cpvs.preprocess.store import Store

    check_precision(precision)
    dist, device = setup_distributed(device_spec)
    return dist, device, Store(data)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_lock(out: Path):
    """The run folder belongs to one training job (rank 0 holds the lock under torchrun)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return OutputLock(out, "train")


def check_resume_identity(ck: dict, identity: dict, path) -> None:
    """A resumed run must share every setting that shapes its weights with the run it continues."""
    from cpvs.runinfo import plain

    old, new = plain(ck.get("config_identity") or {}), plain(identity)
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        shown = "; ".join(f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:6])
        raise CpvsError(f"--resume with different settings ({shown})", path,
                        "rerun with the settings of the interrupted run (see its cpvs-run.json), or start a new -o")


def prepare_run_folder(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a run."""
    last = out / "checkpoints" / "last.pt"
    if resume:
        if not last.exists():
            raise CpvsError("nothing to resume: no checkpoints/last.pt", out, "start without --resume")
        return last
    if last.exists():
        raise CpvsError("run folder already holds a training run", out, "pass --resume to continue it, or choose a new -o")
    out.mkdir(parents=True, exist_ok=True)
    return None


@torch.no_grad()
def validate(model: nn.Module, sampler, device: torch.device, precision: str, targets: list[str],
             batch: int = 8) -> dict[str, float]:
    """Mean image metrics over the fixed validation crops, per channel and averaged:
    keys like ``pcc_DNA`` and ``pcc`` (the channel mean)."""
    model.eval()
    items = sampler.val_items()
    per: dict[str, list[float]] = {}
    loss = []
    for i in range(0, len(items), batch):
        x, y = sampler.read(items[i : i + batch])
        with autocast(device, precision):
            pred = model(torch.from_numpy(x).to(device))
        pred = pred.float().cpu().numpy()
        loss.append(float(np.abs(pred - y).mean()))
        for b in range(len(x)):
            for ch, m in channel_metrics(y[b], pred[b], targets).items():
                for k, v in m.items():
                    per.setdefault(f"{k}_{ch}", []).append(v)
    model.train()
    out = {k: float(np.nanmean(v)) for k, v in per.items()}
    for metric in ("mae", "mse", "ssim", "psnr", "pcc"):
        vals = [out[f"{metric}_{c}"] for c in targets]
        out[metric] = float(np.nanmean(vals))
    out["val_l1"] = float(np.mean(loss))
    return out


BETTER = {"pcc": max, "ssim": max, "psnr": max, "mae": min, "mse": min, "val_l1": min}


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None or not np.isfinite(old):
        return bool(np.isfinite(new))
    return BETTER[metric](new, old) == new and new != old


@dataclass
class MetricsTable:
    """Per-epoch rows appended to ``metrics.parquet`` (rewritten atomically each epoch)."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, upto_epoch: int) -> "MetricsTable":
        rows = pd.read_parquet(path).to_dict("records") if path.exists() else []
        return cls(path, [r for r in rows if r["epoch"] <= upto_epoch])

    def append(self, row: dict) -> None:
        self.rows.append(row)
        with atomic_path(self.path) as tmp:
            pd.DataFrame(self.rows).to_parquet(tmp, index=False)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


class Clock:
    def __init__(self, max_minutes: float | None):
        self.t0 = time.perf_counter()
        self.limit = None if not max_minutes else max_minutes * 60

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def out_of_time(self) -> bool:
        return self.limit is not None and self.elapsed >= self.limit
