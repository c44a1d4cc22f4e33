"""Illumination correction per plate and channel (CellProfiler CorrectIlluminationCalculate practice).

The function is the plate's mean image smoothed by a large median filter. A
249-px median filter at full resolution takes minutes; the plate mean is smooth
at that scale, so it is filtered at low resolution and interpolated back, which
costs milliseconds and differs from the full-size filter by well under 1 %.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.transform import resize

from cpvs.errors import CpvsError
from cpvs.jobs import thread_pool
from cpvs.plate.stack import read_field_stack
from cpvs.runinfo import atomic_path


def illumination_function(mean_image: np.ndarray, size: int = 249, min_fraction: float = 0.05) -> np.ndarray:
    """Smooth illumination function (H, W) float32 with mean 1.

    mean_image: (H, W) the average of all of a plate's images of one channel.
    size: median filter size in pixels of ``mean_image``.
    min_fraction: floor of the function relative to its mean, so dividing by it
        never blows up dark corners.
    """
    img = np.asarray(mean_image, dtype=np.float64)
    if size <= 1:
        out = img
    else:
        # Filter at a resolution where the kernel spans ~15 px: large enough to be
        # a faithful median, small enough to be cheap.
        factor = max(1, size // 15)
        small_shape = (max(1, round(img.shape[0] / factor)), max(1, round(img.shape[1] / factor)))
        small = resize(img, small_shape, order=1, anti_aliasing=True, preserve_range=True)
        k = max(1, round(size / factor)) | 1  # odd kernel
        small = ndimage.median_filter(small, size=k, mode="reflect")
        out = resize(small, img.shape, order=1, anti_aliasing=False, preserve_range=True)
    mean = out.mean()
    if not np.isfinite(mean) or mean <= 0:
        return np.ones(img.shape, dtype=np.float32)
    out = out / mean
    return np.maximum(out, min_fraction).astype(np.float32)


def large_scale_variation(image: np.ndarray, blocks: int = 8, percentile: float = 25) -> float:
    """Coefficient of variation, over a ``blocks`` x ``blocks`` grid, of each block's
    lower quartile: how uneven the background of an image is at the scale
    illumination acts on (the quartile ignores the bright cells of sparse stains)."""
    h, w = image.shape
    bh, bw = h // blocks, w // blocks
    tiles = image[: bh * blocks, : bw * blocks].reshape(blocks, bh, blocks, bw).transpose(0, 2, 1, 3).reshape(blocks, blocks, -1)
    level = np.percentile(tiles, percentile, axis=-1)
    return float(level.std() / level.mean())


def plate_illumination(plate, channels: list[str], size: int, max_fields: int, cache: Path | None = None,
                       workers: int = 2, on_error: str = "raise") -> np.ndarray:
    """Illumination functions (C, H, W) of a plate's ``channels`` from up to ``max_fields``
    evenly spaced fields of the whole plate.

    Used where a step needs a plate's illumination without a preprocessing pass
    (predict-plate, profile): every shard of a job array samples the same fields
    and so corrects with the same function. Cached in ``cache`` when given. With
    ``on_error="skip"`` unreadable fields are left out of the average (they are skipped
    later too); otherwise the first one stops with its error.
    """
    picks = plate.fields[:: max(1, -(-len(plate.fields) // max_fields))]
    key = hashlib.sha256(json.dumps([size, channels, [f.key for f in picks]]).encode()).hexdigest()[:12]
    path = None if cache is None else Path(cache) / f"illum-{plate.name}-{key}.npy"
    if path is not None and path.exists():
        return np.load(path)
    def read(f):
        try:
            return read_field_stack(f, channels)
        except CpvsError:
            if on_error != "skip":
                raise
            return None

    total, n = None, 0
    with thread_pool(workers) as ex:
        for stack in ex.map(read, picks):  # in order: a deterministic sum
            if stack is None:
                continue
            total = stack.astype(np.float64) if total is None else total + stack
            n += 1
    if total is None:
        raise CpvsError(f"no readable field among the {len(picks)} sampled for the illumination correction", plate.root,
                        "check the plate's files (see the errors of --on-error raise)")
    func = np.stack([illumination_function(m, size) for m in total / n])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".npy") as tmp:
            np.save(tmp, func)
    return func
