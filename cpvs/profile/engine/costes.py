"""Costes' colocalization coefficients with CellProfiler's automatic threshold ("Faster" bisection).

cp_measure searches each object's threshold alone: every step of the bisection recomputes a
Pearson correlation over the pixels below the candidate threshold. Here the objects of all
channel pairs search in lockstep, and a step costs O(1) per object instead of a pass over its
pixels: for a positive regression slope ``a`` a pixel is below the candidate ``m`` (on the grid
1..scale_max) exactly when ``m >= c`` for an integer ``c`` of its own, so sorting each object's
pixels by ``c`` once turns every "pixels below the threshold" set into a prefix, whose sums come
from cumulative sums. Objects with a negative slope (anti-correlated channels) are evaluated
pixel by pixel at each step instead.

The comparisons are cp_measure's own expressions (``f < m / scale_max``,
``s < a * (m / scale_max) + b``), so the chosen thresholds are the same; undefined cases
(fewer than 3 pixels, constant channels, ill-conditioned regression, no valid threshold) are NaN.
"""

from __future__ import annotations

import numpy as np
import torch

from cpvs.profile.engine.objects import F64, Objects

EPS = float(np.finfo(float).eps)


def _first_grid_step(value: torch.Tensor, below, scale: int) -> torch.Tensor:
    """Smallest integer m with ``below(m)`` true (below monotone in m), as float64 in [-2, scale + 4].

    ``value * scale`` estimates the crossing; only estimates within 1e-6 of an integer can be off
    by one, and only those pixels are checked with the exact test.
    """
    q = value * scale
    c = torch.floor(q).clamp(-3, scale + 3) + 1
    near = torch.nonzero(((q - torch.round(q)).abs() < 1e-6) & (q > -3) & (q < scale + 3)).squeeze(1)
    if near.numel():
        cn = c[near]
        cn = torch.where(below(cn, near), cn, cn + 1)
        cn = torch.where(below(cn - 1, near), cn - 1, cn)
        c[near] = cn
    return c


def _pack_sort(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted non-negative int64 keys and the sorting permutation: the position rides in the low
    bits, so a plain (vectorized) sort of values serves as an argsort."""
    bits = max(int(key.numel()).bit_length(), 1)
    packed = (key << bits) | torch.arange(key.numel(), device=key.device)
    if packed.device.type == "cpu":
        packed = torch.from_numpy(np.sort(packed.numpy()))
    else:
        packed = torch.sort(packed).values
    return packed >> bits, packed & ((1 << bits) - 1)


def _cumsum0(t: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum with a leading 0: (N,) -> (N + 1,)."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out[0] = 0
    if t.device.type == "cpu":  # numpy's cumsum is faster here
        np.cumsum(t.numpy(), out=out[1:].numpy())
    else:
        torch.cumsum(t, 0, out=out[1:])
    return out


def _first_change(v: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(G,) position of the first value in each group (from ``starts``) that differs from the one
    before it, or len(v) if none: a group prefix ending before it is constant."""
    changes = torch.nonzero(v[1:] != v[:-1]).squeeze(1) + 1
    changes = torch.cat([changes, torch.tensor([v.numel()], device=v.device)])
    return changes[torch.searchsorted(changes, starts + 1)]


def _regression(obj: Objects, values, centred, p: int, q: int, ss, vmax, vmin, zero):
    """cp_measure's orthogonal regression of channel q on channel p over the pixels where either is
    nonzero: slope a, intercept b and whether the object can be measured, (n,) each."""
    n, seg = obj.n, obj.seg
    f, s = values[p], values[q]
    both_zero = zero[p] & zero[q]
    if bool(both_zero.any()):  # rare: drop the (0, 0) pixels and recompute the moments
        keep = ~both_zero
        sub_seg, fz, sz = seg[keep], f[keep], s[keep]
        cz = torch.zeros(n, dtype=F64, device=f.device).index_add_(0, sub_seg, torch.ones_like(fz))

        def ssum(t):
            return torch.zeros(n, dtype=F64, device=f.device).index_add_(0, sub_seg, t)

        xm, ym = ssum(fz) / cz, ssum(sz) / cz
        dx, dy = fz - xm[sub_seg], sz - ym[sub_seg]
        sxx, syy, sxy = ssum(dx * dx), ssum(dy * dy), ssum(dx * dy)
        inf = torch.full((n,), float("inf"), dtype=F64, device=f.device)
        ptp = ((-inf).scatter_reduce(0, sub_seg, fz, "amax") > inf.scatter_reduce(0, sub_seg, fz, "amin")) & (
            (-inf).scatter_reduce(0, sub_seg, sz, "amax") > inf.scatter_reduce(0, sub_seg, sz, "amin"))
    else:
        cz = obj.count
        xm, ym = obj.mean(f), obj.mean(s)
        sxx, syy = ss[p], ss[q]
        sxy = obj.sum(centred[p] * centred[q])
        ptp = (vmax[p] > vmin[p]) & (vmax[q] > vmin[q])
    xvar, yvar, covar = sxx / (cz - 1), syy / (cz - 1), sxy / (cz - 1)
    num = (yvar - xvar) + torch.sqrt((yvar - xvar) * (yvar - xvar) + 4 * (covar * covar))
    a = num / (2 * covar)
    b = ym - a * xm
    ok = (obj.count >= 3) & (cz >= 3) & ptp & (covar.abs() > 8 * EPS * torch.maximum(xvar, yvar))
    ok &= torch.isfinite(a) & torch.isfinite(b)
    return a, b, ok


def costes(obj: Objects, values: torch.Tensor, pairs: list[tuple[int, int]], scale_max: int = 65535,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Costes_1 and Costes_2, (len(pairs), n) each, of channel pairs (p, q) of ``values``.

    values: (C, P) channels at the objects' pixels, in [0, 1]. For a pair (p, q) the first channel
    is p: Costes_1 is the fraction of p's intensity above both thresholds, Costes_2 that of q.
    """
    n, seg, dev = obj.n, obj.seg, values.device
    C, P = values.shape
    K, S = len(pairs), float(scale_max)
    G = K * n
    nan = torch.full((K, n), float("nan"), dtype=F64, device=dev)
    if K == 0 or n == 0 or P == 0:
        return nan, nan.clone()
    centred = values - obj.expand(obj.mean(values))
    ss = obj.sum(centred * centred)
    vmax, vmin = obj.max(values), obj.min(values)
    zero = values == 0
    span = scale_max + 7  # grid steps -2 .. scale + 4, stored as 0 .. scale + 6 within a group's key range

    # Each pixel's first grid threshold at which it joins the background set, for f and for s.
    c_first = {}
    for c in sorted({p for p, _ in pairs}):
        f = values[c]
        c_first[c] = _first_grid_step(f, lambda m, i, f=f: f[i] < m / S, scale_max)
    a_all = torch.empty((K, n), dtype=F64, device=dev)
    b_all = torch.empty((K, n), dtype=F64, device=dev)
    ok_all = torch.empty((K, n), dtype=torch.bool, device=dev)
    # Per pair, sort each object's pixels by the grid step at which they join the background;
    # all pairs' sorted pixels then form one array with prefix sums of the centred values.
    key_sorted = torch.empty(K * P, dtype=torch.int64, device=dev)
    xs = torch.empty(K * P, dtype=F64, device=dev)
    ys = torch.empty(K * P, dtype=F64, device=dev)
    for k, (p, q) in enumerate(pairs):
        a, b, ok = _regression(obj, values, centred, p, q, ss, vmax, vmin, zero)
        a_all[k], b_all[k], ok_all[k] = a, b, ok
        s = values[q]
        pa, pb = obj.expand(a), obj.expand(b)
        up = obj.expand(ok & (a > 0))
        u = torch.where(up, (s - pb) / pa, torch.full_like(s, S + 10))
        c_s = _first_grid_step(u, lambda m, i: s[i] < pa[i] * (m / S) + pb[i], scale_max)
        c = torch.minimum(c_first[p], c_s).clamp_(-2, scale_max + 4).add_(2).to(torch.int64)
        block = slice(k * P, (k + 1) * P)
        key_sorted[block], order = _pack_sort((seg + k * n) * span + c)
        xs[block] = centred[p][order]
        ys[block] = centred[q][order]
    pos = (ok_all & (a_all > 0)).reshape(-1)
    neg = (ok_all & (a_all < 0)).reshape(-1)
    ok = ok_all.reshape(-1)
    a_flat, b_flat = a_all.reshape(-1), b_all.reshape(-1)
    cx, cy, cxy = _cumsum0(xs), _cumsum0(ys), _cumsum0(xs * ys)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev),
                        torch.cumsum(obj.count.to(torch.int64).repeat(K), 0)[:-1]])
    # A prefix is constant in f while it ends before the group's first change of value (centred
    # values change exactly where the values do).
    change_f, change_s = _first_change(xs, starts), _first_change(ys, starts)
    del xs, ys
    group_base = torch.arange(G, device=dev) * span

    def evaluate_pos(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Groups with a > 0: is the background correlation at threshold m defined, and negative."""
        end = torch.searchsorted(key_sorted, group_base + (m.to(torch.int64).clamp(-3, scale_max + 4) + 3))
        k = end - starts
        sx, sy, sxy = cx[end] - cx[starts], cy[end] - cy[starts], cxy[end] - cxy[starts]
        cov = sxy - sx * sy / k.clamp(min=1)
        defined = (k >= 3) & (end > change_f) & (end > change_s)
        return defined, cov < 0

    neg_groups = torch.nonzero(neg).squeeze(1)
    neg_pix = None
    if neg_groups.numel():  # pixels of the negative-slope groups, evaluated directly
        kk = torch.div(neg_groups, n, rounding_mode="floor")
        obj_mask = torch.zeros((K, n), dtype=torch.bool, device=dev)
        obj_mask[kk, neg_groups - kk * n] = True
        sel = obj_mask[:, seg]  # (K, P)
        pk, pp = torch.nonzero(sel, as_tuple=True)
        pf = torch.tensor([p for p, _ in pairs], device=dev)[pk]
        pq = torch.tensor([q for _, q in pairs], device=dev)[pk]
        gi = pk * n + seg[pp]
        neg_pix = (gi, values[pf, pp], values[pq, pp], centred[pf, pp], centred[pq, pp])

    def evaluate_neg(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gi, fi, si, xi, yi = neg_pix
        t = (m / S)[gi]
        inb = (fi < t) | (si < a_flat[gi] * t + b_flat[gi])
        w = inb.to(F64)

        def gsum(v):
            return torch.zeros(G, dtype=F64, device=dev).index_add_(0, gi, v)

        k = gsum(w)
        cov = gsum(xi * yi * w) - gsum(xi * w) * gsum(yi * w) / k.clamp(min=1)
        inf = torch.full((G,), float("inf"), dtype=F64, device=dev)
        ninf = torch.full_like(fi, -float("inf"))
        pinf = torch.full_like(fi, float("inf"))
        fmax = (-inf).scatter_reduce(0, gi, torch.where(inb, fi, ninf), "amax")
        fmin = inf.scatter_reduce(0, gi, torch.where(inb, fi, pinf), "amin")
        smax = (-inf).scatter_reduce(0, gi, torch.where(inb, si, ninf), "amax")
        smin = inf.scatter_reduce(0, gi, torch.where(inb, si, pinf), "amin")
        return (k >= 3) & (fmax > fmin) & (smax > smin), cov < 0

    def evaluate(m):
        defined, negative = evaluate_pos(m)
        if neg_pix is not None:
            d2, n2 = evaluate_neg(m)
            defined, negative = torch.where(pos, defined, d2), torch.where(pos, negative, n2)
        return defined, negative

    # cp_measure's bisection_costes, every group at once (the bounds are integer-valued floats).
    left = torch.ones(G, dtype=F64, device=dev)
    right = torch.full((G,), S, dtype=F64, device=dev)
    mid = torch.div(right - left, 6 / 5, rounding_mode="floor") + left
    lastmid = torch.zeros(G, dtype=F64, device=dev)
    valid = torch.full((G,), float("nan"), dtype=F64, device=dev)
    active = ok.clone()
    for _ in range(256):
        if not bool(active.any()):
            break
        defined, negative = evaluate(mid)
        up = active & (~defined | negative)
        down = active & ~(~defined | negative)
        left = torch.where(up, mid - 1, left)
        right = torch.where(down, mid + 1, right)
        valid = torch.where(down, mid, valid)
        lastmid = torch.where(active, mid, lastmid)
        divisor = torch.where(right - left > 6, torch.full_like(mid, 6 / 5), torch.full_like(mid, 2.0))
        mid = torch.where(active, torch.div(right - left, divisor, rounding_mode="floor") + left, mid)
        active &= lastmid != mid
    found = ok & ~active & torch.isfinite(valid)
    m_final = torch.where(found, valid - 1, torch.zeros_like(valid))
    found &= evaluate(m_final)[0]  # cp_measure checks the background correlation there once more

    thr_f = (m_final / S).reshape(K, n)
    thr_s = a_all * thr_f + b_all
    c1, c2 = nan.clone(), nan.clone()
    for k, (p, q) in enumerate(pairs):
        f, s = values[p], values[q]
        tf, ts = obj.expand(thr_f[k]), obj.expand(thr_s[k])
        both = (f > tf) & (s > ts)
        tot_f = obj.sum(f * (f >= tf))
        tot_s = obj.sum(s * (s >= ts))
        good = found[k * n:(k + 1) * n] & (tot_f > 0) & (tot_s > 0)
        c1[k] = torch.where(good, obj.sum(f * both) / tot_f, nan[k])
        c2[k] = torch.where(good, obj.sum(s * both) / tot_s, nan[k])
    return c1, c2
