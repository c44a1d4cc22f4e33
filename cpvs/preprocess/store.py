"""The chunked image store that ``cpvs preprocess`` writes and training reads.

Layout (a zarr v3 group)::

    STORE/
      images   (N, C, H, W) float16|float32, one shard per field, 256² chunks inside
      done     (N,) bool, one chunk per field: set only after a field is fully written
      stats    (N, C, 2) float64: mean and std of each field and channel before z-scoring
      illum/<plate>  (C, H0, W0) float32 illumination function at native resolution
      fields.parquet  one row per field: Metadata_Plate/Well/Site and the platemap columns
      cpvs-run.json

Random crops read only the chunks they touch, never a TIFF.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from cpvs.errors import CpvsError
from cpvs.runinfo import atomic_path

FIELDS_FILE = "fields.parquet"
FORMAT = "cpvs-store/1"


def _compressor():
    return BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")


def create_store(
    path: Path,
    channels: list[str],
    shape: tuple[int, int],
    table: pd.DataFrame,
    params: dict[str, Any],
    dtype: str = "float16",
    chunk: int = 256,
) -> zarr.Group:
    """Create the arrays of a new store (fill values: zeros, ``done`` all False).

    The ``n_fields`` attribute is written last: a store without it was killed while being
    created and is created again (see :func:`is_created`)."""
    n, c = len(table), len(channels)
    h, w = shape
    g = zarr.open_group(str(path), mode="a")
    ch = min(chunk, h), min(chunk, w)
    shard = (1, c, -(-h // ch[0]) * ch[0], -(-w // ch[1]) * ch[1])
    g.create_array("images", shape=(n, c, h, w), chunks=(1, 1, *ch), shards=shard, dtype=dtype,
                   compressors=_compressor(), fill_value=0, overwrite=True)
    g.create_array("done", shape=(n,), chunks=(1,), dtype=bool, fill_value=False, overwrite=True)
    g.create_array("stats", shape=(n, c, 2), chunks=(1, c, 2), dtype="float64", fill_value=np.nan, overwrite=True)
    with atomic_path(path / FIELDS_FILE) as tmp:
        table.reset_index(drop=True).to_parquet(tmp, index=False)
    g.attrs.update({"format": FORMAT, "channels": list(channels), "shape": [h, w], "n_fields": n, "params": params})
    return g


def is_created(g: zarr.Group) -> bool:
    """True when :func:`create_store` finished on ``g`` (all arrays and the field table exist)."""
    return "images" in g and "n_fields" in g.attrs


class Store:
    """Read access to a preprocessed store.

    ``store.read_crop(i, y, x, 256)`` -> (C, 256, 256) float32 of field ``i``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "zarr.json").exists():
            raise CpvsError("not a cpvs store (no zarr.json)", self.path, "create one with `cpvs preprocess PLATE -o STORE`")
        self.group = zarr.open_group(str(self.path), mode="r")
        attrs = dict(self.group.attrs)
        if attrs.get("format") != FORMAT or "images" not in self.group:
            raise CpvsError("not a finished cpvs store", self.path, "rerun `cpvs preprocess` into it to finish it")
        self.attrs = attrs
        self.channels: list[str] = list(attrs["channels"])
        self.shape: tuple[int, int] = tuple(attrs["shape"])  # type: ignore[assignment]
        self.images = self.group["images"]
        self.table = pd.read_parquet(self.path / FIELDS_FILE)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def channel_index(self, channels: list[str] | None) -> list[int]:
        if channels is None:
            return list(range(len(self.channels)))
        missing = [c for c in channels if c not in self.channels]
        if missing:
            raise CpvsError(
                f"channel(s) {', '.join(missing)} not in the store; it has {', '.join(self.channels)}",
                self.path,
                "choose channels from that list, or preprocess the plate with them",
            )
        return [self.channels.index(c) for c in channels]

    def read_field(self, i: int, channels: list[str] | None = None) -> np.ndarray:
        """(C, H, W) float32 of field ``i``."""
        idx = self.channel_index(channels)
        return np.asarray(self.images.oindex[i, idx], dtype=np.float32)

    def read_crop(self, i: int, y: int, x: int, size: int | tuple[int, int], channels: list[str] | None = None) -> np.ndarray:
        """(C, h, w) float32 crop of field ``i`` with top-left corner (y, x)."""
        h, w = (size, size) if isinstance(size, int) else size
        if y < 0 or x < 0 or y + h > self.shape[0] or x + w > self.shape[1]:
            raise ValueError(f"crop ({y}, {x}, {h}, {w}) outside the {self.shape} field")
        idx = self.channel_index(channels)
        return np.asarray(self.images.oindex[i, idx, y : y + h, x : x + w], dtype=np.float32)

    def stats(self) -> np.ndarray:
        """(N, C, 2): mean and std of each field and channel before z-scoring."""
        return np.asarray(self.group["stats"][:])

    def illumination(self, plate: str) -> np.ndarray:
        return np.asarray(self.group["illum"][plate][:])

    def normalization(self, channels: list[str]) -> dict:
        """How the store's images were made from raw TIFFs, for a model to do the same at
        prediction time and to map its outputs back to intensities."""
        p = self.attrs["params"]
        shapes = [v["shape"] for v in self.attrs.get("illum_done", {}).values()]
        return {
            "illum_size": p["illum_size"],
            "size": p["size"],
            "native_shape": shapes[0] if shapes else list(self.shape),
            "resize_method": p["resize_method"],
            "clip": p["clip"],
            "zscore": "per image and channel",
            "channel_stats": {c: self.attrs["channel_stats"][c] for c in channels},
        }
