"""MeasureColocalization within objects: Pearson correlation and slope, Manders, rank-weighted
colocalization (RWC) and Costes, for every pair of channels, all objects at once.

Pairs and keys follow cp_measure's featurizer: Pearson and Slope for both orders of each pair
(``Correlation_Pearson__A__B`` and ``__B__A``), Manders and RWC once per pair (``_1`` for A,
``_2`` for B), Costes for both orders. cpvs names ``Costes_2`` of (A, B) like ``Costes_1`` of
(B, A), so the cp_measure path keeps, for each pair, the values of the later order (the later
channel first); only that order is computed here. Manders and RWC use cp_measure's threshold:
15 % of each channel's maximum in the object.
"""

from __future__ import annotations

from itertools import combinations

import numba
import numpy as np
import torch

from cpvs.profile.engine import costes as costes_module
from cpvs.profile.engine.objects import F64, Objects, numpy_path, take

THRESHOLD = 15  # percent of the object's maximum, cp_measure's default for Manders and RWC
MAX_COSTES_PIXELS = 2**22  # pixels per lockstep Costes batch (memory: ~20 float64 arrays of this length)


def _dense_ranks(obj: Objects, v: torch.Tensor) -> torch.Tensor:
    """(P,) rank of each pixel's value among the distinct values of its object (0 = smallest)."""
    order = obj.argsort(v)
    sv, sg = take(v, order), obj.seg  # objects stay in place
    new = torch.ones_like(sv, dtype=torch.int64)
    if sv.numel():
        new[1:] = ((sv[1:] != sv[:-1]) | (sg[1:] != sg[:-1])).to(torch.int64)
    cum = torch.cumsum(new, 0)
    first = cum[obj.starts.clamp(max=max(sv.numel() - 1, 0))] if sv.numel() else cum
    rank_sorted = cum - obj.expand(first)
    ranks = torch.empty_like(rank_sorted)
    ranks[order] = rank_sorted
    return ranks


def measure(obj: Objects, images: dict[str, torch.Tensor], costes: bool = True, scale_max: int = 65535,
            ) -> dict[str, torch.Tensor]:
    """cp_measure keys with channel suffixes (``Correlation_Pearson__DNA__ER``) -> (n,) float64.

    images: {channel: (H, W) float64 in [0, 1]}, two or more channels.
    """
    names = list(images)
    v = {c: obj.pixels(images[c]).to(F64) for c in names}
    centred = {c: v[c] - obj.expand(obj.mean(v[c])) for c in names}
    ss = {c: obj.sum(centred[c] ** 2) for c in names}
    above = {c: v[c] >= obj.expand((THRESHOLD / 100) * obj.max(v[c])) for c in names}
    v_above = {c: v[c] * above[c] for c in names}
    tot_above = {c: obj.sum(v_above[c]) for c in names}
    ranks = {c: _dense_ranks(obj, v[c]).to(F64) for c in names}
    max_rank = {c: obj.max(ranks[c]) for c in names}
    zero = torch.zeros(obj.n, dtype=F64, device=obj.device)
    out: dict[str, torch.Tensor] = {}
    pairs = list(combinations(names, 2))
    sums = _pair_sums_compiled(obj, names, pairs, v, centred, above, ranks, max_rank) if numpy_path(zero) else None
    for k, (a, b) in enumerate(pairs):
        if sums is not None:
            cov, n_both, sum_fa, sum_fb, sum_fa_w, sum_fb_w = sums[k]
        else:
            cov = obj.sum(centred[a] * centred[b])
            both = above[a] & above[b]
            fa, fb = v_above[a] * both, v_above[b] * both
            R = obj.expand(torch.maximum(max_rank[a], max_rank[b]) + 1)
            weight = (R - (ranks[a] - ranks[b]).abs()) / R
            n_both, sum_fa, sum_fb = obj.sum(both.to(F64)), obj.sum(fa), obj.sum(fb)
            sum_fa_w, sum_fb_w = obj.sum(fa * weight), obj.sum(fb * weight)
        r = (cov / torch.sqrt(ss[a] * ss[b])).clamp(-1, 1)
        out[f"Correlation_Pearson__{a}__{b}"] = r
        out[f"Correlation_Slope__{a}__{b}"] = cov / ss[a]
        out[f"Correlation_Pearson__{b}__{a}"] = r
        out[f"Correlation_Slope__{b}__{a}"] = cov / ss[b]
        any_both = n_both > 0
        out[f"Correlation_Manders_1__{a}__{b}"] = torch.where(any_both, sum_fa / tot_above[a], zero)
        out[f"Correlation_Manders_2__{a}__{b}"] = torch.where(any_both, sum_fb / tot_above[b], zero)
        out[f"Correlation_RWC_1__{a}__{b}"] = torch.where(any_both, sum_fa_w / tot_above[a], zero)
        out[f"Correlation_RWC_2__{a}__{b}"] = torch.where(any_both, sum_fb_w / tot_above[b], zero)
    if costes:
        out |= measure_costes(obj, images, scale_max)
    return out


def _pair_sums_compiled(obj: Objects, names, pairs, v, centred, above, ranks, max_rank) -> torch.Tensor:
    """(K, 6, n) per pair and object: the centred cross products' sum, the pixels above both thresholds,
    and the sums over those of each channel and of each channel times the RWC weight."""
    index = {c: i for i, c in enumerate(names)}
    stack = [torch.stack([d[c] for c in names]).contiguous().numpy() for d in (v, centred, above, ranks, max_rank)]
    pa = np.array([index[a] for a, _ in pairs], np.int64)
    pb = np.array([index[b] for _, b in pairs], np.int64)
    out = torch.zeros((len(pairs), 6, obj.n), dtype=F64)
    _pair_sums(*stack, obj.starts.numpy(), obj.count.to(torch.int64).numpy(), pa, pb, out.numpy())
    return out


@numba.njit(cache=True, nogil=True)
def _pair_sums(v, centred, above, ranks, max_rank, starts, counts, pa, pb, out):
    """One pass per object over its pixels for every pair (the torch path: ~15 pixel-sized
    operations per pair); sums in pixel order."""
    for o in range(starts.size):
        s, c = starts[o], counts[o]
        for k in range(pa.size):
            a, b = pa[k], pb[k]
            R = max(max_rank[a, o], max_rank[b, o]) + 1
            cov, n_both, fa, fb, faw, fbw = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            for p in range(s, s + c):
                cov += centred[a, p] * centred[b, p]
                if above[a, p] and above[b, p]:
                    x, y = v[a, p], v[b, p]
                    w = (R - abs(ranks[a, p] - ranks[b, p])) / R
                    n_both += 1.0
                    fa += x
                    fb += y
                    faw += x * w
                    fbw += y * w
            out[k, 0, o], out[k, 1, o], out[k, 2, o], out[k, 3, o], out[k, 4, o], out[k, 5, o] = cov, n_both, fa, fb, faw, fbw


def measure_costes(obj: Objects, images: dict[str, torch.Tensor], scale_max: int = 65535) -> dict[str, torch.Tensor]:
    """Costes of every pair in the order the cp_measure path keeps (later channel first), as many
    pairs per lockstep search as fit in MAX_COSTES_PIXELS; keys as :func:`measure`'s."""
    names = list(images)
    values = torch.stack([obj.pixels(images[c]).to(F64) for c in names])
    pairs = [(j, i) for i, j in combinations(range(len(names)), 2)]
    per_batch = min(64, max(1, MAX_COSTES_PIXELS // max(obj.seg.numel(), 1)))
    out = {}
    for start in range(0, len(pairs), per_batch):
        batch = pairs[start:start + per_batch]
        c1, c2 = costes_module.costes(obj, values, batch, scale_max)
        for k, (p, q) in enumerate(batch):
            out[f"Correlation_Costes_1__{names[p]}__{names[q]}"] = c1[k]
            out[f"Correlation_Costes_2__{names[p]}__{names[q]}"] = c2[k]
    return out
