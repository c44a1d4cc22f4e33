"""Zernike shape features (MeasureObjectSizeShape): magnitudes of the Zernike moments, up to
order 9, of each object's binary image inside its minimum enclosing circle.

As cp_measure: pixel coordinates relative to the circle's centre are divided by its radius;
pixels with r² > 1 (by the same floating-point expression) are left out; the score is
|sum of V_nm over the object's pixels| / (pi r²), with V_nm = R_nm(r) e^{i m theta} and
z = y + i x. The radial polynomials are evaluated by Horner's scheme in r² as centrosome does.
"""

from __future__ import annotations

import math

import numba
import torch

from cpvs.profile.engine.objects import F64, Hulls, Objects, enclosing_circles, numpy_path

ORDER = 9


def indexes(order: int = ORDER) -> list[tuple[int, int]]:
    """(n, m) for n = 0..order, m = n % 2 .. n step 2: centrosome's ``get_zernike_indexes(order + 1)``."""
    return [(n, m) for n in range(order + 1) for m in range(n % 2, n + 1, 2)]


def _radial_coefficients(n: int, m: int) -> list[float]:
    """Coefficients of R_nm(r) / r^m as a polynomial in r², highest power first (for Horner)."""
    return [(-1) ** k * math.factorial(n - k) / (math.factorial(k) * math.factorial((n + m) // 2 - k)
                                                   * math.factorial((n - m) // 2 - k)) for k in range((n - m) // 2 + 1)]


def _combination(order: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """The (j, m) of the power sums r^(2j) z^m needed up to ``order``, and the (J, K) matrix taking
    their per-object sums to those of V_nm (Horner's coefficients of R_nm / r^m in r²)."""
    idx = indexes(order)
    powers = [(j, m) for m in range(order + 1) for j in range((order - m) // 2 + 1)]
    col = {jm: i for i, jm in enumerate(powers)}
    A = torch.zeros((len(powers), len(idx)), dtype=F64)
    for k, (n, m) in enumerate(idx):
        cs = _radial_coefficients(n, m)
        top = (n - m) // 2
        for i, c in enumerate(cs):  # c multiplies r^(2 (top - i))
            A[col[(top - i, m)], k] = c
    return powers, A


@numba.njit(cache=True, nogil=True)
def _power_sums(seg, base, ym, xm, r2, order, sums):
    """:func:`moment_sums`' power sums in one pass over the pixels (the torch path makes ~60 pixel-sized
    arrays): the same products per pixel, accumulated per object into sums (n, 2 J)."""
    J = sums.shape[1] // 2
    for p in range(seg.size):
        o, y, x, q = seg[p], ym[p], xm[p], r2[p]
        zr, zi = base[p], 0.0
        c = 0
        for m in range(order + 1):
            if m:
                zr, zi = zr * y - zi * x, zr * x + zi * y
            pr, pi = zr, zi
            for j in range((order - m) // 2 + 1):
                if j:
                    pr, pi = pr * q, pi * q
                sums[o, c] += pr
                if m:
                    sums[o, J + c] += pi
                c += 1


def moment_sums(obj: Objects, centers: torch.Tensor, radii: torch.Tensor, weight: torch.Tensor | None = None,
                order: int = ORDER) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-object real and imaginary sums of V_nm over the pixels inside the unit circle: (n, K) each,
    K = len(indexes(order)), in that order.

    centers (n, 2) (y, x) and radii (n,) from :func:`enclosing_circles`; weight (P,) scales each
    pixel (an intensity, for the radial-distribution Zernikes), default 1. The sums of the power
    products r^(2j) z^m are taken over pixels in one pass, then combined into the V_nm.
    """
    powers, A = _combination(order)
    J = len(powers)
    ym = (obj.y - obj.expand(centers[:, 0])) / obj.expand(radii)
    xm = (obj.x - obj.expand(centers[:, 1])) / obj.expand(radii)
    r2 = xm * xm + ym * ym
    # cp_measure drops r² > 1 (pixels on the circle, by rounding); NaN (radius 0) stays NaN.
    base = torch.where(r2 > 1, torch.zeros_like(r2), torch.ones_like(r2))
    if weight is not None:
        base = base * weight
    sums = torch.zeros((obj.n, 2 * J), dtype=F64, device=obj.device)
    if numpy_path(base):
        _power_sums(obj.seg.numpy(), base.numpy(), ym.numpy(), xm.numpy(), r2.numpy(), order, sums.numpy())
        A = A.to(obj.device)
        return sums[:, :J] @ A, sums[:, J:] @ A
    zr, zi = base, torch.zeros_like(base)  # base * z^m
    c = 0
    for m in range(order + 1):
        if m:
            zr, zi = zr * ym - zi * xm, zr * xm + zi * ym
        pr, pi = zr, zi
        for j in range((order - m) // 2 + 1):
            if j:
                pr, pi = pr * r2, pi * r2
            sums[:, c] = obj.sum(pr)
            if m:
                sums[:, J + c] = obj.sum(pi)
            c += 1
    A = A.to(obj.device)
    return sums[:, :J] @ A, sums[:, J:] @ A


def measure(obj: Objects, hulls: Hulls | None = None) -> dict[str, torch.Tensor]:
    """``Zernike_n_m`` -> (n,) float64 shape features of every object."""
    centers, radii = enclosing_circles(obj.labels, obj.n, hulls)
    real, imag = moment_sums(obj, centers, radii)
    score = torch.sqrt(real ** 2 + imag ** 2) / (math.pi * radii * radii)[:, None]
    return {f"Zernike_{n}_{m}": score[:, k] for k, (n, m) in enumerate(indexes())}
