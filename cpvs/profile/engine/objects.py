"""Per-object bookkeeping shared by the engine's modules.

A label image (H, W) is reduced once to flat lists of its foreground pixels, grouped by
object, so that a module measures every object of a field in one pass: a per-pixel quantity
(P,) becomes a per-object one (n,) by a segment reduction over each object's run of pixels,
never by a Python loop over objects. Where a module needs the
objects' neighbourhoods as images (texture, granularity, distance transforms) it takes
batched, zero-padded per-object crops (m, h, w).

Conventions: objects are labels 1..n (gaps allowed: an absent label is an object with no
pixels, ``present`` False); row i of every per-object array is label i + 1. Coordinates are
(y, x) = (row, column) in pixels of the field. Everything stays on the labels' device;
float64 throughout.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

F64 = torch.float64
# Use numpy's kernels for CPU tensors where they are several times faster than torch's (sorts,
# gathers, run reductions). The torch paths are what a GPU runs; tests switch this off to check
# that both give the same numbers.
NUMPY_ON_CPU = True


def tensor_version(t: torch.Tensor) -> int:
    """The in-place version counter of ``t`` (-1 for inference tensors, which cannot change)."""
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter (and cannot be modified in place)
        return -1


def numpy_path(t: torch.Tensor) -> bool:
    """Whether ``t`` takes the numpy shortcut (a CPU tensor, shortcuts on)."""
    return NUMPY_ON_CPU and t.device.type == "cpu"


@dataclass
class Objects:
    """One compartment's label image as flat per-pixel lists, grouped by object.

    labels: (H, W) int64; n: label slots; flat, seg: (P,) int64 pixel index into the flattened
    field and object index (label - 1) of each foreground pixel, ordered by object and row-major
    within an object (so each object's pixels are one contiguous run, from ``starts``); y, x: (P,)
    float64 coordinates; count: (n,) float64 pixels per object; bbox: (n, 4) int64 (ymin, xmin,
    ymax, xmax), max exclusive, zeros for absent objects.
    """

    labels: torch.Tensor
    n: int
    flat: torch.Tensor
    seg: torch.Tensor
    y: torch.Tensor
    x: torch.Tensor
    count: torch.Tensor
    bbox: torch.Tensor

    @classmethod
    def from_labels(cls, labels: torch.Tensor, n: int | None = None) -> "Objects":
        """labels: (H, W) integer tensor, 0 = background. ``n`` defaults to the largest label.

        The objects keep their own copy of the labels: modules cache an :class:`Objects` on the label
        tensor it came from (weakly keyed), and a value referring to its own key would never be freed.
        """
        labels = labels.to(torch.int64, copy=True)
        dev = labels.device
        h, w = labels.shape
        flat = torch.nonzero(labels.reshape(-1) > 0).squeeze(1)
        lab = labels.reshape(-1)[flat]
        if n is None:
            n = int(lab.max()) if lab.numel() else 0
        if numpy_path(lab):  # a stable radix sort by label (numpy sorts 16-bit keys that way)
            key = lab.numpy().astype(np.uint16 if n < 2**16 else np.int64)
            order = torch.from_numpy(np.argsort(key, kind="stable"))
        else:
            order = torch.sort(lab, stable=True).indices
        flat, seg = flat[order], lab[order] - 1
        y = torch.div(flat, w, rounding_mode="floor")
        x = flat - y * w
        count = torch.bincount(seg, minlength=n).to(F64) if seg.numel() else torch.zeros(n, dtype=F64, device=dev)
        obj = cls(labels, n, flat, seg, y.to(F64), x.to(F64), count, torch.zeros((n, 4), dtype=torch.int64, device=dev))
        if seg.numel():
            has = obj.present
            bbox = torch.stack([obj.min(y.to(F64)), obj.min(x.to(F64)), obj.max(y.to(F64)) + 1, obj.max(x.to(F64)) + 1], 1)
            obj.bbox = torch.where(has[:, None], bbox, torch.zeros_like(bbox)).to(torch.int64)
        return obj

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @cached_property
    def present(self) -> torch.Tensor:
        """(n,) bool: the label has pixels."""
        return self.count > 0

    @cached_property
    def starts(self) -> torch.Tensor:
        """(n,) int64 offset of each object's first pixel (pixels of object i: ``starts[i]:starts[i] + count[i]``)."""
        c = self.count.to(torch.int64)
        return torch.cumsum(c, 0) - c

    @cached_property
    def positions(self) -> torch.Tensor:
        """(H*W + 1,) position in ``flat`` of each field pixel; -1 off the objects and at the last entry,
        which stands for any pixel outside the field (a neighbour's position without a search)."""
        pos = torch.full((self.labels.numel() + 1,), -1, dtype=torch.long, device=self.device)
        pos[self.flat] = torch.arange(self.flat.numel(), device=self.device)
        return pos

    @cached_property
    def _runs(self) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """(present mask, numpy starts of the present objects' runs, numpy counts of all objects)."""
        has = self.present
        return has, self.starts[has].cpu().numpy(), self.count.to(torch.int64).cpu().numpy()

    # Segment reductions: (..., P) per-pixel values -> (..., n) per-object values. On CPU the runs
    # are reduced with numpy's ``reduceat`` (several times faster than a scatter); elsewhere with
    # torch's scatter kernels.
    def _reduceat(self, v: torch.Tensor, ufunc, empty: float) -> torch.Tensor:
        empty = empty if v.dtype.is_floating_point else 0
        has, starts, _ = self._runs
        if not v.shape[-1]:
            return torch.full((*v.shape[:-1], self.n), empty, dtype=v.dtype)
        red = torch.from_numpy(ufunc.reduceat(v.numpy(), starts, axis=-1))
        if len(starts) == self.n:  # every label present: the usual case
            return red
        out = torch.full((*v.shape[:-1], self.n), empty, dtype=v.dtype)
        out[..., has] = red
        return out

    def _scatter(self, v: torch.Tensor, reduce: str, empty: float) -> torch.Tensor:
        empty = empty if v.dtype.is_floating_point else 0
        out = torch.full((*v.shape[:-1], self.n), empty, dtype=v.dtype, device=v.device)
        return out.scatter_reduce_(-1, self.seg.expand_as(v), v, reduce, include_self=False) if v.shape[-1] else out

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        """(..., P) -> (..., n); 0 for an object without pixels."""
        if numpy_path(v):
            return self._reduceat(v, np.add, 0.0)
        return self._scatter(v, "sum", 0.0)

    def mean(self, v: torch.Tensor) -> torch.Tensor:
        """NaN for an object without pixels."""
        return self.sum(v) / self.count

    def max(self, v: torch.Tensor) -> torch.Tensor:
        """NaN for an object without pixels."""
        if numpy_path(v):
            return self._reduceat(v, np.maximum, float("nan"))
        return self._scatter(v, "amax", float("nan"))

    def min(self, v: torch.Tensor) -> torch.Tensor:
        if numpy_path(v):
            return self._reduceat(v, np.minimum, float("nan"))
        return self._scatter(v, "amin", float("nan"))

    @cached_property
    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row runs: an object's pixels in one row are consecutive. Returns starts (R,) of the runs,
        the run of each pixel (P,), and each run's object (R,) and row (R,)."""
        P = self.seg.numel()
        new = torch.ones(P, dtype=torch.bool, device=self.device)
        if P > 1:
            new[1:] = (self.y[1:] != self.y[:-1]) | (self.seg[1:] != self.seg[:-1])
        starts = torch.nonzero(new).squeeze(1)
        return starts, torch.cumsum(new, 0) - 1, self.seg[starts], self.y[starts]

    def row_sum(self, v: torch.Tensor) -> torch.Tensor:
        """(..., P) -> (..., R) sums over each row run (see :attr:`rows`)."""
        starts, run, _, _ = self.rows
        if numpy_path(v):
            return torch.from_numpy(np.add.reduceat(v.numpy(), starts.numpy(), axis=-1)) if v.shape[-1] else v
        out = torch.zeros((*v.shape[:-1], starts.numel()), dtype=v.dtype, device=v.device)
        return out.index_add_(-1, run, v)

    def run_sum(self, r: torch.Tensor) -> torch.Tensor:
        """(..., R) per-run values -> (..., n) per-object sums (runs of an object are consecutive)."""
        _, _, run_seg, _ = self.rows
        out = torch.zeros((*r.shape[:-1], self.n), dtype=r.dtype, device=r.device)
        return out.index_add_(-1, run_seg, r)

    def expand(self, a: torch.Tensor) -> torch.Tensor:
        """(..., n) per-object values -> (..., P) the value of each pixel's object (``a[..., seg]``)."""
        if numpy_path(a):
            return torch.from_numpy(np.repeat(a.numpy(), self._runs[2], axis=-1))
        return a[..., self.seg]

    def pixels(self, image: torch.Tensor) -> torch.Tensor:
        """(..., H, W) image -> (..., P) its values at the objects' pixels (do not modify them in place).

        Remembered while ``image`` lives unmodified: every module of a compartment reads the same
        channels, and the gather costs as much as a small module."""
        return self._remembered("_pixels", image, self._gather)

    def _gather(self, image: torch.Tensor) -> torch.Tensor:
        flat = image.reshape(*image.shape[:-2], -1)
        if numpy_path(flat):
            return torch.from_numpy(np.take(flat.numpy(), self.flat.numpy(), axis=-1))
        return flat[..., self.flat]

    def _remembered(self, name: str, t: torch.Tensor, compute):
        """``compute(t)``, remembered while ``t`` lives unmodified."""
        cache = self.__dict__.setdefault(name, {})
        key, version = id(t), tensor_version(t)
        hit = cache.get(key)
        if hit is not None and hit[0]() is t and hit[1] == version:
            return hit[2]
        out = compute(t)
        cache[key] = (weakref.ref(t, lambda _, key=key: cache.pop(key, None)), version, out)
        return out

    def argsort(self, v: torch.Tensor) -> torch.Tensor:
        """(P,) permutation ordering ``v`` ascending within each object (objects stay in place:
        object i's values are at ``starts[i]:starts[i] + count[i]`` of ``v[order]``). Remembered
        while ``v`` lives unmodified: intensity quantiles and correlation ranks sort the same pixels."""
        return self._remembered("_argsort", v, lambda t: segment_argsort(self.seg, t))

    def sort(self, v: torch.Tensor) -> torch.Tensor:
        """(P,) ``v`` sorted within objects (see :func:`segment_sort`)."""
        return segment_sort(self.seg, v)

    # Batched crops for modules that need neighbourhoods.
    def crops(self, image: torch.Tensor, pad: int = 0, fill: float = 0.0, index: torch.Tensor | None = None,
              size: tuple[int, int] | None = None) -> torch.Tensor:
        """(m, h, w) crops of an (H, W) image over the objects' bounding boxes grown by ``pad``.

        All crops share the largest (padded) box of the selected objects (or ``size``), anchored at
        each box's top-left corner; pixels outside the field are ``fill``. ``index`` (m,) selects
        objects (default: all n). Memory is m * h * w: use :meth:`batches` for large fields.
        """
        index = torch.arange(self.n, device=self.device) if index is None else index
        box = self.bbox[index]
        if size is None:
            h = int((box[:, 2] - box[:, 0]).max()) + 2 * pad if len(index) else 0
            w = int((box[:, 3] - box[:, 1]).max()) + 2 * pad if len(index) else 0
        else:
            h, w = size
        H, W = image.shape
        rows = box[:, 0:1] - pad + torch.arange(h, device=self.device)  # (m, h)
        cols = box[:, 1:2] - pad + torch.arange(w, device=self.device)  # (m, w)
        inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
        out = image[rows.clamp(0, H - 1)[:, :, None], cols.clamp(0, W - 1)[:, None, :]]
        return torch.where(inside, out, torch.as_tensor(fill, dtype=image.dtype, device=image.device))

    def masks(self, pad: int = 0, index: torch.Tensor | None = None, size: tuple[int, int] | None = None) -> torch.Tensor:
        """(m, h, w) bool crops, True on each object's own pixels (see :meth:`crops`)."""
        index = torch.arange(self.n, device=self.device) if index is None else index
        lab = self.crops(self.labels, pad, 0, index, size)
        return lab == (index + 1)[:, None, None]

    def batches(self, max_elements: int = 2**24, pad: int = 0, max_waste: float = 2.0) -> list[torch.Tensor]:
        """Present objects' indices in groups for :meth:`crops`: each group's padded crops
        (m * h * w, boxes grown by ``pad``) stay under ``max_elements`` and under ``max_waste`` times
        the pixels of the group's own boxes, so a few large objects do not make every crop large.
        """
        hs = (self.bbox[:, 2] - self.bbox[:, 0] + 2 * pad).tolist()
        ws = (self.bbox[:, 3] - self.bbox[:, 1] + 2 * pad).tolist()
        present = self.present.tolist()
        order = sorted((i for i in range(self.n) if present[i]), key=lambda i: max(hs[i], ws[i]))
        out, cur, own, mh, mw = [], [], 0, 0, 0
        for i in order:  # a loop over box sizes (one number per object), not over pixels
            nh, nw = max(mh, hs[i]), max(mw, ws[i])
            padded = (len(cur) + 1) * nh * nw
            if cur and (padded > max_elements or padded > max_waste * (own + hs[i] * ws[i])):
                out.append(torch.tensor(cur, dtype=torch.int64, device=self.device))
                cur, own, nh, nw = [], 0, hs[i], ws[i]
            cur.append(i)
            own += hs[i] * ws[i]
            mh, mw = nh, nw
        if cur:
            out.append(torch.tensor(cur, dtype=torch.int64, device=self.device))
        return out


def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` for a 1-D tensor ``t`` (any index shape); numpy's gather is 2-3x faster than torch's on CPU."""
    if numpy_path(t):
        return torch.from_numpy(np.take(t.numpy(), index.numpy()))
    return t[index]


def select(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``t[mask]`` for 1-D tensors (numpy's boolean indexing on CPU, for the same reason)."""
    if numpy_path(t):
        return torch.from_numpy(t.numpy()[mask.numpy()])
    return t[mask]


def _composite_key(seg: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``seg + t(v)`` with t monotone into [0, 0.5); also the (lo, span) that invert t."""
    v = v.to(F64)
    lo, span = v.min(), v.max() - v.min()
    if float(span) == 0:
        span = torch.ones_like(span)
    return seg.to(F64) + (v - lo) * (0.5 / span), lo, span


def segment_argsort(seg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(P,) permutation sorting by ``seg`` (int, ascending), then by ``v`` (ascending).

    One sort of a composite key ``seg + t(v)`` with t monotone into [0, 0.5): keys of distinct values
    closer than ~1e-12 of the value range may tie, which can only swap near-equal values. On CPU
    numpy's vectorized sort is several times faster than torch's, so it is used there.
    """
    if v.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=v.device)
    key = _composite_key(seg, v)[0]
    if numpy_path(key):
        return torch.from_numpy(np.argsort(key.numpy()))
    return torch.argsort(key)


def segment_sort(seg: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(P,) values ``v`` sorted by (``seg``, ``v``) when only the sorted values are needed (quantiles).

    Values come back through the composite key, so they carry an absolute error of ~1e-15 times
    (number of segments x value range); a sort without a permutation is ~3x faster than an argsort.
    """
    if v.numel() == 0:
        return v.to(F64)
    key, lo, span = _composite_key(seg, v)
    if numpy_path(key):
        key = torch.from_numpy(np.sort(key.numpy()))
    else:
        key = torch.sort(key).values
    return (key - torch.floor(key)) * (span / 0.5) + lo


def sorted_quantile(sorted_v: torch.Tensor, starts: torch.Tensor, count: torch.Tensor, q: float) -> torch.Tensor:
    """(n,) linear-interpolated q-quantiles (numpy's default, position (count - 1) * q) of each object's
    values, given values (P,) sorted within objects that start at ``starts`` (n,). NaN where count is 0."""
    c = count.to(torch.int64)
    pos = (count - 1).clamp(min=0) * q
    lo = torch.floor(pos).to(torch.int64)
    lo = torch.minimum(lo, (c - 1).clamp(min=0))
    hi = torch.minimum(lo + 1, (c - 1).clamp(min=0))
    f = pos - lo.to(F64)
    top = max(sorted_v.numel() - 1, 0)
    a = sorted_v[(starts + lo).clamp(max=top)] if sorted_v.numel() else torch.zeros_like(pos)
    b = sorted_v[(starts + hi).clamp(max=top)] if sorted_v.numel() else torch.zeros_like(pos)
    out = a * (1.0 - f) + b * f
    return torch.where(count > 0, out, torch.full_like(out, float("nan")))


@dataclass
class Hulls:
    """Convex hulls of the objects' pixel centres, as centrosome computes them.

    points: (K, 3) int array (label, y, x) of hull vertices grouped by object, counter-clockwise;
    counts: (n,) vertices per object (0 for an absent label). Kept as numpy: centrosome consumes it.
    """

    points: np.ndarray
    counts: np.ndarray

    @property
    def offsets(self) -> np.ndarray:
        return np.cumsum(self.counts) - self.counts


def convex_hulls(labels: torch.Tensor, n: int) -> Hulls:
    """Hulls of every object of an (H, W) label image, in one vectorized centrosome call (CPU)."""
    from centrosome.cpmorphology import convex_hull

    if n == 0:
        return Hulls(np.zeros((0, 3), np.int64), np.zeros(0, np.int64))
    lab = labels.detach().to("cpu").numpy()
    points, counts = convex_hull(lab, np.arange(1, n + 1, dtype=np.int32))
    return Hulls(np.asarray(points, np.int64), np.asarray(counts, np.int64))


def enclosing_circles(labels: torch.Tensor, n: int, hulls: Hulls | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum enclosing circle of each object's pixel centres: centres (n, 2) (y, x) and radii (n,).

    Computed by centrosome (as CellProfiler and cp_measure do) on the CPU: Zernike features keep only
    pixels with r² <= 1 relative to this circle, so the pixels on the circle count or not depending on
    the last bit of its centre and radius; the same arithmetic keeps the same pixels. The work is on
    each object's convex hull (tens of vertices), vectorized over objects by centrosome.
    """
    from centrosome.cpmorphology import minimum_enclosing_circle

    if n == 0:
        return (torch.zeros((0, 2), dtype=F64, device=labels.device), torch.zeros(0, dtype=F64, device=labels.device))
    hulls = hulls or convex_hulls(labels, n)
    idx = np.arange(1, n + 1, dtype=np.int32)
    centers, radii = minimum_enclosing_circle(None, idx, (hulls.points, hulls.counts))
    return (torch.as_tensor(np.asarray(centers, dtype=np.float64), device=labels.device),
            torch.as_tensor(np.asarray(radii, dtype=np.float64), device=labels.device))
