"""What every predicted plate shares, whatever the model: the output folder's plan (names,
finished and remaining fields of this shard), the plate files beside the TIFFs, writing a
field's normalized prediction as intensities, and the run record.

TIFF output: every file is written under a temporary name and renamed; a field is finished
when all its channel files exist, so a rerun skips it. OME-Zarr output (``OUT/PLATE.zarr``):
a field is finished when its image metadata exists, written after its arrays
(:mod:`cpvs.plate.omezarr_write`); shards write disjoint fields of the one store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpvs.plate.channels import ChannelMap
from cpvs.plate.discover import CHANNEL_MAP_NAME
from cpvs.plate.layout import Field, Plate
from cpvs.plate.loaddata import write_load_data
from cpvs.plate.naming import NameOf, plate_tiff_names
from cpvs.plate.omezarr_write import PlateStoreWriter
from cpvs.plate.shards import Shard
from cpvs.plate.tiff import write_image
from cpvs.preprocess.normalize import resize_image
from cpvs.runinfo import atomic_path, plain, write_run_record

FORMATS = ("tiff", "ome-zarr")


@dataclass
class OutputPlan:
    out: Path
    name_of: NameOf
    fields: list[Field]  # this shard's
    done: list[Field]
    todo: list[Field]
    channels: list[str] | None = None  # every image a field gets, in order
    store: PlateStoreWriter | None = None  # OME-Zarr output


def platemap_attrs(plate: Plate) -> dict:
    """What a plate store keeps of its source for cpvs: the platemap, so its fields keep their metadata."""
    return {"platemap": {"name": plate.platemap[0], "text": plate.platemap[1]}} if plate.platemap else {}


def plan_outputs(plate: Plate, out: Path, channels: list[str], shard: tuple[int, int], fmt: str = "tiff") -> OutputPlan:
    """Prepare a predicted plate's folder for ``channels`` (every image a field gets): TIFFs plus
    load_data.csv, channel_map.csv and the platemap, or the OME-Zarr plate ``OUT/PLATE.zarr``
    (its plate and well metadata); the same for every shard."""
    out.mkdir(parents=True, exist_ok=True)
    name_of, out_map = plate_tiff_names(plate, channels)
    mine = Shard(*shard).select(plate.fields)
    if fmt == "ome-zarr":
        store = PlateStoreWriter(out / f"{plate.name}.zarr", plate.name, [(f.well, f.site) for f in plate.fields], channels,
                                 cpvs=platemap_attrs(plate))
        store.create()
        done = [f for f in mine if store.is_complete(f.well, f.site)]
    else:
        store = None
        done = [f for f in mine if all((out / name_of(f, c)).exists() for c in channels)]
        _write_plate_files(plate, out, channels, name_of, out_map)
    todo = [f for f in mine if f not in done]
    return OutputPlan(out, name_of, mine, done, todo, list(channels), store)


def _write_plate_files(plate: Plate, out: Path, outputs: list[str], name_of: NameOf, out_map: ChannelMap | None) -> None:
    """``load_data.csv`` for every field of the plate (the same for every shard),
    ``channel_map.csv`` and the platemap, so cpvs or CellProfiler read the prediction directly."""
    pred = Plate(plate.name, out, "predicted", list(outputs),
                 [Field(f.plate, f.well, f.site, {c: out / name_of(f, c) for c in outputs}) for f in plate.fields],
                 metadata=plate.metadata)
    write_load_data(pred, out / "load_data.csv")
    if out_map is not None:
        with atomic_path(out / CHANNEL_MAP_NAME) as tmp:
            tmp.write_text("channel,name\n" + "".join(f"{k},{v}\n" for k, v in out_map.to_dict().items()))
    if plate.platemap is not None:
        with atomic_path(out / f"platemap{Path(plate.platemap[0]).suffix}") as tmp:
            tmp.write_text(plate.platemap[1])


class FieldWriter:
    """Normalized predictions at the model's resolution -> intensity TIFFs at the field's native size,
    undoing the checkpoint's resize and z-score (the store's per-channel statistics)."""

    def __init__(self, plan: OutputPlan, outputs: list[str], norm: dict, dtype: str):
        stats = norm["channel_stats"]
        self.plan, self.outputs, self.dtype, self.resize_method = plan, outputs, dtype, norm["resize_method"]
        self.mean = np.array([stats[c]["mean"] for c in outputs], dtype=np.float32)[:, None, None]
        self.std = np.array([stats[c]["std"] for c in outputs], dtype=np.float32)[:, None, None]

    def write(self, f: Field, native: tuple[int, int], pred: np.ndarray, spread: np.ndarray | None = None) -> None:
        """``pred`` (C, h, w): the prediction; ``spread`` (C, h, w): its per-pixel std over samples,
        written as ``<channel>_std`` in intensity units."""
        images: dict[str, np.ndarray] = {}
        for arr, is_std in ((pred, False), (spread, True)):
            if arr is None:
                continue
            if tuple(arr.shape[1:]) != tuple(native):
                arr = np.stack([resize_image(a, native, self.resize_method) for a in arr])
            img = arr * self.std if is_std else arr * self.std + self.mean
            for c, ch in enumerate(self.outputs):
                name = f"{ch}_std" if is_std else ch
                images[name] = np.clip(np.rint(img[c]), 0, 65535).astype(np.uint16) if self.dtype == "uint16" else img[c].astype(np.float32)
        if self.plan.store is not None:
            self.plan.store.write_field(f.well, f.site, np.stack([images[c] for c in self.plan.channels]))
            return
        for name, a in images.items():
            write_image(self.plan.out / self.plan.name_of(f, name), a)


def write_record(cfg, plan: OutputPlan, checkpoint: str, **extra) -> Path:
    """The run record of one shard (shards running side by side each keep their own)."""
    return write_run_record(plan.out, "predict-plate", plain(cfg), inputs={"plate": str(cfg.plate), "checkpoint": checkpoint},
                            name=Shard(*cfg.shard).record_name(), n_fields=len(plan.fields), **extra)
