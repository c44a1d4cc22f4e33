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

import numpy as np
import torch

from cpvs.profile.engine import texture
from cpvs.profile.engine import zernike as zk
from cpvs.profile.engine.objects import Objects, convex_hulls, enclosing_circles
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


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CPU shortcuts (numpy / scipy kernels; see ``texture.NUMPY_ON_CPU``)."""
    return t.device.type == "cpu" and texture.NUMPY_ON_CPU


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for a 1-D ``values`` and an index of any shape (index_select: several times
    faster than advanced indexing on the CPU)."""
    return torch.index_select(values, 0, index.reshape(-1)).view(index.shape)


def _positions(obj: Objects) -> torch.Tensor:
    """(H*W + 1,) position of each field pixel in ``obj.flat``; -1 off the objects and at the last
    entry, which stands for any pixel outside the field."""
    h, w = obj.labels.shape
    pos = torch.full((h * w + 1,), -1, dtype=torch.long, device=obj.device)
    pos[obj.flat] = torch.arange(obj.flat.numel(), device=obj.device)
    return pos


def _neighbours(obj: Objects, pos: torch.Tensor, at: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Positions of the (dy, dx) neighbours (broadcast with ``at``) of the pixels at positions ``at``;
    -1 where the neighbour is outside the field or in another object."""
    h, w = obj.labels.shape
    y, x = _take(obj.y, at).long() + dy, _take(obj.x, at).long() + dx
    inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
    q = _take(pos, torch.where(inside, y * w + x, h * w))
    same = _take(obj.seg, q.clamp(min=0)) == _take(obj.seg, at)
    return torch.where(same, q, -1)


def _runs(lab: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last column of the run of equal labels each pixel of (H, W) ``lab`` is in, (H, W) each."""
    w = lab.shape[1]
    idx = torch.arange(w, dtype=torch.int32, device=lab.device).expand_as(lab)
    change = lab[:, 1:] != lab[:, :-1]  # a run ends at x, the next starts at x + 1
    edge = torch.ones_like(lab[:, :1], dtype=torch.bool)
    starts, ends = torch.cat([edge, change], 1), torch.cat([change, edge], 1)
    first = torch.cummax(idx * starts, 1).values
    last = w - 1 - torch.cummax(idx * ends.flip(1), 1).values.flip(1)
    return first, last


def _edge_distance2(obj: Objects) -> torch.Tensor:
    """(P,) squared Euclidean distance of each object pixel to the nearest pixel of another label.

    Separable and exact: ``g`` is the distance along the row to the nearest other label
    (the ends of the pixel's run); then ``d² = min over y' of g(y', x)² + (y - y')²``, where
    rows y' outside the pixel's column run give the run's ends directly, and rows inside it
    are scanned outwards only while ``(y - y')²`` can still beat the best so far (a few
    passes over fewer and fewer pixels: most are near an edge).
    """
    lab = obj.labels
    h, w = lab.shape
    dev = lab.device
    inf = torch.tensor(float("inf"), dtype=F64, device=dev)
    y, x = obj.y.long(), obj.x.long()

    def ends(first, last, c, size):
        before = torch.where(first > 0, (c - first + 1).double(), inf)
        after = torch.where(last < size - 1, (last - c + 1).double(), inf)
        return torch.minimum(before, after)

    rf, rl = _runs(lab)
    g = ends(_take(rf.reshape(-1), obj.flat), _take(rl.reshape(-1), obj.flat), x, w)
    g2 = torch.full((h * w,), float("inf"), dtype=F64, device=dev)
    g2[obj.flat] = g * g
    cf, cl = _runs(lab.t().contiguous())  # columns as rows of the transpose: cummax along a row is fast
    flat_t = x * h + y
    top, bottom = _take(cf.reshape(-1), flat_t).long(), _take(cl.reshape(-1), flat_t).long()
    best = torch.minimum(ends(top, bottom, y, h) ** 2, g * g)
    # the scan over y' on the pixels still open, compacted when enough have closed
    state = torch.stack([torch.arange(best.numel(), device=dev), obj.flat, y, top, bottom])  # (5, A)
    cur = best.clone()
    dy = 1
    while state.shape[1]:
        open_ = cur > dy * dy
        if int(open_.sum()) < 0.75 * state.shape[1]:
            best.index_copy_(0, state[0], cur)
            keep = open_.nonzero().squeeze(1)
            state, cur = torch.index_select(state, 1, keep), torch.index_select(cur, 0, keep)
            if not state.shape[1]:
                break
        _, f, yy, t, b = state
        up = torch.where(yy - dy >= t, _take(g2, (f - dy * w).clamp(min=0)), inf)
        down = torch.where(yy + dy <= b, _take(g2, (f + dy * w).clamp(max=h * w - 1)), inf)
        cur = torch.minimum(cur, torch.minimum(up, down) + dy * dy)
        dy += 1
    return best


def _edge_distance(obj: Objects) -> torch.Tensor:
    """(P,) Euclidean distance of each object pixel to the nearest pixel of another label (inf when the
    object has none within the field): scipy's EDT of each object alone on the CPU, the separable
    scan of :func:`_edge_distance2` elsewhere."""
    if not _numpy_path(obj.labels):
        return _edge_distance2(obj).sqrt()
    from scipy.ndimage import distance_transform_edt

    lab = obj.labels.numpy()
    h, w = lab.shape
    out = np.empty(obj.seg.numel())
    has, starts, counts = obj._runs
    box = obj.bbox[has].numpy()
    # One EDT per object on its box grown by one pixel (the nearest other pixel is next to the
    # object): the object's pixels come out row-major, the order of its run in ``obj.flat``.
    for i, s, (y0, x0, y1, x1) in zip(has.nonzero().squeeze(1).tolist(), starts.tolist(), box.tolist()):
        inside = lab[max(y0 - 1, 0):min(y1 + 1, h), max(x0 - 1, 0):min(x1 + 1, w)] == i + 1
        out[s:s + counts[i]] = distance_transform_edt(inside)[inside] if not inside.all() else np.inf
    return torch.from_numpy(out)


def _centres(obj: Objects, d2: torch.Tensor) -> torch.Tensor:
    """(n,) position in ``obj.flat`` of each object's farthest-from-edge pixel, first in row-major order
    (``d2`` the squared distances to the edge, or the distances)."""
    top = torch.full((obj.n,), -1.0, dtype=F64, device=obj.device).scatter_reduce(0, obj.seg, d2, "amax")
    cand = torch.where(d2 == top[obj.seg], torch.arange(d2.numel(), device=obj.device), torch.full_like(obj.seg, d2.numel()))
    return torch.full((obj.n,), d2.numel(), dtype=torch.long, device=obj.device).scatter_reduce(0, obj.seg, cand, "amin")


def _geodesic(obj: Objects, centre: torch.Tensor) -> torch.Tensor:
    """(P,) geodesic distance from the object's centre over 8-connected steps of 1 and sqrt(2); inf if unreachable.

    The octile distance (the shortest path without walls) is a lower bound. Without walls a
    pixel's octile value is reached from the diagonal neighbour towards the centre, or from the
    straight one along the longer axis; a pixel with such a neighbour in its object, along a
    chain of them down to the centre, has its exact distance (the chain is a path that long).
    The other pixels (behind concavities, around holes, in pieces cut off from the centre) are
    relaxed from the exact ones, one wave of small ops per step of path length.
    centre (n,) positions (P for an empty object).
    """
    p = obj.seg.numel()
    dev = obj.device
    pos = cached_on(obj.labels, ("positions", obj.n), lambda: _positions(obj))
    c = _take(centre.clamp(max=p - 1), obj.seg)
    sy, sx = torch.sign(obj.y - _take(obj.y, c)).long(), torch.sign(obj.x - _take(obj.x, c)).long()
    ady, adx = (obj.y - _take(obj.y, c)).abs(), (obj.x - _take(obj.x, c)).abs()
    lo, hi = torch.minimum(ady, adx), torch.maximum(ady, adx)
    d = (hi - lo) + lo * SQRT2
    everyone = torch.arange(p, device=dev)
    diag = _neighbours(obj, pos, everyone, -sy, -sx)
    straight = _neighbours(obj, pos, everyone, torch.where(ady > adx, -sy, 0), torch.where(adx > ady, -sx, 0))
    pred = torch.where((lo > 0) & (diag >= 0), diag, torch.where((hi > lo) & (straight >= 0), straight, p))
    has = centre < p
    pred[centre[has]] = centre[has]
    # pointer jumping to each chain's end: the centre (exact) or the sink p (a dead end)
    pred = torch.cat([pred, torch.tensor([p], device=dev)])
    while True:
        nxt = _take(pred, pred)
        if torch.equal(nxt, pred):
            break
        pred = nxt
    exact = torch.zeros(p + 1, dtype=torch.bool, device=dev)
    exact[centre[has]] = True
    exact = _take(exact, pred[:p])
    if bool(exact.all()):
        return d
    # Relax the other pixels ("rest", indexed locally) from their exact neighbours, wave by wave.
    dy = torch.tensor([a for a, _, _ in NEIGHBOURS], device=dev)
    dx = torch.tensor([b for _, b, _ in NEIGHBOURS], device=dev)
    step = torch.tensor([s for _, _, s in NEIGHBOURS], dtype=F64, device=dev)
    rest = (~exact).nonzero().squeeze(1)
    local = torch.full((p + 1,), -1, dtype=torch.long, device=dev)  # rest-local index; -1 elsewhere (and at -1)
    local[rest] = torch.arange(rest.numel(), device=dev)
    nb_rest = _neighbours(obj, pos, rest[:, None], dy, dx)  # (R, 8) global
    sources = nb_rest[nb_rest >= 0].unique()
    sources = sources[_take(exact, sources)]  # exact pixels next to the rest
    into = lambda nb: _take(local, torch.where(nb >= 0, nb, p))  # noqa: E731  (global -> rest-local)
    table = into(nb_rest)  # (R, 8): each rest pixel's rest neighbours
    q, v = into(_neighbours(obj, pos, sources[:, None], dy, dx)), _take(d, sources)[:, None] + step
    if _numpy_path(d):
        return d.index_copy(0, rest, _dijkstra(table, q, v, step))
    dist = torch.full((rest.numel(),), float("inf"), dtype=F64, device=dev)
    owner = torch.full((rest.numel(),), -1, dtype=torch.long, device=dev)
    while True:
        better = (q >= 0) & (v < _take(dist, q.clamp(min=0)) - 1e-12)
        q, v = q[better], v[better]
        if not q.numel():
            break
        dist.scatter_reduce_(0, q, v, "amin")
        owner[q] = torch.arange(q.numel(), device=dev)  # one entry per improved pixel
        front = q[owner[q] == torch.arange(q.numel(), device=dev)]
        q, v = table[front], _take(dist, front)[:, None] + step
    return d.index_copy(0, rest, dist)


def _dijkstra(table: torch.Tensor, q: torch.Tensor, v: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Shortest paths (scipy's Dijkstra, CPU) over the rest pixels: ``table`` (R, 8) each one's
    neighbours (-1: none), ``step`` (8,) the step lengths; a path starts at a rest pixel ``q`` (S, 8)
    at distance ``v`` (from an exact neighbour). (R,) distances, inf where unreachable. The sums
    are those of the wave relaxation: the start's value, then one step length after another."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import dijkstra

    t, q, v, step = table.numpy(), q.numpy().ravel(), v.numpy().ravel(), step.numpy()
    r = t.shape[0]
    start = np.full(r, np.inf)
    np.minimum.at(start, q[q >= 0], v[q >= 0])
    first = np.flatnonzero(np.isfinite(start))
    edge = t >= 0
    rows = np.concatenate([np.nonzero(edge)[0], np.full(first.size, r)])  # node r: a source joined to the starts
    cols = np.concatenate([t[edge], first])
    data = np.concatenate([np.broadcast_to(step, t.shape)[edge], start[first]])
    graph = csr_matrix((data, (rows, cols)), shape=(r + 1, r + 1))
    return torch.from_numpy(dijkstra(graph, directed=True, indices=r)[:r])


def _geometry(obj: Objects, bin_count: int, scaled: bool, maximum_radius: float) -> dict[str, torch.Tensor]:
    """Per-pixel bin and wedge of the pixels connected to their centre.

    Returns ``good`` (G,) positions in ``obj.flat``, ``key`` (G,) = object * (bins * 8) + bin * 8
    + wedge (bins = bin_count + 1, the last one the overflow of unscaled bins) and ``count``
    (n, bins, 8) pixels per key.
    """
    d_edge = _edge_distance(obj)
    centre = _centres(obj, d_edge)
    d_centre = _geodesic(obj, centre)
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
    cut, same expression; NaN for a one-pixel object stays NaN); ``row`` (P,) index of the
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
    u = torch.where(cut, 0.0, _powers(xm, degree))  # (deg+1, P): runs of a row are contiguous
    # pixels are grouped by object and row-major inside it: an (object, row) run is contiguous
    new = torch.ones_like(cut)
    new[1:] = (obj.seg[1:] != obj.seg[:-1]) | (obj.y[1:] != obj.y[:-1])
    row = torch.cumsum(new.long(), 0) - 1
    first = new.nonzero().squeeze(1)
    row_obj = obj.seg[first]
    # each present object's rows are consecutive too: its first row
    obj_first = torch.cat([torch.ones(1, dtype=torch.bool, device=obj.device), row_obj[1:] != row_obj[:-1]]).nonzero().squeeze(1)
    return {"u": u, "row": row, "first": first, "v": _powers(ym[first], degree), "row_obj": row_obj,
            "obj_first": obj_first, "present": obj.present}


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
    rows = _run_sums(geo["u"] * values, geo["row"], geo["first"], geo["v"].shape[1])  # (a, R)
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
