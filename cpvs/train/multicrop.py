"""Multi-crop views for DINO and the weak-label pair sampler of WS-DINO (METHODS §6).

A view is a random-resized crop: a box covering a random fraction (``scale``) of
the field's area with a random aspect ratio in [3/4, 4/3], read from the store
and resized to ``size`` px, then randomly flipped. DINO takes the global and
local views of one image; WS-DINO takes the local views from a *different* image
with the same weak label (e.g. the same compound), choosing labels uniformly so
that frequent labels do not dominate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cpvs.errors import CpvsError
from cpvs.preprocess.store import Store


@dataclass(frozen=True)
class CropSpec:
    n_global: int = 2
    global_size: int = 224
    global_scale: tuple[float, float] = (0.1, 0.2)
    n_local: int = 8
    local_size: int = 96
    local_scale: tuple[float, float] = (0.04, 0.08)

    @property
    def n_crops(self) -> int:
        return self.n_global + self.n_local


def crop_box(rng: np.random.Generator, h: int, w: int, scale: tuple[float, float],
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(y, x, height, width) of a random box whose area is a ``scale`` fraction of h*w."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        bw, bh = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < bw <= w and 0 < bh <= h:
            return int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1)), bh, bw
    side = int(round(math.sqrt(area * float(np.mean(scale)))))  # fallback: a centred square
    side = min(side, h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def read_views(store: Store, rng: np.random.Generator, field: int, channel: str, n: int, size: int,
               scale: tuple[float, float]) -> torch.Tensor:
    """(n, 1, size, size) random-resized, randomly flipped crops of one channel of one field."""
    h, w = store.shape
    out = []
    for _ in range(n):
        y, x, bh, bw = crop_box(rng, h, w, scale)
        crop = torch.from_numpy(store.read_crop(field, y, x, (bh, bw), [channel]))[None]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if rng.random() < 0.5:
            crop = crop.flip(-1)
        if rng.random() < 0.5:
            crop = crop.flip(-2)
        out.append(crop)
    return torch.stack(out)


class PairSampler:
    """(global image, local image) pairs: the same image (DINO) or another image with the
    same weak label (WS-DINO). Labels with a single image cannot be paired and are left out."""

    def __init__(self, fields: list[int], labels: list | None = None):
        self.fields = list(fields)
        self.weak = labels is not None
        self.excluded: list[str] = []
        if self.weak:
            groups: dict[str, list[int]] = {}
            for f, lab in zip(fields, labels):
                groups.setdefault(str(lab), []).append(f)
            self.excluded = sorted(k for k, v in groups.items() if len(v) < 2)
            self.groups = {k: v for k, v in groups.items() if len(v) >= 2}
            self.labels = sorted(self.groups)
            if not self.labels:
                raise CpvsError("no weak label has two or more images: WS-DINO cannot pair images",
                                hint="choose a --weak-label shared by several fields (e.g. Metadata_Compound)")
        elif not self.fields:
            raise CpvsError("no fields to train on")

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
        if not self.weak:
            picks = rng.integers(0, len(self.fields), n)
            return [(self.fields[i], self.fields[i]) for i in picks]
        pairs = []
        for _ in range(n):
            group = self.groups[self.labels[int(rng.integers(0, len(self.labels)))]]
            a, b = rng.choice(len(group), size=2, replace=False)
            pairs.append((group[int(a)], group[int(b)]))
        return pairs


def views_for_batch(store: Store, rng: np.random.Generator, pairs: list[tuple[int, int]], channel: str,
                    spec: CropSpec) -> list[torch.Tensor]:
    """Crops ordered as DINO expects: n_global tensors (B, 1, G, G), then n_local (B, 1, L, L)."""
    glob = [read_views(store, rng, g, channel, spec.n_global, spec.global_size, spec.global_scale) for g, _ in pairs]
    loc = [read_views(store, rng, lo, channel, spec.n_local, spec.local_size, spec.local_scale) for _, lo in pairs]
    return [torch.stack([v[i] for v in glob]) for i in range(spec.n_global)] + \
           [torch.stack([v[i] for v in loc]) for i in range(spec.n_local)]
