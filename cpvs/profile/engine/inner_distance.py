"""Distances inside objects, for the radial distribution: to the object's edge, and along
8-connected paths from a pixel of the object (see :mod:`cpvs.profile.engine.radial`).

* :func:`edge_distance`: each pixel's Euclidean distance to the nearest pixel of another label
  (or of the background; the field's border is no edge), i.e. scipy's EDT of the object alone;
* :func:`centres`: the object's pixel farthest from its edge, the first in row-major order
  among ties;
* :func:`geodesic`: the distance from that centre inside the object, over 8-connected steps
  of 1 and sqrt(2) (centrosome's ``propagate`` with a flat image); inf where not connected.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from cpvs.profile.engine import texture
from cpvs.profile.engine.objects import Objects
from cpvs.profile.engine.texture import cached_on

F64 = torch.float64
SQRT2 = math.sqrt(2.0)
# 8-neighbourhood (dy, dx) and step length, for the geodesic distance.
NEIGHBOURS = [(dy, dx, SQRT2 if dy and dx else 1.0) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _numpy_path(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the CPU shortcuts (numpy / scipy kernels; see ``texture.NUMPY_ON_CPU``)."""
    return t.device.type == "cpu" and texture.NUMPY_ON_CPU


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[index]`` for a 1-D ``values`` and an index of any shape (index_select: several times
    faster than advanced indexing on the CPU)."""
    return torch.index_select(values, 0, index.reshape(-1)).view(index.shape)


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


def edge_distance2(obj: Objects) -> torch.Tensor:
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


def edge_distance(obj: Objects) -> torch.Tensor:
    """(P,) Euclidean distance of each object pixel to the nearest pixel of another label (inf when the
    object has none within the field): scipy's EDT of each object alone on the CPU, the separable
    scan of :func:`edge_distance2` elsewhere. Remembered per label image (radii and the radial
    distribution use it)."""
    return cached_on(obj.labels, ("edge_distance", obj.n), lambda: _edge_distance(obj))


def _edge_distance(obj: Objects) -> torch.Tensor:
    if not _numpy_path(obj.labels):
        return edge_distance2(obj).sqrt()
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


def centres(obj: Objects, d2: torch.Tensor) -> torch.Tensor:
    """(n,) position in ``obj.flat`` of each object's farthest-from-edge pixel, first in row-major order
    (``d2`` the squared distances to the edge, or the distances)."""
    top = torch.full((obj.n,), -1.0, dtype=F64, device=obj.device).scatter_reduce(0, obj.seg, d2, "amax")
    cand = torch.where(d2 == top[obj.seg], torch.arange(d2.numel(), device=obj.device), torch.full_like(obj.seg, d2.numel()))
    return torch.full((obj.n,), d2.numel(), dtype=torch.long, device=obj.device).scatter_reduce(0, obj.seg, cand, "amin")


def geodesic(obj: Objects, centre: torch.Tensor) -> torch.Tensor:
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
    pos = obj.positions
    if _numpy_path(obj.seg):
        out = torch.empty(p, dtype=F64)
        h, w = obj.labels.shape
        _geodesic_compiled(obj.y.numpy(), obj.x.numpy(), obj.seg.numpy(), pos.numpy(), h, w, centre.numpy(), out.numpy())
        return out
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


@numba.njit(cache=True, nogil=True)
def _geodesic_compiled(ys, xs, seg, pos, h, w, centre, out):
    """:func:`geodesic` on the CPU, the same steps in compiled code: octile distances, the chains
    towards the centre resolved with memory, then Dijkstra (a binary heap) over the other pixels
    from their exact neighbours."""
    P = ys.size

    def _neighbour(ys, xs, seg, pos, h, w, p, dy, dx):  # a closure: numba inlines it (a function call would count references)
        y, x = int(ys[p]) + dy, int(xs[p]) + dx
        if y < 0 or y >= h or x < 0 or x >= w:
            return -1
        q = pos[y * w + x]
        return q if q >= 0 and seg[q] == seg[p] else -1

    pred = np.empty(P, np.int64)
    for p in range(P):
        c = centre[seg[p]]
        ady, adx = abs(ys[p] - ys[c]), abs(xs[p] - xs[c])
        lo, hi = min(ady, adx), max(ady, adx)
        out[p] = (hi - lo) + lo * SQRT2
        sy, sx = int(np.sign(ys[p] - ys[c])), int(np.sign(xs[p] - xs[c]))
        pred[p] = P
        if p == c:
            pred[p] = p
            continue
        if lo > 0:
            q = _neighbour(ys, xs, seg, pos, h, w, p, -sy, -sx)
            if q >= 0:
                pred[p] = q
                continue
        if hi > lo:
            q = _neighbour(ys, xs, seg, pos, h, w, p, -sy if ady > adx else 0, -sx if adx > ady else 0)
            if q >= 0:
                pred[p] = q
    state = np.zeros(P, np.int8)  # 0 unknown, 1 exact (the chain reaches the centre), 2 not
    path = np.empty(P, np.int64)
    rest = 0
    for p in range(P):
        n, q = 0, p
        while True:
            if state[q]:
                verdict = state[q]
                break
            path[n] = q
            n += 1
            if pred[q] == q:
                verdict = 1
                break
            q = pred[q]
            if q == P:
                verdict = 2
                break
        for i in range(n):
            state[path[i]] = verdict
    for p in range(P):
        if state[p] == 2:
            rest += 1
    if rest == 0:
        return
    # Dijkstra over the other pixels, started from their exact neighbours.
    dist = np.full(P, np.inf)
    heap_d = np.empty(9 * rest + 1)
    heap_n = np.empty(9 * rest + 1, np.int64)
    size = 0
    for p in range(P):
        if state[p] != 2:
            continue
        best = np.inf
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy or dx:
                    q = _neighbour(ys, xs, seg, pos, h, w, p, dy, dx)
                    if q >= 0 and state[q] == 1:
                        best = min(best, out[q] + (SQRT2 if dy and dx else 1.0))
        if best < np.inf:
            dist[p] = best
            size = _push(heap_d, heap_n, size, best, p)
    done = np.zeros(P, np.bool_)
    while size:
        du, u = heap_d[0], heap_n[0]
        size = _pop(heap_d, heap_n, size)
        if done[u] or du > dist[u]:
            continue
        done[u] = True
        for dy in range(-1, 2):
            for dx in range(-1, 2):
                if dy or dx:
                    q = _neighbour(ys, xs, seg, pos, h, w, u, dy, dx)
                    if q >= 0 and state[q] == 2 and not done[q]:
                        nd = du + (SQRT2 if dy and dx else 1.0)
                        if nd < dist[q]:
                            dist[q] = nd
                            size = _push(heap_d, heap_n, size, nd, q)
    for p in range(P):
        if state[p] == 2:
            out[p] = dist[p]


@numba.njit(cache=True, nogil=True)
def _push(heap_d, heap_n, size, d, n):
    i = size
    heap_d[i], heap_n[i] = d, n
    while i:
        parent = (i - 1) >> 1
        if heap_d[parent] <= heap_d[i]:
            break
        heap_d[i], heap_d[parent] = heap_d[parent], heap_d[i]
        heap_n[i], heap_n[parent] = heap_n[parent], heap_n[i]
        i = parent
    return size + 1


@numba.njit(cache=True, nogil=True)
def _pop(heap_d, heap_n, size):
    """Remove the root; returns the new size."""
    size -= 1
    heap_d[0], heap_n[0] = heap_d[size], heap_n[size]
    i = 0
    while True:
        small, left = i, 2 * i + 1
        if left < size and heap_d[left] < heap_d[small]:
            small = left
        if left + 1 < size and heap_d[left + 1] < heap_d[small]:
            small = left + 1
        if small == i:
            return size
        heap_d[i], heap_d[small] = heap_d[small], heap_d[i]
        heap_n[i], heap_n[small] = heap_n[small], heap_n[i]
        i = small
