"""Does an uncertainty map mean something? It should rank pixels by their error.

``evaluate --images`` reports, per field and channel of a prediction with ``<channel>_std``
maps (``predict-plate --samples K`` of a diffusion model), the Spearman rank correlation
between the std map and the absolute error |prediction − truth|: 1 when the std orders
pixels exactly as the error does, 0 when it says nothing about it.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import spearmanr

MAX_PIXELS = 1_000_000  # ranks of an evenly strided subsample beyond this (a 2160² field: every 5th pixel)


def std_error_spearman(std: np.ndarray, pred: np.ndarray, truth: np.ndarray, max_pixels: int = MAX_PIXELS) -> float:
    """Spearman correlation of ``std`` with |pred − truth| over the pixels (NaN for a constant map)."""
    s = np.asarray(std, dtype=np.float64).ravel()
    e = np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(truth, dtype=np.float64)).ravel()
    step = max(1, -(-s.size // max_pixels))
    s, e = s[::step], e[::step]
    if np.ptp(s) == 0 or np.ptp(e) == 0:
        return float("nan")
    return float(spearmanr(s, e).statistic)
