"""Apply a model's recorded preprocessing to raw fields, as ``cpvs preprocess`` made its store.

A checkpoint's ``normalization`` (illumination filter size, resize, clip) plus the
illumination function estimated on the plate at hand turn raw TIFF intensities
into the z-scored images the model was trained on (predict-plate, embed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpvs.errors import CpvsError
from cpvs.plate.layout import Field, Plate
from cpvs.preprocess.illumination import plate_illumination
from cpvs.preprocess.normalize import clip, resize_image, zscore
from cpvs.plate.stack import read_field_stack


@dataclass
class FieldNormalizer:
    channels: list[str]
    norm: dict  # a checkpoint's "normalization" record
    illum: np.ndarray | None  # (C, H, W) for ``channels``, or None

    @classmethod
    def for_plate(cls, plate: Plate, channels: list[str], norm: dict, illum_fields: int = 256,
                  cache: Path | None = None, workers: int = 2, on_error: str = "raise") -> "FieldNormalizer":
        illum = None
        if norm["illum_size"] > 1:
            illum = plate_illumination(plate, channels, norm["illum_size"], illum_fields, cache, workers, on_error)
        return cls(channels, norm, illum)

    def work_shape(self, native: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.norm["size"]) if self.norm.get("size") else tuple(native)

    def read(self, f: Field) -> tuple[np.ndarray, tuple[int, int]]:
        """(C, h, w) float32 normalized channels of a field, and its native (H, W)."""
        raw = read_field_stack(f, self.channels)
        native = raw.shape[1:]
        if self.illum is not None:
            if self.illum.shape[1:] != native:
                raise CpvsError(f"field is {native[0]}x{native[1]} px, the plate's illumination function "
                                f"{self.illum.shape[1]}x{self.illum.shape[2]}", f.files[self.channels[0]])
            raw /= self.illum
        work = self.work_shape(native)
        x = np.empty((len(self.channels), *work), dtype=np.float32)
        for c in range(len(self.channels)):
            x[c], _, _ = zscore(resize_image(raw[c], work, self.norm["resize_method"]))
            clip(x[c], self.norm["clip"])
        return x, native
