"""Radial intensity distribution per object (CellProfiler MeasureObjectIntensityDistribution) in torch,
as cp_measure's ``get_radial_distribution`` and ``get_radial_zernikes`` compute it.

Geometry (computed once per label image, see :func:`cpvs.profile.engine.texture.cached_on`):

* ``d_edge``: each pixel's Euclidean distance to the nearest pixel of another label (or of
  the background; the field's border is no edge), i.e. scipy's EDT of the object alone;
* the centre: the object's pixel farthest from its edge, the first in row-major order
  among ties (the centre of the largest inscribed circle);
* ``d_centre``: the geodesic distance from the centre inside the object, over 8-connected
  steps of 1 and sqrt(2) (centrosome's ``propagate`` with a flat image); pixels not
  connected to the centre are left out of every measurement;
* each pixel's bin ``floor(bin_count * d_centre / (d_centre + d_edge + 0.001))`` and wedge
  (one of 8, from the signs of dy, dx and whether |dy| > |dx|).

Per channel: FracAtD (the bin's share of the object's intensity), MeanFrac (that share over
the bin's share of pixels) and RadialCV (the coefficient of variation of the 8 wedges' mean
intensities in the bin); and the intensity-weighted Zernike moments (degree 9) of the
object in its minimum enclosing circle: magnitude / pixel count and CellProfiler's phase
``arctan2(real, imag)``.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
import torch

from cpvs.profile.engine import texture
from cpvs.profile.engine import zernike as zk
from cpvs.profile.engine.inner_distance import centres, edge_distance, geodesic
from cpvs.profile.engine.objects import Objects, convex_hulls, enclosing_circles
from cpvs.profile.engine.texture import cached_on, objects

F64 = torch.float64


def keys(distribution: bool = True, zernikes: bool = True, bin_count: int = 4, scaled: bool = True,
         zernike_degree: int = 9) -> list[str]:
    """cp_measure's per-channel keys, in its order."""
    out = []
    if distribution:
        for b in range(bin_count + (0 if scaled else 1)):
            scale = "Overflow" if b == bin_count else f"{b + 1}of{bin_count}"
            out += [f"RadialDistribution_{f}_{scale}" for f in ("FracAtD", "MeanFrac", "RadialCV")]
    if zernikes:
        for n, m in zk.indexes(zernike_degree):
            out += [f"RadialDistribution_ZernikeMagnitude_{n}_{m}", f"RadialDistribution_ZernikePhase_{n}_{m}"]
    return out


def _geometry(obj: Objects, bin_count: int, scaled: bool, maximum_radius: float) -> dict[str, torch.Tensor]:
    """Per-pixel bin and wedge of the pixels connected to their centre.

    Returns ``good`` (G,) positions in ``obj.flat``, ``key`` (G,) = object * (bins * 8) + bin * 8
    + wedge (bins = bin_count + 1, the last one the overflow of unscaled bins) and ``count``
    (n, bins, 8) pixels per key.
    """
    d_edge = edge_distance(obj)
    centre = centres(obj, d_edge)
    d_centre = geodesic(obj, centre)
    good = torch.isfinite(d_centre).nonzero().squeeze(1)
    seg = obj.seg[good]
    dc = d_centre[good]
    if scaled:
        norm = dc / (dc + d_edge[good] + 0.001)
    else:
        norm = dc / maximum_radius
    b = (norm * bin_count).long().clamp(max=bin_count)
    c = centre[seg]
    y, x, cy, cx = obj.y[good], obj.x[good], obj.y[c], obj.x[c]
    wedge = (y > cy).long() + 2 * (x > cx).long() + 4 * ((y - cy).abs() > (x - cx).abs()).long()
    nb = bin_count + 1
    key = (seg * nb + b) * 8 + wedge
    count = torch.bincount(key, minlength=obj.n * nb * 8).view(obj.n, nb, 8).double()
    return {"good": good, "key": key, "count": count}


def _distribution(obj: Objects, values: torch.Tensor, geo: dict[str, torch.Tensor], bin_count: int,
                  scaled: bool) -> dict[str, torch.Tensor]:
    """FracAtD, MeanFrac and RadialCV per bin from the pixel values (P,) of the objects."""
    n, nb = obj.n, bin_count + 1
    total = torch.bincount(geo["key"], weights=values[geo["good"]], minlength=n * nb * 8).view(n, nb, 8)
    count = geo["count"]
    hist, pixels = total.sum(2), count.sum(2)
    frac = hist / hist.sum(1, keepdim=True)
    mean_frac = frac / (pixels / pixels.sum(1, keepdim=True) + np.finfo(float).eps)
    # Wedge means where the wedge has pixels; CV over those (population std), 0 without any
    # wedge or with a zero mean (numpy.ma masks the division there and keeps the numerator, 0).
    seen = count > 0
    means = torch.where(seen, total / count.clamp(min=1), torch.zeros_like(total))
    k = seen.sum(2)
    mu = means.sum(2) / k.clamp(min=1)
    sd = (((means - mu[..., None]) ** 2) * seen).sum(2).div(k.clamp(min=1)).sqrt()
    cv = torch.where((k > 0) & (mu != 0), sd / mu, torch.zeros_like(mu))
    out = {}
    for b in range(bin_count + (0 if scaled else 1)):
        scale = "Overflow" if b == bin_count else f"{b + 1}of{bin_count}"
        out[f"RadialDistribution_FracAtD_{scale}"] = frac[:, b]
        out[f"RadialDistribution_MeanFrac_{scale}"] = mean_frac[:, b]
        out[f"RadialDistribution_RadialCV_{scale}"] = cv[:, b]
    return out


@functools.lru_cache(maxsize=4)
def _zernike_matrix(degree: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(deg+1)², K real and imaginary coefficients taking the moments sum(w u^a v^b) (row a * (deg+1) + b)
    to the sums of V_nm = R_nm(r) / r^m * (v + i u)^m (z = y + i x, as centrosome), K = len(indexes)."""
    size = degree + 1
    idx = zk.indexes(degree)
    re = torch.zeros((size * size, len(idx)), dtype=F64)
    im = torch.zeros((size * size, len(idx)), dtype=F64)
    for k, (n, m) in enumerate(idx):
        top = (n - m) // 2
        for i, c in enumerate(zk._radial_coefficients(n, m)):  # c * (u² + v²)^j
            j = top - i
            for t in range(j + 1):  # (u²)^t (v²)^(j-t)
                for q in range(m + 1):  # (i u)^q v^(m-q)
                    coef = c * math.comb(j, t) * math.comb(m, q)
                    a, b = 2 * t + q, 2 * (j - t) + m - q
                    unit = (1, 1j, -1, -1j)[q % 4]
                    re[a * size + b, k] += coef * unit.real
                    im[a * size + b, k] += coef * unit.imag
    return re, im


def _powers(x: torch.Tensor, degree: int) -> torch.Tensor:
    """(degree + 1, m) x**0 .. x**degree of x (m,), by repeated products (a fraction of ``pow``'s cost)."""
    out = torch.empty((degree + 1, x.numel()), dtype=x.dtype, device=x.device)
    out[0] = 1.0
    for a in range(1, degree + 1):
        torch.mul(out[a - 1], x, out=out[a])
    return out


def _zernike_geometry(obj: Objects, degree: int) -> dict[str, torch.Tensor]:
    """Unit-circle coordinates of every pixel, grouped by object row.

    ``u`` (deg+1, P): powers of x' = (x - cx) / r, zero where x'² + y'² > 1 (cp_measure's
    cut, same expression; NaN for a one-pixel object stays NaN); on CPU instead ``xm`` (P,) x' and
    ``cut`` (P,), from which a compiled pass makes the powers on the fly. ``row`` (P,) index of the
    pixel's (object, row) run, ``first`` (R,) its first pixel; ``v`` (deg+1, R) powers of y' of
    each run; ``row_obj`` (R,) its object, ``obj_first`` (present objects,) each object's first run.
    """
    # the hulls under a shared key: the size/shape modules need the same ones
    hulls = cached_on(obj.labels, ("convex_hulls", obj.n), lambda: convex_hulls(obj.labels, obj.n))
    centres, radii = enclosing_circles(obj.labels, obj.n, hulls)
    r = radii[obj.seg]
    ym = (obj.y - centres[obj.seg, 0]) / r
    xm = (obj.x - centres[obj.seg, 1]) / r
    cut = (xm * xm + ym * ym) > 1
    # pixels are grouped by object and row-major inside it: an (object, row) run is contiguous
    new = torch.ones_like(cut)
    new[1:] = (obj.seg[1:] != obj.seg[:-1]) | (obj.y[1:] != obj.y[:-1])
    row = torch.cumsum(new.long(), 0) - 1
    first = new.nonzero().squeeze(1)
    row_obj = obj.seg[first]
    # each present object's rows are consecutive too: its first row
    obj_first = torch.cat([torch.ones(1, dtype=torch.bool, device=obj.device), row_obj[1:] != row_obj[:-1]]).nonzero().squeeze(1)
    geo = {"row": row, "first": first, "v": _powers(ym[first], degree), "row_obj": row_obj,
           "obj_first": obj_first, "present": obj.present}
    if _compiled(xm):
        geo |= {"xm": xm.contiguous(), "cut": cut}
    else:
        geo["u"] = torch.where(cut, 0.0, _powers(xm, degree))  # (deg+1, P): runs of a row are contiguous
    return geo


def _compiled(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and texture.NUMPY_ON_CPU


@numba.njit(cache=True, nogil=True)
def _row_power_sums(xm, cut, values, row, out):
    """out (deg+1, R) += sums over each row run of x'^a * value (0 where cut), in one pass: the
    torch path's (deg+1, P) products, without storing them."""
    for p in range(xm.size):
        if cut[p]:
            continue
        x, v, r = xm[p], values[p], row[p]
        pw = 1.0
        for a in range(out.shape[0]):
            if a:
                pw = pw * x
            out[a, r] += pw * v


def _run_sums(x: torch.Tensor, index: torch.Tensor, starts: torch.Tensor, n: int) -> torch.Tensor:
    """Sums of x (k, P) over consecutive runs of its columns (run of each column: index (P,), first
    columns: starts (n,), all runs non-empty): (k, n). numpy's reduceat on the CPU (several times
    faster than a scatter), index_add elsewhere."""
    if x.device.type == "cpu" and texture.NUMPY_ON_CPU:
        return torch.from_numpy(np.add.reduceat(x.numpy(), starts.numpy(), axis=1))
    return torch.zeros((x.shape[0], n), dtype=x.dtype, device=x.device).index_add_(1, index, x)


def _zernikes(obj: Objects, values: torch.Tensor, degree: int) -> dict[str, torch.Tensor]:
    """Intensity-weighted Zernike magnitudes (/ pixel count) and phases in the minimum enclosing circle.

    The sums of w V_nm are linear in the moments sum(w u^a v^b) (a, b <= degree), taken per
    object row first (v is constant along a row), then per object.
    """
    geo = cached_on(obj.labels, ("radial_zernike", obj.n, degree), lambda: _zernike_geometry(obj, degree))
    size = degree + 1
    if "u" in geo:
        rows = _run_sums(geo["u"] * values, geo["row"], geo["first"], geo["v"].shape[1])  # (a, R)
    else:
        rows = torch.zeros((size, geo["v"].shape[1]), dtype=F64)
        _row_power_sums(geo["xm"].numpy(), geo["cut"].numpy(), values.contiguous().numpy(), geo["row"].numpy(), rows.numpy())
    per_row = (rows[:, None, :] * geo["v"][None, :, :]).reshape(size * size, -1)  # (a * size + b, R)
    present = geo["present"]
    moments = torch.zeros((obj.n, size * size), dtype=F64, device=obj.device)
    moments[present] = _run_sums(per_row, geo["row_obj"], geo["obj_first"], int(present.sum())).t()
    re, im = (m.to(obj.device) for m in _zernike_matrix(degree))
    real, imag = moments @ re, moments @ im
    magnitude = torch.sqrt(real * real + imag * imag) / obj.count[:, None]
    phase = torch.atan2(real, imag)  # CellProfiler's argument order, kept for parity
    out = {}
    for i, (n, m) in enumerate(zk.indexes(degree)):
        out[f"RadialDistribution_ZernikeMagnitude_{n}_{m}"] = magnitude[:, i]
        out[f"RadialDistribution_ZernikePhase_{n}_{m}"] = phase[:, i]
    return out


def measure(labels: torch.Tensor, image: torch.Tensor, n: int, distribution: bool = True, zernikes: bool = True,
            bin_count: int = 4, scaled: bool = True, maximum_radius: int = 100, zernike_degree: int = 9) -> dict[str, np.ndarray]:
    """Radial distribution (FracAtD, MeanFrac, RadialCV per bin) and radial Zernikes per object.

    labels (H, W) int64, objects 1..n, 0 = background; image (H, W) float64 in [0, 1].
    Returns cp_measure's keys without the channel (``RadialDistribution_FracAtD_1of4``,
    ``RadialDistribution_ZernikePhase_3_1``, ...) -> (n,) arrays; NaN for an object without pixels.
    """
    obj = objects(labels, n)
    values = obj.pixels(image).to(F64)
    out: dict[str, torch.Tensor] = {}
    if distribution:
        geo = cached_on(labels, ("radial", n, bin_count, scaled, maximum_radius),
                        lambda: _geometry(obj, bin_count, scaled, maximum_radius))
        out.update(_distribution(obj, values, geo, bin_count, scaled))
    if zernikes:
        out.update(_zernikes(obj, values, zernike_degree))
    absent = ~obj.present
    return {k: torch.where(absent, float("nan"), out[k]).cpu().numpy()
            for k in keys(distribution, zernikes, bin_count, scaled, zernike_degree)}
