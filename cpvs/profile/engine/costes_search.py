"""Costes' threshold search (cp_measure's ``bisection_costes``) for every group (channel pair x
object) of :func:`cpvs.profile.engine.costes.costes`, and the compiled per-pixel passes around it
on the CPU (each one pass where the torch path takes several pixel-sized operations: the line
crossings, the prefix sums, the final coefficient sums).

* :func:`search_lockstep` (GPU): the groups in lockstep, ~60 rounds of ~40 tensor operations
  over all groups;
* :func:`search_compiled` (CPU): on one core those operations' fixed cost dominates, so each
  group runs its bisection on its own in compiled code, each step a binary search and a few sums
  read from the same prefix arrays: the same floating-point expressions in the same order, so
  the same thresholds.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

F64 = torch.float64


@numba.njit(cache=True, nogil=True)
def unpack_and_sum(packed, bits, offset, cp, cq, at, key, x, y, cx, cy, cxy):
    """:class:`cpvs.profile.engine.costes._Prefix`'s CPU path, one pass per pair instead of seven array operations: from sorted
    packed keys (M,), write key, x, y at ``at`` .. ``at + M`` and continue the running sums of x, y
    and x * y (the same sequential sums as ``np.cumsum``) from their values at ``at``."""
    low = (1 << bits) - 1
    sx, sy, sxy = cx[at], cy[at], cxy[at]
    for i in range(packed.size):
        v = packed[i]
        pix = v & low
        a, b = cp[pix], cq[pix]
        key[at + i] = (v >> bits) + offset
        x[at + i] = a
        y[at + i] = b
        sx += a
        sy += b
        sxy += a * b
        cx[at + i + 1] = sx
        cy[at + i + 1] = sy
        cxy[at + i + 1] = sxy


@numba.njit(cache=True, nogil=True)
def coefficient_sums(values, pf, pq, thr_f, thr_s, starts, counts, out):
    """Per pair k and object: the sums of f >= its threshold, of s >= its own, and of f and of s
    where both are above (out (K, 4, n)), one pass over the object's pixels."""
    for k in range(pf.size):
        for o in range(starts.size):
            tf, ts = thr_f[k, o], thr_s[k, o]
            a, b, c, d = 0.0, 0.0, 0.0, 0.0
            for i in range(starts[o], starts[o] + counts[o]):
                f, s = values[pf[k], i], values[pq[k], i]
                if f >= tf:
                    a += f
                if s >= ts:
                    b += s
                if f > tf and s > ts:
                    c += f
                    d += s
            out[k, 0, o], out[k, 1, o], out[k, 2, o], out[k, 3, o] = a, b, c, d


@numba.njit(cache=True, nogil=True)
def line_steps(s, seg, a, b, sign, S, scale_max, scale_bits, out):
    """Per pixel, the grid step where the second channel s crosses its object's line s = a t + b
    (for a > 0 the first step with s below it, for a < 0 the first with s no longer below it),
    clamped to -2 .. scale_max + 4 and shifted into key position, as the torch path's
    ``_first_grid_step`` (estimates within 1e-6 of an integer settled by the exact comparison)."""
    for i in range(s.size):
        o = seg[i]
        q = (s[i] - b[o]) * (S / a[o])
        c = np.floor(q)
        frac = q - c
        c += 1
        if frac < 1e-6 or frac > 1 - 1e-6:
            if not ((s[i] < a[o] * (c / S) + b[o]) ^ (sign[o] < 0)):
                c += 1
            if (s[i] < a[o] * ((c - 1) / S) + b[o]) ^ (sign[o] < 0):
                c -= 1
        out[i] = (min(max(c, -2.0), scale_max + 4.0) + 2) * scale_bits


@numba.njit(cache=True, nogil=True)
def _end(key, lo, hi, v):
    """First index in [lo, hi) with key >= v (hi if none): the group's slice of searchsorted."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if key[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _floor_div(a, b):
    """Python's (and torch's rounding_mode="floor") float floor division, fmod-based."""
    mod = np.fmod(a, b)
    div = (a - mod) / b
    if mod != 0.0 and ((b < 0.0) != (mod < 0.0)):
        div -= 1.0
    if div != 0.0:
        floor = math.floor(div)
        if div - floor > 0.5:
            floor += 1.0
        return floor
    return math.copysign(0.0, a / b)


@numba.njit(cache=True, nogil=True)
def _flat(g, m, n, S, obj_starts, obj_count, values, pf, pq, a, b):
    """Whether f or s is constant over group g's background at step m (checked on its pixels)."""
    kk = g // n
    i = g - kk * n
    t = m / S
    f_hi, f_lo, s_hi, s_lo = -np.inf, np.inf, -np.inf, np.inf
    for p in range(obj_starts[i], obj_starts[i] + obj_count[i]):
        f, s = values[pf[kk], p], values[pq[kk], p]
        if f < t or s < a[g] * t + b[g]:
            f_hi, f_lo = max(f_hi, f), min(f_lo, f)
            s_hi, s_lo = max(s_hi, s), min(s_lo, s)
    return not (f_hi > f_lo and s_hi > s_lo)


@numba.njit(cache=True, nogil=True)
def _evaluate(g, m, span, top, pos, neg, key_p, start_p, stop_p, cp, change_f, change_s,
              key_e, start_e, stop_e, ce, key_f, start_f, stop_f, cf, tot, count, always_varies,
              n, S, obj_starts, obj_count, values, pf, pq, a, b):
    """(defined, negative) of group g's background correlation at step m, as the torch path's evaluate."""
    v = g * span + min(max(int(m) + 3, 0), top)
    if pos[g]:
        s0 = start_p[g]
        end = _end(key_p, s0, stop_p[g], v)
        k = end - s0
        sx, sy, sxy = cp[0, end] - cp[0, s0], cp[1, end] - cp[1, s0], cp[2, end] - cp[2, s0]
        cov = sxy - sx * sy / max(k, 1)
        return k >= 3 and end > change_f[g] and end > change_s[g], cov < 0
    if neg[g]:
        e0, f0 = start_e[g], start_f[g]
        end_e, end_f = _end(key_e, e0, stop_e[g], v), _end(key_f, f0, stop_f[g], v)
        k_above = (end_e - e0) - (end_f - f0)
        sx = tot[0, g] - ((ce[0, end_e] - ce[0, e0]) - (cf[0, end_f] - cf[0, f0]))
        sy = tot[1, g] - ((ce[1, end_e] - ce[1, e0]) - (cf[1, end_f] - cf[1, f0]))
        sxy = tot[2, g] - ((ce[2, end_e] - ce[2, e0]) - (cf[2, end_f] - cf[2, f0]))
        k = count[g] - k_above
        cov = sxy - sx * sy / max(k, 1.0)
        flat = False
        if k >= 3 and not always_varies[g]:
            flat = _flat(g, m, n, S, obj_starts, obj_count, values, pf, pq, a, b)
        return k >= 3 and not flat, cov < 0
    return False, False


@numba.njit(cache=True, nogil=True)
def bisect(ok, span, top, pos, neg, key_p, start_p, stop_p, cp, change_f, change_s,
           key_e, start_e, stop_e, ce, key_f, start_f, stop_f, cf, tot, count, always_varies,
           n, S, obj_starts, obj_count, values, pf, pq, a, b, m_final, found):
    """cp_measure's bisection_costes per group g with ok[g]: writes m_final[g] (the threshold step)
    and found[g]. Prefix arrays as :class:`cpvs.profile.engine.costes._Prefix` (cp: (3, size + 1)
    cumulative sums of x, y, x * y); a group without pixels in a prefix has start == stop there."""
    for g in range(ok.size):
        m_final[g], found[g] = 0.0, False
        if not ok[g]:
            continue
        left, right = 1.0, S
        mid = _floor_div(right - left, 6 / 5) + left
        lastmid, valid, stopped = 0.0, np.nan, False
        for _ in range(256):
            defined, negative = _evaluate(g, mid, span, top, pos, neg, key_p, start_p, stop_p, cp, change_f, change_s,
                                          key_e, start_e, stop_e, ce, key_f, start_f, stop_f, cf, tot, count,
                                          always_varies, n, S, obj_starts, obj_count, values, pf, pq, a, b)
            if not defined or negative:
                left = mid - 1
            else:
                right = mid + 1
                valid = mid
            lastmid = mid
            mid = _floor_div(right - left, 6 / 5 if right - left > 6 else 2.0) + left
            if lastmid == mid:
                stopped = True
                break
        if stopped and np.isfinite(valid):
            # cp_measure checks the background correlation there once more
            found[g] = _evaluate(g, valid - 1, span, top, pos, neg, key_p, start_p, stop_p, cp, change_f, change_s,
                                 key_e, start_e, stop_e, ce, key_f, start_f, stop_f, cf, tot, count,
                                 always_varies, n, S, obj_starts, obj_count, values, pf, pq, a, b)[0]
            m_final[g] = valid - 1


def search_lockstep(ok: torch.Tensor, G: int, S: float, evaluate) -> tuple[torch.Tensor, torch.Tensor]:
    """cp_measure's bisection_costes, every group at once (the bounds are integer-valued floats):
    the threshold step of each group and whether one was found."""
    dev = ok.device
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
        move_up = ~defined | negative
        left = torch.where(active & move_up, mid - 1, left)
        right = torch.where(active & ~move_up, mid + 1, right)
        valid = torch.where(active & ~move_up, mid, valid)
        lastmid = torch.where(active, mid, lastmid)
        divisor = torch.where(right - left > 6, torch.full_like(mid, 6 / 5), torch.full_like(mid, 2.0))
        mid = torch.where(active, torch.div(right - left, divisor, rounding_mode="floor") + left, mid)
        active &= lastmid != mid
    found = ok & ~active & torch.isfinite(valid)
    m_final = torch.where(found, valid - 1, torch.zeros_like(valid))
    found &= evaluate(m_final)[0]  # cp_measure checks the background correlation there once more
    return m_final, found


def search_compiled(obj, values, ok, pos_ok, neg_ok, pre, pre_neg, change_f, change_s, tot, count,
                     always_varies, pf, pq, a, b, span: int, S: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`search_lockstep` on the CPU, group by group in compiled code (the same numbers)."""
    G = ok.numel()
    none = torch.zeros(G, dtype=torch.int64)
    empty = (torch.zeros(1, dtype=torch.int64), none, none, torch.zeros((3, 1), dtype=F64))

    def arrays(p):
        return empty if p is None else (p.key, p.start, p.stop, p.block)
    pos = arrays(pre) + ((none, none) if pre is None else (change_f, change_s))
    neg = arrays(None) * 2 if pre_neg is None else arrays(pre_neg[0]) + arrays(pre_neg[1])
    m_final, found = torch.zeros(G, dtype=F64), torch.zeros(G, dtype=torch.bool)
    args = (ok, span, span - 1, pos_ok, neg_ok, *pos, *neg, tot.contiguous(), count.contiguous(), always_varies,
            obj.n, S, obj.starts, obj.count.to(torch.int64), values.contiguous(), pf, pq, a.contiguous(), b.contiguous(),
            m_final, found)
    bisect(*(t.numpy() if isinstance(t, torch.Tensor) else t for t in args))
    return m_final, found
