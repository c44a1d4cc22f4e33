"""Residual diffusion's U-Net side (CorrDiff, Mardani et al. 2023): the frozen U-Net's prediction
u(x) on training crops, the per-channel scale of the residual y − u(x), and the shrinkage of the
residual's posterior-mean estimate fitted on validation crops the U-Net never trained on.

Why shrink: the residual network learns E[y − u(x) | x, u(x)] from crops the U-Net was trained
on, where its residuals are smaller and differently structured than on new data, and a short
run leaves the estimate noisy. Per channel, α = clip(⟨r, r̂⟩ / ⟨r̂, r̂⟩, 0, 1) on held-out
crops is the least-squares weight of the estimate r̂ against the honest residual r; the point
prediction is u(x) + α · scale · r̂ (α = 0: the U-Net's own prediction, which the residual
model then only adds uncertainty to). The samples, and so the std maps, are not shrunk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.models import load_model
from cpvs.models.diffusion.prediction import to_x0_eps
from cpvs.preprocess.store import Store
from cpvs.runinfo import file_digest
from cpvs.train.data import CropSampler, make_split

CONTEXT = 64  # px of context the U-Net sees around a training crop (its tiles have 64+ px around their centre)


class ResidualBase:
    """The frozen U-Net of residual diffusion on training crops: u(x) for each crop, computed on
    the crop plus up to ``CONTEXT`` px around it (inside the field), so crop borders see what
    the U-Net's tiles see at prediction time."""

    def __init__(self, run: Path, store: Store, inputs: list[str] | None, targets: list[str] | None, device):
        self.loaded = load_model(run, device, roles=("staining",), option="--residual-of")
        ck = self.loaded.checkpoint
        self.inputs, self.outputs, self.device, self.store = list(ck["inputs"]), list(ck["outputs"]), device, store
        if inputs and list(inputs) != self.inputs:
            raise CpvsError(f"--inputs {','.join(inputs)} differ from the U-Net's inputs {','.join(self.inputs)}", run,
                            "drop --inputs: residual diffusion uses the U-Net's inputs")
        if targets and list(targets) != self.outputs:
            raise CpvsError(f"--targets {','.join(targets)} differ from the U-Net's outputs {','.join(self.outputs)}", run,
                            "drop --targets: residual diffusion predicts what the U-Net predicts")
        store.channel_index(self.inputs + self.outputs)  # raises for channels the store lacks
        mine, theirs = store.normalization(self.inputs + self.outputs), ck["normalization"]
        for key in ("illum_size", "size", "resize_method", "clip"):
            if mine.get(key) != theirs.get(key):
                raise CpvsError(f"the store was preprocessed with {key} {mine.get(key)}, the U-Net's store with "
                                f"{theirs.get(key)}", store.path, "preprocess the store as the U-Net's was")
        self.multiple = 2 ** (ck["hparams"].get("depth", 6) - 1)
        self.record = {"checkpoint": str(Path(ck["path"]).resolve()), "sha256": file_digest(ck["path"]),
                       "family": self.loaded.family}

    @torch.no_grad()
    def __call__(self, items: list[tuple[int, int, int]], crop: int) -> torch.Tensor:
        """(B, C_out, crop, crop): the U-Net's prediction of each crop (field, y, x)."""
        h, w = self.store.shape
        side = -(-(crop + 2 * CONTEXT) // self.multiple) * self.multiple
        rh, rw = min(side, h), min(side, w)
        regions, offsets = [], []
        for f, y, x in items:
            y0, x0 = min(max(0, y - CONTEXT), h - rh), min(max(0, x - CONTEXT), w - rw)
            regions.append(self.store.read_crop(f, y0, x0, (rh, rw), self.inputs))
            offsets.append((y - y0, x - x0))
        batch = np.stack(regions)
        ph, pw = (-rh) % self.multiple, (-rw) % self.multiple
        if ph or pw:
            batch = np.pad(batch, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="reflect")
        out = self.loaded.net(torch.from_numpy(batch).to(self.device)).float()
        return torch.stack([o[:, dy : dy + crop, dx : dx + crop] for o, (dy, dx) in zip(out, offsets)])


def residual_stats(base: ResidualBase, sampler: CropSampler, crop: int, batch: int = 8, batches: int = 4) -> tuple[np.ndarray, dict]:
    """Per-channel std of the U-Net's residual y − u(x) on fixed training crops (the scale that gives the
    diffused residual unit variance) and the [min, max] of the scaled residual (the sampler's clamp)."""
    res = []
    for items in sampler.plan_epoch(0, batches, batch):  # epoch 0 is never trained: a fixed draw
        _, y = sampler.read(items)
        res.append(torch.from_numpy(y).to(base.device) - base(items, crop))
    r = torch.cat(res).transpose(0, 1).reshape(len(base.outputs), -1).cpu().numpy().astype(np.float64)
    scale = np.maximum(r.std(axis=1), 1e-3)
    lo, hi = (r.min(axis=1) / scale), (r.max(axis=1) / scale)
    return scale, {c: [float(a), float(b)] for c, a, b in zip(base.outputs, lo, hi)}


def residual_batch(base: ResidualBase | None, items, x: torch.Tensor, y: torch.Tensor, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition, diffusion target) of a batch: (x, y), or for residual diffusion ([x, u(x)], (y − u(x)) / scale)."""
    if base is None:
        return x, y
    u = base(items, crop)
    return torch.cat([x, u], 1), (y - u) / base.scale


def held_out_from_base(base: ResidualBase, sampler: CropSampler, items: list[tuple[int, int, int]]) -> bool:
    """Whether every crop of ``items`` lies in the U-Net's own validation data (its split rebuilt from
    its recorded store, crop, validation fraction and seed), so its residuals there are honest."""
    cfg = base.loaded.checkpoint.get("config") or {}
    if not items or Path(str(cfg.get("data", ""))).resolve() != Path(sampler.store.path).resolve():
        return False
    try:
        split = make_split(sampler.store, int(cfg["crop"]), float(cfg["val_fraction"]), int(cfg["seed"]))
    except (KeyError, TypeError, ValueError, CpvsError):
        return False
    if split.mode == "fields":
        return all(f in split.val_fields for f, _, _ in items)
    return all(y >= split.val_rows[0] for _, y, _ in items)


@torch.no_grad()
def fit_shrinkage(ema, x: torch.Tensor, r: torch.Tensor, schedule, prediction: str, precision: str, seed: int,
                  draws: int = 2) -> np.ndarray:
    """Per-channel α in [0, 1]: the least-squares weight of the network's clean-residual estimate at the
    last step (pure noise, ``draws`` noise images averaged) against the residual ``r`` of condition ``x``."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.full((len(x),), schedule.T - 1, dtype=torch.long, device=x.device)
    gamma = schedule.gamma(t)
    est = torch.zeros_like(r)
    for _ in range(draws):
        y_t = schedule.q_sample(r, t, torch.randn(r.shape, generator=gen).to(x.device))
        with autocast(x.device, precision):
            out = ema(x, y_t, gamma, None).float()
        est += to_x0_eps(prediction, out, y_t, gamma)[0] / draws
    dims = (0, 2, 3)
    num, den = (r * est).sum(dims).double(), (est * est).sum(dims).double()
    return (num / den.clamp_min(1e-12)).clamp(0, 1).cpu().numpy()
