"""Image metrics of virtual staining (METHODS §8), per channel.

MAE, MSE, PSNR and SSIM are computed on 8-bit versions of both images, as
published (data range 255). Each image is mapped to 0..255 by its own 0.1 and
99.9 percentiles (robust to hot pixels), clipped and rounded: a prediction is
judged on its structure, not on the intensity scale of the plate it was trained
on. Pearson correlation uses the original pixel values (it is scale-invariant).

SSIM follows scikit-image's ``structural_similarity`` defaults (7x7 uniform
window, K1 = 0.01, K2 = 0.03, sample covariance, border of 3 px excluded); this
implementation runs in torch so validation can stay on the GPU, and the tests
hold it to scikit-image's numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("mae", "mse", "ssim", "psnr", "pcc")


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)


def to_8bit(image, low: float = 0.1, high: float = 99.9) -> torch.Tensor:
    """Map an (H, W) image to 0..255 integers by its own [low, high] percentile range."""
    x = _t(image)
    sample = x.flatten()[:: max(1, x.numel() // 2_000_000)]  # quantile of a subsample: torch caps its input size
    lo, hi = torch.quantile(sample, low / 100), torch.quantile(sample, high / 100)
    scale = 255.0 / max(float(hi - lo), 1e-12)
    return torch.round(torch.clamp((x - lo) * scale, 0, 255))


def mae(a, b) -> float:
    return float((_t(a) - _t(b)).abs().mean())


def mse(a, b) -> float:
    return float(((_t(a) - _t(b)) ** 2).mean())


def psnr(a, b, data_range: float = 255.0) -> float:
    m = mse(a, b)
    return math.inf if m == 0 else 10 * math.log10(data_range**2 / m)


def ssim(a, b, data_range: float = 255.0, win: int = 7) -> float:
    """Mean SSIM of two (H, W) images (scikit-image conventions)."""
    x, y = _t(a)[None, None], _t(b)[None, None]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    n = win * win
    pool = lambda z: F.avg_pool2d(z, win, stride=1)  # noqa: E731  valid region = skimage's cropped border
    ux, uy = pool(x), pool(y)
    cov = n / (n - 1)
    vx = cov * (pool(x * x) - ux * ux)
    vy = cov * (pool(y * y) - uy * uy)
    vxy = cov * (pool(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return float(s.mean())


def pcc(a, b) -> float:
    """Pearson correlation of the pixels of two images (nan when one is constant)."""
    x, y = _t(a).flatten(), _t(b).flatten()
    x, y = x - x.mean(), y - y.mean()
    den = float(torch.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum()) / den if den > 0 else math.nan


def image_metrics(truth, pred) -> dict[str, float]:
    """All metrics of one (H, W) channel image pair."""
    t8, p8 = to_8bit(truth), to_8bit(pred)
    return {"mae": mae(t8, p8), "mse": mse(t8, p8), "ssim": ssim(t8, p8), "psnr": psnr(t8, p8), "pcc": pcc(truth, pred)}


def channel_metrics(truth, pred, channels: list[str]) -> dict[str, dict[str, float]]:
    """{channel: metrics} for (C, H, W) truth and prediction."""
    return {c: image_metrics(truth[i], pred[i]) for i, c in enumerate(channels)}
