"""Haralick texture per object, as cp_measure's ``get_texture`` computes it (mahotas), vectorized in torch.

cp_measure quantizes the whole image to 256 grey levels (``rint(x * 255)``, as
``skimage.util.img_as_ubyte``), crops each object with everything outside it set
to 0, and runs ``mahotas.features.haralick(crop, distance=scale, ignore_zeros=True)``:
for each of the four directions (y, x) = (0, 1), (1, 1), (1, 0), (1, -1) it counts
the grey-level pairs of pixels ``scale`` apart, both inside the object and both
non-zero, into a symmetric co-occurrence matrix ``P`` (counts + transpose,
normalised to sum 1) and derives 13 features from it (log base 2 entropies).

Here every pixel pair of every object is found at once on the field, and the 13
features come from per-(object, direction) histograms instead of dense 256²
matrices:

* marginal ``px`` (grey levels of both pair members), ``p_{x+y}`` (sums),
  ``p_{|x-y|}`` (differences) and ``E[ij]``: everything but two features;
* AngularSecondMoment and Entropy need ``P`` itself: counts of the distinct
  unordered (level, level) pairs;
* mahotas' InfoMeas1/2 use ``HXY1 = HXY2 = HX + HY`` (exact for a symmetric
  matrix: ``px = py``), so they need only ``HX`` and the joint entropy.

An object with no valid pair in some direction is NaN in every feature, as in
cp_measure (mahotas raises and cp_measure catches it).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import numba
import numpy as np
import torch

from cpvs.profile.engine.objects import Objects, tensor_version

FEATURES = ("AngularSecondMoment", "Contrast", "Correlation", "Variance", "InverseDifferenceMoment", "SumAverage",
            "SumVariance", "SumEntropy", "Entropy", "DifferenceVariance", "DifferenceEntropy", "InfoMeas1", "InfoMeas2")
# mahotas' 2-D directions (dy, dx), in the order of CellProfiler's direction suffixes _00 .. _03.
DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1))


_CACHE: dict[int, tuple[weakref.ref, int, dict]] = {}
# Take numpy's faster CPU kernels where torch's are slow (tests turn this off to run the generic path).
NUMPY_ON_CPU = True


def cached_on(tensor: torch.Tensor, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered for as long as ``tensor`` lives unmodified.

    The engine measures every channel in the same label image and every compartment
    in the same channel: what depends on one of them alone (pixel pairs, distance
    maps, a morphological series) is computed once. The entry is keyed by the
    tensor object itself (a weak reference, so no stale hit on a recycled address)
    and its in-place version counter.
    """
    i = id(tensor)
    entry = _CACHE.get(i)
    if entry is None or entry[0]() is not tensor or entry[1] != tensor_version(tensor):
        entry = (weakref.ref(tensor, lambda _, i=i, cache=_CACHE: cache.pop(i, None)), tensor_version(tensor), {})
        _CACHE[i] = entry
    if key not in entry[2]:
        entry[2][key] = compute()
    return entry[2][key]


def keys(scale: int = 3, gray_levels: int = 256) -> list[str]:
    """cp_measure's per-channel keys, direction-major: ``AngularSecondMoment_3_00_256``, ..."""
    return [f"{f}_{scale}_{d:02d}_{gray_levels}" for d in range(len(DIRECTIONS)) for f in FEATURES]


def quantize(values: torch.Tensor, gray_levels: int = 256) -> torch.Tensor:
    """Grey levels (int32) of intensities in [0, 1], exactly as cp_measure makes them.

    ``img_as_ubyte`` rounds half to even (``np.rint``); other level counts then
    rescale 0..255 to 0..gray_levels-1 and truncate (``rescale_intensity`` + ``astype(uint8)``).
    """
    q = torch.round(values * 255.0).clamp_(0, 255)
    if gray_levels != 256:
        q = torch.floor(q / 255.0 * (gray_levels - 1))
    return q.int()


def objects(labels: torch.Tensor, n: int) -> Objects:
    """The field's :class:`Objects`, built once per label image (see :func:`cached_on`)."""
    return cached_on(labels, ("objects", n), lambda: Objects.from_labels(labels, n))


def _pairs(obj: Objects, scale: int) -> dict[str, torch.Tensor]:
    """Pixel pairs ``scale`` apart inside one object, for the four directions.

    Returns ``a``, ``b`` (K,) positions into ``obj.flat`` of the two members of every
    pair, and ``group`` (K,) = object index * 4 + direction.
    """
    h, w = obj.labels.shape
    p = obj.flat.numel()
    pos = obj.positions
    if obj.device.type == "cpu" and NUMPY_ON_CPU:
        k = len(DIRECTIONS) * p
        a, b, group = (torch.empty(k, dtype=torch.int64) for _ in range(3))
        dys = torch.tensor([dy * scale for dy, _ in DIRECTIONS])
        dxs = torch.tensor([dx * scale for _, dx in DIRECTIONS])
        k = _pairs_pass(obj.y.numpy(), obj.x.numpy(), obj.seg.numpy(), pos.numpy(), h, w, dys.numpy(), dxs.numpy(),
                        a.numpy(), b.numpy(), group.numpy())
        return {"a": a[:k], "b": b[:k], "group": group[:k]}
    y, x = obj.y.long(), obj.x.long()
    a, b, group = [], [], []
    for d, (dy, dx) in enumerate(DIRECTIONS):
        dy, dx = dy * scale, dx * scale
        inside = (y + dy < h) & (x + dx >= 0) & (x + dx < w)  # dy >= 0
        second = torch.index_select(pos, 0, torch.where(inside, obj.flat + (dy * w + dx), h * w)).long()
        same = torch.index_select(obj.seg, 0, second.clamp(min=0)) == obj.seg
        first = (same & (second >= 0)).nonzero().squeeze(1)
        a.append(first)
        b.append(torch.index_select(second, 0, first))
        group.append(torch.index_select(obj.seg, 0, first) * len(DIRECTIONS) + d)
    return {"a": torch.cat(a), "b": torch.cat(b), "group": torch.cat(group)}


@numba.njit(cache=True, nogil=True)
def _pairs_pass(ys, xs, seg, pos, h, w, dys, dxs, a, b, group):
    """:func:`_pairs` on the CPU: one pass over the pixels per direction, the same pairs in the same
    order; returns how many."""
    k = 0
    for d in range(dys.size):
        for p in range(ys.size):
            y, x = int(ys[p]) + dys[d], int(xs[p]) + dxs[d]
            if y < h and x >= 0 and x < w:
                q = pos[y * w + x]
                if q >= 0 and seg[q] == seg[p]:
                    a[k], b[k], group[k] = p, q, seg[p] * dys.size + d
                    k += 1
    return k


def _cooccurrences(a: torch.Tensor, b: torch.Tensor, group: torch.Tensor, n_groups: int,
                   levels: int) -> tuple[torch.Tensor, ...]:
    """Distinct unordered grey-level pairs of each group and how often they occur.

    a, b (K,) grey levels of the pairs' members (0 = ignored), group (K,) int64.
    Returns g, lo, hi, count (U,): group, lower and higher level (both > 0), pair count.
    A dense count table (n_groups * levels²) when it is not much larger than the
    pairs, a sort otherwise (bright channels use all 256 levels).
    """
    size = n_groups * levels * levels
    # int32 keys halve the memory traffic of the pass over all pairs when they fit.
    dtype = torch.int32 if size < 2**31 else torch.int64
    key = (group.to(dtype) * (levels * levels)).add_(torch.maximum(a, b).to(dtype))
    key.add_(torch.minimum(a, b).to(dtype), alpha=levels)
    if size <= 4 * key.numel() + 2**16:
        counts = torch.bincount(key, minlength=size)
        uniq = counts.nonzero().squeeze(1)
        counts = counts[uniq]
    elif key.device.type == "cpu" and NUMPY_ON_CPU:  # numpy's sort is several times faster than torch's
        u, c = np.unique(key.numpy(), return_counts=True)
        uniq, counts = torch.from_numpy(u).long(), torch.from_numpy(c)
    else:
        uniq, counts = torch.unique(key, return_counts=True)
        uniq = uniq.long()
    hi = uniq % levels
    rest = uniq // levels
    lo = rest % levels
    keep = lo > 0  # mahotas' ignore_zeros: pairs with a zero member are dropped
    return rest[keep] // levels, lo[keep], hi[keep], counts[keep]


def _entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """-sum p log2 p over the non-zero entries (mahotas' convention)."""
    return -(p * torch.log2(torch.where(p > 0, p, torch.ones_like(p)))).sum(dim)


def _features(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, count: torch.Tensor, n_groups: int, levels: int,
              max_level: torch.Tensor) -> torch.Tensor:
    """The 13 Haralick features of every (object, direction) group: (G, 13).

    g, lo, hi, count (U,): the distinct unordered level pairs of each group (see
    :func:`_cooccurrences`); max_level (G,) the highest grey level of the group's
    object (mahotas' matrix size - 1, which DifferenceVariance depends on).
    In ``P = (C + C^T) / T``, ``T`` twice the number of pairs N, an unordered pair of
    distinct levels counted m times gives two entries m / T, a pair of equal levels
    one entry 2m / T; every pair adds 1/N to p_{x+y} and p_{|x-y|}.
    """
    dev = g.device
    c = count.double()
    hist = lambda x, width, w: torch.bincount(g * width + x, weights=w, minlength=n_groups * width).view(n_groups, width)  # noqa: E731
    n = torch.bincount(g, weights=c, minlength=n_groups)
    t = 2 * n
    k = torch.arange(levels, device=dev, dtype=torch.float64)
    tk = torch.arange(2 * levels, device=dev, dtype=torch.float64)
    px = (hist(lo, levels, c) + hist(hi, levels, c)) / t[:, None]
    p_sum = hist(lo + hi, 2 * levels, c) / n[:, None]
    p_diff = hist(hi - lo, levels, c) / n[:, None]
    e_ij = torch.bincount(g, weights=c * (lo * hi).double(), minlength=n_groups) / n
    diag = lo == hi
    p = torch.where(diag, 2 * c, c) / t[g]
    mult = torch.where(diag, 1.0, 2.0).double()
    asm = torch.bincount(g, weights=mult * p * p, minlength=n_groups)
    hxy = -torch.bincount(g, weights=mult * p * torch.log2(p), minlength=n_groups)

    ux = px @ k
    vx = px @ (k * k) - ux * ux
    sx = vx.sqrt()
    correlation = torch.where(sx == 0, torch.ones_like(sx), (1.0 / sx / sx) * (e_ij - ux * ux))
    sum_avg = p_sum @ tk
    sum_var = p_sum @ (tk * tk) - sum_avg * sum_avg
    # numpy's var over the mahotas array of length max_level + 1 (zeros included).
    size = (max_level + 1).double()
    in_array = k[None, :] <= max_level[:, None]
    mean_diff = (p_diff * in_array).sum(1) / size
    diff_var = (((p_diff - mean_diff[:, None]) ** 2) * in_array).sum(1) / size
    hx = _entropy(px)
    info1 = torch.where(hx == 0, hxy - 2 * hx, (hxy - 2 * hx) / hx)
    info2 = (1 - torch.exp(-2.0 * (2 * hx - hxy))).clamp(min=0).sqrt()
    return torch.stack([asm, p_diff @ (k * k), correlation, vx, p_diff @ (1 / (1 + k * k)), sum_avg, sum_var,
                        _entropy(p_sum), hxy, diff_var, _entropy(p_diff), info1, info2], 1)


def measure(labels: torch.Tensor, image: torch.Tensor, n: int, scale: int = 3, gray_levels: int = 256) -> dict[str, np.ndarray]:
    """Haralick features per object and direction.

    labels (H, W) int64, objects 1..n, 0 = background; image (H, W) float64 in [0, 1].
    Returns ``{"Contrast_3_00_256": (n,), ...}`` (cp_measure's keys without the channel),
    NaN for objects with no valid pixel pair in some direction.
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1 pixel, got {scale}")
    nd = len(DIRECTIONS)
    obj = objects(labels, n)
    pairs = cached_on(labels, ("texture_pairs", n, scale), lambda: _pairs(obj, scale))
    q = quantize(obj.pixels(image).double(), gray_levels)
    max_level = torch.zeros(n, dtype=q.dtype, device=q.device).scatter_reduce_(0, obj.seg, q, "amax").long()
    levels = int(max_level.max()) + 1 if n else 1  # tables no larger than the levels in use
    a, b = torch.index_select(q, 0, pairs["a"]), torch.index_select(q, 0, pairs["b"])
    g, lo, hi, count = _cooccurrences(a, b, pairs["group"], n * nd, levels)
    feats = _features(g, lo, hi, count, n * nd, levels, max_level.repeat_interleave(nd))
    # mahotas fails for the whole object when one direction has no pair: all NaN.
    empty = (torch.bincount(g, minlength=n * nd) == 0).view(n, nd).any(1)
    feats = feats.view(n, nd, len(FEATURES))
    feats[empty] = float("nan")
    out = feats.cpu().numpy()
    return {k: out[:, d, f] for (d, f), k in zip(np.ndindex(nd, len(FEATURES)), keys(scale, gray_levels))}
