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

import math

import numpy as np
import torch

from cpvs.profile.engine import zernike as zk
from cpvs.profile.engine.objects import Objects, enclosing_circles
from cpvs.profile.engine.texture import cached_on, objects

F64 = torch.float64
SQRT2 = math.sqrt(2.0)
# 8-neighbourhood (dy, dx) and step length, for the geodesic distance.
NEIGHBOURS = [(dy, dx, SQRT2 if dy and dx else 1.0) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


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


def _positions(obj: Objects) -> torch.Tensor:
    """(H*W,) position of each field pixel in ``obj.flat``, -1 outside objects."""
    h, w = obj.labels.shape
    pos = torch.full((h * w,), -1, dtype=torch.long, device=obj.device)
    pos[obj.flat] = torch.arange(obj.flat.numel(), device=obj.device)
    return pos


def _neighbour(obj: Objects, pos: torch.Tensor, at: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Positions (in ``obj.flat``) of the (dy, dx) neighbours of the pixels at positions ``at``;
    -1 where the neighbour is outside the field or in another object."""
    h, w = obj.labels.shape
    y, x = obj.y[at].long() + dy, obj.x[at].long() + dx
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    q = pos[(y * w + x).clamp(0, h * w - 1)]
    ok = inside & (q >= 0)
    ok &= obj.seg[q.clamp(min=0)] == obj.seg[at]
    return torch.where(ok, q, torch.full_like(q, -1))


def _runs(lab: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index along ``dim`` of the run of equal labels each pixel of (H, W) ``lab`` is in."""
    n = lab.shape[dim]
    idx = torch.arange(n, device=lab.device).view((-1, 1) if dim == 0 else (1, -1)).expand_as(lab)
    prev = lab.narrow(dim, 0, n - 1) != lab.narrow(dim, 1, n - 1)  # a run ends at i, another starts at i + 1
    starts = torch.cat([torch.ones_like(lab.narrow(dim, 0, 1), dtype=torch.bool), prev], dim)
    ends = torch.cat([prev, torch.ones_like(lab.narrow(dim, 0, 1), dtype=torch.bool)], dim)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim).values
    last = torch.cummin(torch.where(ends, idx, torch.full_like(idx, n)).flip(dim), dim).values.flip(dim)
    return first, last


def _edge_distance2(obj: Objects) -> torch.Tensor:
    """(P,) squared Euclidean distance of each object pixel to the nearest pixel of another label.

    Separable and exact: ``g`` is the distance along the row to the nearest other label
    (the run's ends); then ``d² = min over y' of g(y', x)² + (y - y')²``, where rows y'
    outside the pixel's column run give the run's ends directly, and rows inside it are
    scanned outwards only while ``(y - y')²`` can still beat the best so far.
    """
    lab = obj.labels
    h, w = lab.shape
    inf = torch.tensor(float("inf"), dtype=F64, device=lab.device)
    y, x = obj.y.long(), obj.x.long()

    def ends(first, last, c, size):
        before = torch.where(first > 0, (c - first + 1).double(), inf)
        after = torch.where(last < size - 1, (last - c + 1).double(), inf)
        return torch.minimum(before, after)

    rf, rl = _runs(lab, 1)
    g = ends(rf.reshape(-1)[obj.flat], rl.reshape(-1)[obj.flat], x, w)
    g2 = torch.full((h * w,), float("inf"), dtype=F64, device=lab.device)
    g2[obj.flat] = g * g
    cf, cl = _runs(lab, 0)
    top, bottom = cf.reshape(-1)[obj.flat], cl.reshape(-1)[obj.flat]
    best = torch.minimum(ends(top, bottom, y, h) ** 2, g * g)
    active = torch.arange(obj.flat.numel(), device=lab.device)
    dy = 1
    while True:
        active = active[best[active] > dy * dy]
        if active.numel() == 0:
            return best
        f, yy = obj.flat[active], y[active]
        up = torch.where(yy - dy >= top[active], g2[(f - dy * w).clamp(min=0)] + dy * dy, inf)
        down = torch.where(yy + dy <= bottom[active], g2[(f + dy * w).clamp(max=h * w - 1)] + dy * dy, inf)
        best[active] = torch.minimum(best[active], torch.minimum(up, down))
        dy += 1


def _centres(obj: Objects, d2: torch.Tensor) -> torch.Tensor:
    """(n,) position in ``obj.flat`` of each object's farthest-from-edge pixel, first in row-major order."""
    top = torch.full((obj.n,), -1.0, dtype=F64, device=obj.device).scatter_reduce(0, obj.seg, d2, "amax")
    cand = torch.where(d2 == top[obj.seg], torch.arange(d2.numel(), device=obj.device), torch.full_like(obj.seg, d2.numel()))
    return torch.full((obj.n,), d2.numel(), dtype=torch.long, device=obj.device).scatter_reduce(0, obj.seg, cand, "amin")


def _geodesic(obj: Objects, pos: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:
    """(P,) geodesic distance from the object's centre over 8-connected steps of 1 and sqrt(2); inf if unreachable.

    The octile distance (the shortest path without walls) is a lower bound; where it satisfies
    ``d(p) = min over neighbours in the object (d(q) + step)`` at every pixel but the centre,
    it is the exact distance (the minimising neighbours form a path to the centre). Objects
    where it does not (concave, rings, pieces) are solved by label-correcting relaxation from
    their centre, one wave of small ops per step of path length.
    """
    has = centre < obj.seg.numel()
    cy, cx = obj.y[centre.clamp(max=obj.seg.numel() - 1)], obj.x[centre.clamp(max=obj.seg.numel() - 1)]
    ady, adx = (obj.y - cy[obj.seg]).abs(), (obj.x - cx[obj.seg]).abs()
    lo, hi = torch.minimum(ady, adx), torch.maximum(ady, adx)
    d = (hi - lo) + lo * SQRT2
    everyone = torch.arange(d.numel(), device=d.device)
    support = torch.full_like(d, float("inf"))
    for dy, dx, step in NEIGHBOURS:
        q = _neighbour(obj, pos, everyone, dy, dx)
        support = torch.minimum(support, torch.where(q >= 0, d[q.clamp(min=0)] + step, torch.full_like(d, float("inf"))))
    is_centre = torch.zeros_like(has[obj.seg])
    is_centre[centre[has]] = True
    broken = (support > d + 1e-9) & ~is_centre
    bad = torch.zeros(obj.n, dtype=torch.bool, device=d.device)
    bad[obj.seg[broken]] = True
    if not bool(bad.any()):
        return d
    redo = bad[obj.seg]
    d[redo] = float("inf")
    front = centre[bad & has]
    d[front] = 0.0
    owner = torch.full_like(obj.seg, -1)
    while front.numel():
        cand_q, cand_d = [], []
        for dy, dx, step in NEIGHBOURS:
            q = _neighbour(obj, pos, front, dy, dx)
            ok = q >= 0
            q, v = q[ok], d[front[ok]] + step
            better = v < d[q] - 1e-12
            cand_q.append(q[better])
            cand_d.append(v[better])
        q, v = torch.cat(cand_q), torch.cat(cand_d)
        d.scatter_reduce_(0, q, v, "amin")
        # one entry per improved pixel for the next wave
        owner[q] = torch.arange(q.numel(), device=q.device)
        front = q[owner[q] == torch.arange(q.numel(), device=q.device)]
    return d


def _geometry(obj: Objects, bin_count: int, scaled: bool, maximum_radius: float) -> dict[str, torch.Tensor]:
    """Per-pixel bin and wedge of the pixels connected to their centre.

    Returns ``good`` (G,) positions in ``obj.flat``, ``key`` (G,) = object * (bins * 8) + bin * 8
    + wedge (bins = bin_count + 1, the last one the overflow of unscaled bins) and ``count``
    (n, bins, 8) pixels per key.
    """
    pos = cached_on(obj.labels, ("positions", obj.n), lambda: _positions(obj))
    d2 = _edge_distance2(obj)
    centre = _centres(obj, d2)
    d_centre = _geodesic(obj, pos, centre)
    good = torch.isfinite(d_centre).nonzero().squeeze(1)
    seg = obj.seg[good]
    dc = d_centre[good]
    if scaled:
        norm = dc / (dc + d2[good].sqrt() + 0.001)
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


def _zernikes(obj: Objects, values: torch.Tensor, degree: int) -> dict[str, torch.Tensor]:
    """Intensity-weighted Zernike magnitudes (/ pixel count) and phases in the minimum enclosing circle."""
    centres, radii = cached_on(obj.labels, ("enclosing_circles", obj.n), lambda: enclosing_circles(obj.labels, obj.n))
    real, imag = zk.moment_sums(obj, centres, radii, weight=values, order=degree)
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
    ``RadialDistribution_ZernikePhase_3_1``, ...) -> (n,) arrays.
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
    return {k: out[k].cpu().numpy() for k in keys(distribution, zernikes, bin_count, scaled, zernike_degree)}
