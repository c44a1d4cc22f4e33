"""Greyscale reconstruction by dilation (4-connected): the fixed point that bounds granularity.

The result is skimage's ``reconstruction(seed, mask, footprint=disk(1))``, i.e. the least fixed
point of the geodesic dilation above the seeds, which any propagation order reaches when it runs
until nothing changes; the order suits the device.

* CPU: Vincent's hybrid algorithm (1993), compiled with numba: a raster and an anti-raster scan
  carry values along most paths in two passes, then a FIFO of pixels that can still raise a
  neighbour settles the rest. Propagation through a noisy image is inherently sequential (paths
  wind), so a compiled scan is ~20x faster than vectorized sweeps, which spend one torch op per
  row or column and need 20-35 rounds on real fields.
* GPU: whole-field geodesic dilations (5 kernels each), checked for convergence every 32 steps.
"""

from __future__ import annotations

import numba
import numpy as np
import torch


def reconstruct(seeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reconstruction of seeds (B, h, w) under mask (h, w); requires seeds <= mask. Returns (B, h, w)."""
    if seeds.device.type == "cpu":
        r = seeds.contiguous().clone()
        _hybrid(r.numpy(), mask.contiguous().numpy())
        return r
    return reconstruct_dilations(seeds, mask)


def cross_filter(x: torch.Tensor, op) -> torch.Tensor:
    """Grey erosion (``op=torch.minimum``) or dilation (``torch.maximum``) of (..., h, w) by the
    4-connected cross, out-of-field neighbours ignored."""
    out = x.clone()
    out[..., 1:, :] = op(out[..., 1:, :], x[..., :-1, :])
    out[..., :-1, :] = op(out[..., :-1, :], x[..., 1:, :])
    out[..., :, 1:] = op(out[..., :, 1:], x[..., :, :-1])
    out[..., :, :-1] = op(out[..., :, :-1], x[..., :, 1:])
    return out


def reconstruct_dilations(seeds: torch.Tensor, mask: torch.Tensor, check_every: int = 32) -> torch.Tensor:
    """The GPU schedule: thousands of tiny sequential steps would cost more in kernel launches."""
    r = seeds.clone()
    while True:
        before = r.clone()
        for _ in range(check_every):
            r = torch.minimum(cross_filter(r, torch.maximum), mask)
        if torch.equal(r, before):
            return r


@numba.njit(cache=True, nogil=True)
def _hybrid(r: np.ndarray, m: np.ndarray) -> None:
    """In place on r (B, h, w), C-contiguous; m (h, w). Compiled on first use, cached on disk by numba."""
    B, h, w = r.shape
    n = h * w
    mf = m.reshape(-1)
    rf = r.reshape(B, n)
    queue = np.empty(n, np.int64)  # a ring: a pixel is queued at most once at a time
    queued = np.zeros(n, np.bool_)
    for b in range(B):
        x = r[b]
        for i in range(h):  # raster: from the upper and left neighbours
            for j in range(w):
                v = x[i, j]
                if i > 0 and x[i - 1, j] > v:
                    v = x[i - 1, j]
                if j > 0 and x[i, j - 1] > v:
                    v = x[i, j - 1]
                x[i, j] = min(v, m[i, j])
        head, size = 0, 0
        for i in range(h - 1, -1, -1):  # anti-raster: from the lower and right neighbours
            for j in range(w - 1, -1, -1):
                v = x[i, j]
                if i < h - 1 and x[i + 1, j] > v:
                    v = x[i + 1, j]
                if j < w - 1 and x[i, j + 1] > v:
                    v = x[i, j + 1]
                v = min(v, m[i, j])
                x[i, j] = v
                # Pixels that can still raise a neighbour seed the FIFO (the lower and right ones
                # were final in this scan; the upper and left ones take this one's value).
                if (i < h - 1 and x[i + 1, j] < v and x[i + 1, j] < m[i + 1, j]) or (
                        j < w - 1 and x[i, j + 1] < v and x[i, j + 1] < m[i, j + 1]):
                    queue[size] = i * w + j
                    queued[i * w + j] = True
                    size += 1
        xf = rf[b]
        while size:
            p = queue[head]
            head += 1
            if head == n:
                head = 0
            size -= 1
            queued[p] = False
            v = xf[p]
            i = p // w
            j = p - i * w
            # The four neighbours, written out: a helper function would cost reference counting
            # of its array arguments on every call.
            for k in range(4):
                if k == 0:
                    if i == 0:
                        continue
                    q = p - w
                elif k == 1:
                    if i == h - 1:
                        continue
                    q = p + w
                elif k == 2:
                    if j == 0:
                        continue
                    q = p - 1
                else:
                    if j == w - 1:
                        continue
                    q = p + 1
                u = min(v, mf[q])
                if u > xf[q]:
                    xf[q] = u
                    if not queued[q]:
                        tail = head + size
                        queue[tail - n if tail >= n else tail] = q
                        queued[q] = True
                        size += 1
