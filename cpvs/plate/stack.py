"""Reading one field's channels as a stack, with the shape check every reader needs."""

from __future__ import annotations

import numpy as np

from cpvs.errors import CpvsError
from cpvs.plate.layout import Field
from cpvs.plate.tiff import read_image


def read_field_stack(f: Field, channels: list[str], shape: tuple[int, int] | None = None) -> np.ndarray:
    """(C, H, W) float32 raw intensities of one field; every channel must have ``shape``."""
    planes = []
    for c in channels:
        img = read_image(f.files[c])
        if shape is not None and img.shape != tuple(shape):
            raise CpvsError(
                f"image is {img.shape[0]}x{img.shape[1]} but the plate's fields are {shape[0]}x{shape[1]}",
                f.files[c],
                "remove or re-export the odd field, or rerun with --on-error skip",
            )
        shape = img.shape
        planes.append(img.astype(np.float32))
    return np.stack(planes)
