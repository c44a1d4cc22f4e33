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

from cpvs.profile.engine import costes_search
from cpvs.profile.engine.objects import F64, Objects, numpy_path, select, take

EPS = float(np.finfo(float).eps)


def _first_grid_step(q: torch.Tensor, below) -> torch.Tensor:
    """Smallest integer m with ``below(m)`` true (below monotone in m), as float64, given ``q`` (P,)
    the crossing in grid steps: floor(q) + 1, except that estimates within 1e-6 of an integer can be
    off by one, so only those pixels are settled with the exact test. Callers clamp the result.
    """
    c = torch.floor(q)
    frac = q - c
    c += 1
    near = torch.nonzero((frac < 1e-6) | (frac > 1 - 1e-6)).squeeze(1)
    if near.numel():
        cn = c[near]
        cn = torch.where(below(cn, near), cn, cn + 1)
        cn = torch.where(below(cn - 1, near), cn - 1, cn)
        c[near] = cn
    return c


def _first_step_above(f: torch.Tensor, scale: float) -> torch.Tensor:
    """Smallest integer m with ``f < m / scale``, as float64 (callers clamp it).

    Images read from integer TIFFs hold exact quotients ``v / scale``; for those m = v + 1 (the
    rounded quotients of distinct integers by one divisor keep their order strictly), which
    spares the exact test that :func:`_first_grid_step` runs on every near-integer pixel.
    """
    v = torch.round(f * scale)
    exact = v / scale == f
    if bool(exact.all()):
        return v + 1
    c = _first_grid_step(f * scale, lambda m, i: f[i] < m / scale)
    return torch.where(exact, v + 1, c)


def _cumsum0(t: torch.Tensor) -> torch.Tensor:
    """Inclusive cumulative sum with a leading 0: (N,) -> (N + 1,)."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out[0] = 0
    if numpy_path(t):  # numpy's cumsum is faster here
        np.cumsum(t.numpy(), out=out[1:].numpy())
    else:
        torch.cumsum(t, 0, out=out[1:])
    return out


def _first_change(v: torch.Tensor, starts: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """(G,) position of the first value in each group ``v[starts:stops]`` that differs from the group's
    first value (``stops`` if none): a group prefix ending at or before it is constant.

    Values are checked in windows after each group's start, doubling in width, for the groups still
    undecided: most groups change within the first few values, so this reads a few per group.
    """
    out = stops.clone()
    todo = torch.nonzero(stops - starts > 1).squeeze(1)
    offset, width, top = 1, 4, max(v.numel() - 1, 0)
    while todo.numel():
        s, e = starts[todo], stops[todo]
        idx = s[:, None] + offset + torch.arange(width, device=v.device)  # (T, width)
        differs = (take(v, idx.clamp(max=top).reshape(-1)).view(idx.shape) != take(v, s)[:, None]) & (idx < e[:, None])
        hit = differs.any(1)
        first = torch.argmax(differs.to(torch.uint8), 1)
        out[todo[hit]] = idx[hit, first[hit]]
        todo = todo[~hit & (s + offset + width < e)]
        offset, width = offset + width, width * 2
    return out


def _regression(obj: Objects, values, centred, p: int, q: int, ss, vmax, vmin, zero, sxy, means):
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
        xm, ym = means[p], means[q]
        sxx, syy = ss[p], ss[q]
        ptp = (vmax[p] > vmin[p]) & (vmax[q] > vmin[q])
    xvar, yvar, covar = sxx / (cz - 1), syy / (cz - 1), sxy / (cz - 1)
    num = (yvar - xvar) + torch.sqrt((yvar - xvar) * (yvar - xvar) + 4 * (covar * covar))
    a = num / (2 * covar)
    b = ym - a * xm
    ok = (obj.count >= 3) & (cz >= 3) & ptp & (covar.abs() > 8 * EPS * torch.maximum(xvar, yvar))
    ok &= torch.isfinite(a) & torch.isfinite(b)
    return a, b, ok


class _Prefix:
    """Pixels sorted by (group, grid step) with prefix sums of their centred channel values, so
    that the sums over the pixels of every group whose step is <= m cost one binary search per group.

    parts: (pair k, packed) with packed (M,) int64 ``(object * span + step + 2) << bits | pixel`` (steps
    -2 .. scale + 4) for pixels of pair k; centred: (C, P); pairs: the (first, second) channel of
    each pair; n objects. Each pair's keys are one sort of plain integers (the pixel rides along in the
    low bits); pairs follow one another, so the group of pair k, object i is k * n + i.
    """

    def __init__(self, parts: list[tuple[int, torch.Tensor]], bits: int, centred: torch.Tensor,
                 pairs: list[tuple[int, int]], n: int, span: int, groups: int):
        dev = centred.device
        size = sum(t.numel() for _, t in parts)
        self.key = torch.empty(size, dtype=torch.int64, device=dev)
        self.x = torch.empty(size, dtype=F64, device=dev)
        self.y = torch.empty(size, dtype=F64, device=dev)
        at, low = 0, (1 << bits) - 1
        if numpy_path(centred):
            self.block = torch.empty((3, size + 1), dtype=F64)  # what the compiled search reads
            self.block[:, 0] = 0  # the pass writes the rest
            self.cums = list(self.block)
            arrays = [t.numpy() for t in (self.key, self.x, self.y, *self.cums)]
            for k, packed in parts:
                p, q = pairs[k]
                costes_search.unpack_and_sum(np.sort(packed.numpy()), bits, k * n * span, centred[p].numpy(), centred[q].numpy(), at, *arrays)
                at += packed.numel()
        else:
            for k, packed in parts:
                packed = torch.sort(packed).values
                pix = packed & low
                end = at + packed.numel()
                torch.add(packed >> bits, k * n * span, out=self.key[at:end])
                p, q = pairs[k]
                self.x[at:end] = centred[p][pix]
                self.y[at:end] = centred[q][pix]
                at = end
            self.cums = [_cumsum0(t) for t in (self.x, self.y, self.x * self.y)]
        self.base = torch.arange(groups, device=dev) * span
        self.start = torch.searchsorted(self.key, self.base)
        self.stop = torch.cat([self.start[1:], torch.tensor([size], device=dev)])
        self.top = span - 1

    def end(self, m: torch.Tensor) -> torch.Tensor:
        """(G,) position after each group's last pixel with step <= m."""
        return torch.searchsorted(self.key, self.base + (m.to(torch.int64) + 3).clamp(0, self.top))

    def sums(self, end: torch.Tensor) -> list[torch.Tensor]:
        return [c[end] - c[self.start] for c in self.cums]


def costes(obj: Objects, values: torch.Tensor, pairs: list[tuple[int, int]], scale_max: int = 65535,
           cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Costes_1 and Costes_2, (len(pairs), n) each, of channel pairs (p, q) of ``values``.

    values: (C, P) channels at the objects' pixels, in [0, 1]. For a pair (p, q) the first channel
    is p: Costes_1 is the fraction of p's intensity above both thresholds, Costes_2 that of q.
    cov: (len(pairs), n) sums of the products of the centred channels, when the caller has them.

    With t = m / scale_max, the background at step m is B(m) = {f < t} | {s < a t + b}. For a > 0
    it is the set of pixels whose first background step min(c_f, c_s) is <= m: a prefix. For
    a < 0 the s-condition holds up to a step and fails from e on, so the complement of B(m) is
    {e <= m} minus {max(e, c_f) <= m}: a difference of two prefixes.
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
    span = scale_max + 7

    c_first = {c: _first_step_above(values[c], S) for c in sorted({p for p, _ in pairs})}
    # Keys shifted into place in float64 (exact below 2**53), added to a per-pixel base.
    bits = max(int(P).bit_length(), 1)
    if (G * span).bit_length() + bits > 62:
        raise ValueError(f"{K} channel pairs of {n} objects x {P} pixels do not fit one Costes batch; pass fewer pairs")
    scale_bits = float(2 ** bits)
    cf_shifted = {c: (v.clamp(-2, scale_max + 4) + 2) * scale_bits for c, v in c_first.items()}
    base = ((seg * span) << bits) | torch.arange(P, device=dev)
    sums = obj.sum(centred)  # (C, n): zero up to rounding
    means = obj.mean(values)
    a_all = torch.empty((K, n), dtype=F64, device=dev)
    b_all = torch.empty((K, n), dtype=F64, device=dev)
    ok_all = torch.empty((K, n), dtype=torch.bool, device=dev)
    tot = torch.empty((3, K, n), dtype=F64, device=dev)  # sums of x, y, xy over each object
    # Groups with a < 0: the "always background" pixels (e >= c_f) vary in f and in s.
    always_varies = torch.zeros((K, n), dtype=torch.bool, device=dev)
    inf = torch.full((P,), float("inf"), dtype=F64, device=dev)
    pos_parts, neg_parts = [], []
    for k, (p, q) in enumerate(pairs):
        sxy = cov[k] if cov is not None else obj.sum(centred[p] * centred[q])
        a, b, ok = _regression(obj, values, centred, p, q, ss, vmax, vmin, zero, sxy, means)
        a_all[k], b_all[k], ok_all[k] = a, b, ok
        tot[:, k] = torch.stack([sums[p], sums[q], sxy])
        sign = torch.where(ok, torch.sign(a), torch.zeros_like(a))
        if not bool((sign != 0).any()):
            continue
        s, pa, pb, psign = values[q], obj.expand(a), obj.expand(b), obj.expand(sign)
        # The step at which s crosses the line s = a t + b: for a > 0 the first step with s below
        # it, for a < 0 the first step with s no longer below it.
        if numpy_path(s):
            c = torch.empty_like(s)
            costes_search.line_steps(s.contiguous().numpy(), obj.seg.numpy(), a.numpy(), b.numpy(), sign.numpy(), S,
                                     scale_max, scale_bits, c.numpy())
        else:
            c = _first_grid_step((s - pb) * obj.expand(S / a),
                                 lambda m, i: (s[i] < pa[i] * (m / S) + pb[i]) ^ (psign[i] < 0))
            c = (c.clamp_(-2, scale_max + 4) + 2) * scale_bits
        if bool((sign > 0).any()):
            key = base + torch.minimum(cf_shifted[p], c).to(torch.int64)
            pos_parts.append((k, select(key, psign > 0)))
        if bool((sign < 0).any()):
            # Pixels above the line (e < c_f) are out of the background for the steps e .. c_f - 1;
            # the others always in it.
            down = psign < 0
            out = down & (c < cf_shifted[p])
            always = down & ~out
            spread = [obj.max(torch.where(always, v, -inf)) > obj.min(torch.where(always, v, inf)) for v in (values[p], s)]
            always_varies[k] = spread[0] & spread[1]
            neg_parts.append((k, select(base + c.to(torch.int64), out), select(base + cf_shifted[p].to(torch.int64), out)))

    pos_ok = (ok_all & (a_all > 0)).reshape(-1)
    neg_ok = (ok_all & (a_all < 0)).reshape(-1)
    ok = ok_all.reshape(-1)
    tot = tot.reshape(3, G)
    count = obj.count.repeat(K)
    always_varies = always_varies.reshape(-1)
    pf = torch.tensor([p for p, _ in pairs], device=dev)
    pq = torch.tensor([q for _, q in pairs], device=dev)
    pre = pre_e = pre_f = change_f = change_s = None
    if pos_parts:
        pre = _Prefix(pos_parts, bits, centred, pairs, n, span, G)
        # A prefix is constant in f while it ends at or before the group's first change of value
        # (centred values change exactly where the values do).
        change_f, change_s = (_first_change(v, pre.start, pre.stop) for v in (pre.x, pre.y))
        pre.x = pre.y = None
    if neg_parts:
        pre_e = _Prefix([(k, e) for k, e, _ in neg_parts], bits, centred, pairs, n, span, G)
        pre_f = _Prefix([(k, f) for k, _, f in neg_parts], bits, centred, pairs, n, span, G)
        pre_e.x = pre_e.y = pre_f.x = pre_f.y = None
    del pos_parts, neg_parts

    def exact_constant(groups: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """For a few groups: is f or s constant over the background at their step m (bool per group)."""
        kk = torch.div(groups, n, rounding_mode="floor")
        i = groups - kk * n
        cnt = obj.count.to(torch.int64)[i]
        owner = torch.repeat_interleave(torch.arange(len(groups), device=dev), cnt)
        pix = obj.starts[i][owner] + torch.arange(int(cnt.sum()), device=dev) - torch.repeat_interleave(
            torch.cumsum(cnt, 0) - cnt, cnt)
        f, s = values[pf[kk][owner], pix], values[pq[kk][owner], pix]
        t = (m[groups] / S)[owner]
        inb = (f < t) | (s < a_all.reshape(-1)[groups][owner] * t + b_all.reshape(-1)[groups][owner])
        inf = torch.full((len(groups),), float("inf"), dtype=F64, device=dev)

        def spread(v):
            hi = (-inf).scatter_reduce(0, owner, torch.where(inb, v, -inf[owner]), "amax")
            lo = inf.scatter_reduce(0, owner, torch.where(inb, v, inf[owner]), "amin")
            return hi > lo
        return ~(spread(f) & spread(s))

    def evaluate(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per group: is the background correlation at step m defined, and is it negative."""
        defined = torch.zeros(G, dtype=torch.bool, device=dev)
        negative = torch.zeros(G, dtype=torch.bool, device=dev)
        if pos_ok.any():
            end = pre.end(m)
            k = end - pre.start
            sx, sy, sxy = pre.sums(end)
            cov = sxy - sx * sy / k.clamp(min=1)
            defined = torch.where(pos_ok, (k >= 3) & (end > change_f) & (end > change_s), defined)
            negative = torch.where(pos_ok, cov < 0, negative)
        if neg_ok.any():
            end_e, end_f = pre_e.end(m), pre_f.end(m)
            k_above = (end_e - pre_e.start) - (end_f - pre_f.start)
            above = [u - v for u, v in zip(pre_e.sums(end_e), pre_f.sums(end_f))]
            sx, sy, sxy = (t - u for t, u in zip(tot, above))
            k = count - k_above
            cov = sxy - sx * sy / k.clamp(min=1)
            # A constant channel over the background is possible only where the pixels that are
            # always in it do not already vary; those few groups are checked on their pixels.
            flat = torch.zeros_like(defined)
            check = torch.nonzero(neg_ok & (k >= 3) & ~always_varies).squeeze(1)
            if check.numel():
                flat[check] = exact_constant(check, m)
            defined = torch.where(neg_ok, (k >= 3) & ~flat, defined)
            negative = torch.where(neg_ok, cov < 0, negative)
        return defined, negative

    if numpy_path(values):
        m_final, found = costes_search.search_compiled(obj, values, ok, pos_ok, neg_ok, pre, (pre_e, pre_f) if pre_e is not None else None,
                                                       change_f, change_s, tot, count, always_varies, pf, pq,
                                                       a_all.reshape(-1), b_all.reshape(-1), span, S)
    else:
        m_final, found = costes_search.search_lockstep(ok, G, S, evaluate)

    thr_f = (m_final / S).reshape(K, n)
    thr_s = a_all * thr_f + b_all
    if numpy_path(values):
        sums = torch.zeros((K, 4, n), dtype=F64)
        costes_search.coefficient_sums(values.contiguous().numpy(), pf.numpy(), pq.numpy(), thr_f.contiguous().numpy(),
                          thr_s.contiguous().numpy(), obj.starts.numpy(), obj.count.to(torch.int64).numpy(), sums.numpy())
        tot_f, tot_s, over_f, over_s = sums.unbind(1)
        good = found.view(K, n) & (tot_f > 0) & (tot_s > 0)
        return torch.where(good, over_f / tot_f, nan), torch.where(good, over_s / tot_s, nan)
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
