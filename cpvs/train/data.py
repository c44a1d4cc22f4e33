"""Training data from a preprocessed store: a validation split and random crops.

Crop plans are drawn from a generator seeded by (seed, rank, epoch), so an epoch's
batches are the same whether a run is fresh or resumed, and DDP ranks see
different crops.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cpvs.errors import CpvsError, warn
from cpvs.plate.channels import FLUORESCENCE, is_brightfield
from cpvs.preprocess.store import Store

Item = tuple[int, int, int]  # (field index, y, x)


def default_channels(store: Store, inputs: list[str] | None, targets: list[str] | None) -> tuple[list[str], list[str]]:
    """Inputs default to the store's brightfield planes, targets to its Cell Painting stains."""
    targets_given = bool(targets)
    inputs = inputs or [c for c in store.channels if is_brightfield(c)]
    targets = targets or [c for c in store.channels if c in FLUORESCENCE]
    if not inputs:
        raise CpvsError(f"store has no brightfield channel (channels: {', '.join(store.channels)})", store.path,
                        "pass --inputs with the input channel names")
    if not targets:
        raise CpvsError(f"store has no Cell Painting channel (channels: {', '.join(store.channels)})", store.path,
                        "pass --targets with the output channel names")
    store.channel_index(inputs + targets)  # raises for unknown names
    absent = [c for c in FLUORESCENCE if c not in store.channels]
    if absent and not targets_given:
        warn(f"the store has no {', '.join(absent)} channel: training predicts {', '.join(targets)} only", store.path,
             "check the channel map the store was made with (cpvs info STORE), or pass --targets to choose on purpose")
    overlap = set(inputs) & set(targets)
    if overlap:
        raise CpvsError(f"channel(s) {', '.join(sorted(overlap))} are both input and target")
    return inputs, targets


@dataclass
class Split:
    train_fields: list[int]
    val_fields: list[int]
    train_rows: tuple[int, int]  # rows crops may come from, per split
    val_rows: tuple[int, int]
    mode: str  # "fields" or "region"


def make_split(store: Store, crop: int, val_fraction: float, seed: int) -> Split:
    """Hold out whole fields when there are at least 10, else a band of rows at the bottom
    of every field (so a single field still gets an honest validation set)."""
    h, w = store.shape
    if h < crop or w < crop:
        raise CpvsError(f"fields are {h}x{w} px, smaller than the {crop}-px crop", store.path, "pass a smaller --crop")
    done = np.flatnonzero(store.done_mask())
    if len(done) == 0:
        raise CpvsError("store has no finished fields", store.path, "finish it with cpvs preprocess")
    if len(done) >= 10:
        perm = np.random.default_rng(seed).permutation(done)
        n_val = max(1, int(round(val_fraction * len(done))))
        return Split(sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist()), (0, h), (0, h), "fields")
    band = max(crop, int(round(val_fraction * h)))
    if h - band < crop:
        raise CpvsError(
            f"only {len(done)} field(s) of {h} px: too few to hold out validation data for {crop}-px crops",
            store.path, "preprocess more fields, or use a smaller --crop",
        )
    fields = done.tolist()
    return Split(fields, fields, (0, h - band), (h - band, h), "region")


class CropSampler:
    """Random crops (inputs, targets) of the training split; fixed crops of the validation split."""

    def __init__(self, store: Store, inputs: list[str], targets: list[str], crop: int = 256,
                 val_fraction: float = 0.1, seed: int = 0, workers: int = 2):
        self.store, self.inputs, self.targets, self.crop = store, inputs, targets, crop
        self.split = make_split(store, crop, val_fraction, seed)
        self.seed = seed
        self.channels = inputs + targets
        self.pool = ThreadPoolExecutor(max(1, workers))  # crop reads
        self.prefetch = ThreadPoolExecutor(1)  # next batch; separate so it never waits on itself

    def _random_items(self, rng: np.random.Generator, n: int) -> list[Item]:
        fields = np.asarray(self.split.train_fields)
        r0, r1 = self.split.train_rows
        w = self.store.shape[1]
        f = fields[rng.integers(0, len(fields), n)]
        y = rng.integers(r0, r1 - self.crop + 1, n)
        x = rng.integers(0, w - self.crop + 1, n)
        return list(zip(f.tolist(), y.tolist(), x.tolist()))

    def plan_epoch(self, epoch: int, steps: int, batch: int, rank: int = 0) -> list[list[Item]]:
        """``steps`` batches of ``batch`` crops, the same for the same (seed, rank, epoch)."""
        rng = np.random.default_rng([self.seed, rank, epoch])
        items = self._random_items(rng, steps * batch)
        return [items[i * batch : (i + 1) * batch] for i in range(steps)]

    def val_items(self, max_crops: int = 64) -> list[Item]:
        """Deterministic validation crops: a grid over each validation field (or band)."""
        r0, r1 = self.split.val_rows
        h, w = r1 - r0, self.store.shape[1]
        ys = sorted({r0 + int(v) for v in np.linspace(0, h - self.crop, max(1, h // self.crop))})
        xs = sorted({int(v) for v in np.linspace(0, w - self.crop, max(1, w // self.crop))})
        items = [(f, y, x) for f in self.split.val_fields for y in ys for x in xs]
        step = max(1, len(items) // max_crops)
        return items[::step][:max_crops]

    def read(self, items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
        """(B, C_in, crop, crop), (B, C_out, crop, crop) float32."""
        crops = list(self.pool.map(lambda it: self.store.read_crop(it[0], it[1], it[2], self.crop, self.channels), items))
        stack = np.stack(crops)
        n_in = len(self.inputs)
        return stack[:, :n_in], stack[:, n_in:]

    def batches(self, plan: list[list[Item]]):
        """Yield batches in order, reading the next one while the caller trains on this one."""
        if not plan:
            return
        nxt = self.prefetch.submit(self.read, plan[0])
        for i in range(len(plan)):
            cur = nxt.result()
            if i + 1 < len(plan):
                nxt = self.prefetch.submit(self.read, plan[i + 1])
            yield cur

    def summary(self) -> dict:
        return {
            "store": str(self.store.path), "n_fields": len(self.store), "plates": sorted(self.store.table["Metadata_Plate"].unique().tolist()),
            "split": self.split.mode, "train_fields": len(self.split.train_fields), "val_fields": len(self.split.val_fields),
            "shape": list(self.store.shape),
        }
