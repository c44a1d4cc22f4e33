"""Per-image transforms: resize, z-score per channel, clipping."""

from __future__ import annotations

import numpy as np
from skimage.transform import resize

from cpvs.errors import CpvsError

RESIZE_ORDER = {"bilinear": 1, "bicubic": 3}


def parse_size(text: str | int | None) -> tuple[int, int] | None:
    """``512`` or ``512x640`` (height x width) -> (H, W); None keeps the native size."""
    if text is None or text == "" or text == 0:
        return None
    if isinstance(text, int):
        return (text, text)
    parts = str(text).lower().split("x")
    try:
        dims = [int(p) for p in parts]
    except ValueError:
        raise CpvsError(f"--size must be N or HxW in pixels, got {text!r}") from None
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 16:
        raise CpvsError(f"--size must be N or HxW with sides >= 16 px, got {text!r}")
    return dims[0], dims[1]


def resize_image(image: np.ndarray, shape: tuple[int, int], method: str = "bilinear") -> np.ndarray:
    """Resize (H, W) to ``shape`` with anti-aliasing when shrinking; float32 out."""
    if image.shape == tuple(shape):
        return image.astype(np.float32, copy=False)
    if method not in RESIZE_ORDER:
        raise CpvsError(f"unknown resize method {method!r}; use one of {', '.join(RESIZE_ORDER)}")
    shrinking = shape[0] < image.shape[0] or shape[1] < image.shape[1]
    return resize(
        image.astype(np.float32, copy=False), shape, order=RESIZE_ORDER[method], anti_aliasing=shrinking, preserve_range=True
    ).astype(np.float32)


def zscore(image: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, float, float]:
    """(image - mean) / std of one channel of one image; returns (z, mean, std)."""
    x = image.astype(np.float32, copy=False)
    mean = float(x.mean(dtype=np.float64))
    std = float(x.std(dtype=np.float64))
    return (x - mean) / max(std, eps), mean, std


def clip(image: np.ndarray, limit: float | None) -> np.ndarray:
    """Clip to [-limit, limit]; None or 0 leaves the image alone."""
    if not limit:
        return image
    return np.clip(image, -limit, limit, out=image)
