"""Granularity spectrum per object, as cp_measure's ``get_granularity`` computes it, in torch.

CellProfiler's MeasureGranularity works on the whole image and only then reads
per-object values, so the image work is done once per image (and remembered for
every compartment measured in it, see :func:`cpvs.profile.engine.texture.cached_on`):

1. subsample the image by ``subsample_size`` (bilinear, ``map_coordinates(order=1)``);
2. remove the background: an opening (erosion then dilation) by a disk of radius
   ``element_size`` on a further ``image_sample_size`` subsample, interpolated back
   and subtracted (negative values clipped to 0);
3. the granular spectrum: the image eroded k = 1..16 times by the 4-connected cross,
   each erosion reconstructed (by dilation, 4-connected) under the background-free
   image; step k is the drop of each object's mean from step k-1 to step k, in percent
   of its mean in the original image (which is also the mean "before step 1").

Per-object means of a subsampled image restored to the original size are a linear
map of the subsampled image (bilinear weights summed over the object's pixels): it
is built once per label image, as a list of (small-image pixel, object, weight).

The 16 reconstructions are independent (each starts from its own erosion): they run as one
batch (:mod:`cpvs.profile.engine.reconstruction`) on the int32 ranks of the grey values, since
erosion and reconstruction only compare values.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from cpvs.profile.engine import texture
from cpvs.profile.engine.objects import Objects, numpy_path, take
from cpvs.profile.engine.reconstruction import cross_filter, reconstruct
from cpvs.profile.engine.texture import cached_on, objects


def keys(granular_spectrum_length: int = 16) -> list[str]:
    return [f"Granularity_{k}" for k in range(1, granular_spectrum_length + 1)]


def _axis_weights(coord: torch.Tensor, size: int) -> tuple[torch.Tensor, ...]:
    """Linear interpolation along one axis at ``coord`` (m,) in a grid of ``size``.

    Returns lower / upper indices, the upper weight, and whether the coordinate is
    inside [0, size - 1] (``map_coordinates(mode='constant')`` gives 0 outside).
    """
    inside = (coord >= 0) & (coord <= size - 1)
    c = coord.clamp(0, size - 1)
    lo = torch.floor(c).long()
    hi = (lo + 1).clamp(max=size - 1)
    return lo, hi, c - lo, inside


def _resample(image: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (..., h, w) ``image`` on the grid rows (m,) x cols (k,) -> (..., m, k)."""
    r0, r1, fr, rin = _axis_weights(rows, image.shape[-2])
    c0, c1, fc, cin = _axis_weights(cols, image.shape[-1])
    fr, fc = fr[:, None], fc
    out = image[..., r0, :] * (1 - fr) + image[..., r1, :] * fr
    out = out[..., c0] * (1 - fc) + out[..., c1] * fc
    return out * (rin[:, None] & cin[None, :])


def _grid(n: float, step: float, device: torch.device) -> torch.Tensor:
    """``np.mgrid[0:n] / step`` along one axis (``n`` may be fractional: ceil(n) points)."""
    return torch.arange(math.ceil(n), dtype=torch.float64, device=device) / step


def _flat_morphology(image: torch.Tensor, footprint: np.ndarray, dilate: bool) -> torch.Tensor:
    """Grey erosion / dilation of (h, w) ``image`` by a symmetric flat footprint (2r+1, 2r+1).

    Out-of-field neighbours are ignored (skimage's default ``mode='reflect'`` has the same
    effect for a symmetric convex footprint). The footprint is taken row by row: a sliding
    max over each row's run, shifted by the row offset.
    """
    r = footprint.shape[0] // 2
    x = image if dilate else -image
    h, w = x.shape
    big = torch.full((h + 2 * r, w), -math.inf, dtype=x.dtype, device=x.device)
    out = torch.full_like(x, -math.inf)
    runs: dict[int, torch.Tensor] = {}
    for dy in range(-r, r + 1):
        half = int(footprint[dy + r].sum()) // 2
        if half not in runs:
            runs[half] = torch.nn.functional.max_pool2d(x[None, None], (1, 2 * half + 1), 1, (0, half))[0, 0]
        big[r:r + h] = runs[half]
        out = torch.maximum(out, big[r + dy:r + dy + h])
    return out if dilate else -out


def _erode_cross(x: torch.Tensor) -> torch.Tensor:
    """Grey erosion of (..., h, w) by the 4-connected cross, out-of-field neighbours ignored."""
    return cross_filter(x, torch.minimum)


def spectrum(image: torch.Tensor, subsample_size: float = 0.25, image_sample_size: float = 0.25, element_size: int = 10,
             granular_spectrum_length: int = 16) -> torch.Tensor:
    """The background-free subsampled image and its reconstructed erosions: (1 + length, h, w).

    image (H, W) float64. Slice 0 is the background-free image, slice k the reconstruction
    of its k-th erosion.
    """
    from skimage.morphology import disk

    dev = image.device
    h0, w0 = image.shape
    pixels = image.to(torch.float64)
    if subsample_size < 1:
        h, w = int(h0 * subsample_size), int(w0 * subsample_size)
        pixels = _resample(pixels, _grid(h, subsample_size, dev), _grid(w, subsample_size, dev))
    else:
        h, w = h0, w0
    if image_sample_size < 1:
        bh, bw = h * image_sample_size, w * image_sample_size
        back = _resample(pixels, _grid(bh, image_sample_size, dev), _grid(bw, image_sample_size, dev))
    else:
        back = pixels
    footprint = disk(element_size)
    back = _flat_morphology(_flat_morphology(back, footprint, dilate=False), footprint, dilate=True)
    if image_sample_size < 1:
        rows = torch.arange(h, dtype=torch.float64, device=dev) * ((bh - 1) / (h - 1))
        cols = torch.arange(w, dtype=torch.float64, device=dev) * ((bw - 1) / (w - 1))
        back = _resample(back, rows, cols)
    pixels = (pixels - back).clamp(min=0)
    # Erosion and reconstruction only compare values: on the grey levels' ranks (int32) they give
    # the ranks of the float results, at half the memory traffic of float64.
    ranks, values = _dense_ranks(pixels)
    seeds = [ranks]
    for _ in range(granular_spectrum_length):
        seeds.append(_erode_cross(seeds[-1]))
    rec = reconstruct(torch.stack(seeds[1:]), ranks)
    return torch.cat([pixels[None], take(values, rec)])


def _dense_ranks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 ranks of x's values, same shape; the sorted distinct values): ``values[ranks] == x``."""
    if x.device.type == "cpu" and texture.NUMPY_ON_CPU:
        values, ranks = np.unique(x.numpy(), return_inverse=True)
        return torch.from_numpy(ranks.reshape(x.shape).astype(np.int32)), torch.from_numpy(values)
    values, ranks = torch.unique(x, sorted=True, return_inverse=True)
    return ranks.to(torch.int32), values


@numba.njit(cache=True, nogil=True)
def _axis(coord, size):
    """:func:`_axis_weights` of one coordinate."""
    inside = coord >= 0 and coord <= size - 1
    c = min(max(coord, 0.0), size - 1.0)
    lo = int(np.floor(c))
    return lo, min(lo + 1, size - 1), c - lo, inside


@numba.njit(cache=True, nogil=True)
def _restore_entries(ys, xs, starts, counts, sy, sx, h, w, index, owner, weight):
    """:func:`_restore_means` on the CPU, object by object on a crop of its own extent, the same
    sums in the same order; writes the entries into index, owner, weight and returns how many."""
    k = 0
    for o in range(starts.size):
        c, s = int(counts[o]), starts[o]
        if c == 0:  # an object without pixels: one NaN entry gives a NaN mean
            index[k], owner[k], weight[k] = 0, o, np.nan
            k += 1
            continue
        top, left, bottom, right = h, w, 0, 0
        for p in range(s, s + c):
            r0, r1, _, _ = _axis(ys[p] * sy, h)
            c0, c1, _, _ = _axis(xs[p] * sx, w)
            top, bottom, left, right = min(top, r0), max(bottom, r1), min(left, c0), max(right, c1)
        crop = np.zeros((bottom - top + 1, right - left + 1))
        for corner in range(4):  # the corners one after another, as the torch path's four passes
            for p in range(s, s + c):
                r0, r1, fr, rin = _axis(ys[p] * sy, h)
                c0, c1, fc, cin = _axis(xs[p] * sx, w)
                rr, wr = (r0, 1 - fr) if corner < 2 else (r1, fr)
                cc, wc = (c0, 1 - fc) if corner % 2 == 0 else (c1, fc)
                crop[rr - top, cc - left] += wr * wc * (1.0 if rin and cin else 0.0)
        for i in range(crop.shape[0]):
            for j in range(crop.shape[1]):
                v = crop[i, j] / counts[o]
                if v != 0:
                    index[k], owner[k], weight[k] = (top + i) * w + left + j, o, v
                    k += 1
    return k


@numba.njit(cache=True, nogil=True)
def _object_means(series, index, owner, weight, means):
    """means (K, n) += series[1:] (K + 1, h * w) at the entries, times their weights, in entry order."""
    for e in range(index.size):
        o, i, wt = owner[e], index[e], weight[e]
        for k in range(means.shape[0]):
            means[k, o] += series[k + 1, i] * wt


def _restore_means(obj: Objects, small: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Per-object means of a (h, w) image restored bilinearly to the field, as a linear map.

    Returns, for every small-image pixel that some object's pixels interpolate from (built
    on one (hc, wc) crop per object, then compressed): ``index`` (K,) its flat index in the
    small image, ``object`` (K,) the object and ``weight`` (K,) the summed interpolation weights
    of the object's pixels over its pixel count: the mean is the sum of ``small[index] * weight``
    over the object.
    """
    (H, W), (h, w) = obj.labels.shape, small
    dev = obj.device
    if numpy_path(obj.y):
        P = obj.seg.numel()
        index, owner, weight = np.empty(4 * P + obj.n, np.int64), np.empty(4 * P + obj.n, np.int64), np.empty(4 * P + obj.n)
        k = _restore_entries(obj.y.numpy(), obj.x.numpy(), obj.starts.numpy(), obj.count.numpy(), float(h - 1) / float(H - 1),
                             float(w - 1) / float(W - 1), h, w, index, owner, weight)
        return {"index": torch.from_numpy(index[:k]), "object": torch.from_numpy(owner[:k]), "weight": torch.from_numpy(weight[:k])}
    # map_coordinates scales by float(h - 1) / float(H - 1); out-of-grid pixels add 0 but still count.
    r = obj.y * (float(h - 1) / float(H - 1))
    c = obj.x * (float(w - 1) / float(W - 1))
    r0, r1, fr, rin = _axis_weights(r, h)
    c0, c1, fc, cin = _axis_weights(c, w)
    inside = (rin & cin).double()
    top = torch.full((obj.n,), h, dtype=torch.long, device=dev).scatter_reduce(0, obj.seg, r0, "amin")
    left = torch.full((obj.n,), w, dtype=torch.long, device=dev).scatter_reduce(0, obj.seg, c0, "amin")
    hc = int((torch.zeros(obj.n, dtype=torch.long, device=dev).scatter_reduce(0, obj.seg, r1 - top[obj.seg], "amax")).max()) + 1
    wc = int((torch.zeros(obj.n, dtype=torch.long, device=dev).scatter_reduce(0, obj.seg, c1 - left[obj.seg], "amax")).max()) + 1
    weight = torch.zeros(obj.n * hc * wc, dtype=torch.float64, device=dev)
    base = obj.seg * (hc * wc)
    for rr, wr in ((r0, 1 - fr), (r1, fr)):
        for cc, wcol in ((c0, 1 - fc), (c1, fc)):
            weight.index_add_(0, base + (rr - top[obj.seg]) * wc + (cc - left[obj.seg]), wr * wcol * inside)
    weight = weight.view(obj.n, hc, wc) / obj.count[:, None, None]
    rows = (top[:, None] + torch.arange(hc, device=dev)).clamp(max=h - 1)
    cols = (left[:, None] + torch.arange(wc, device=dev)).clamp(max=w - 1)
    index = rows[:, :, None] * w + cols[:, None, :]
    used = (weight != 0).nonzero(as_tuple=True)  # NaN (an object without pixels) stays, to give NaN
    return {"index": index[used], "object": used[0], "weight": weight[used]}


def measure(labels: torch.Tensor, image: torch.Tensor, n: int, subsample_size: float = 0.25, image_sample_size: float = 0.25,
            element_size: int = 10, granular_spectrum_length: int = 16) -> dict[str, np.ndarray]:
    """Granularity_1 .. Granularity_<length> per object: (n,) arrays, NaN for an object without pixels.

    labels (H, W) int64, objects 1..n, 0 = background; image (H, W) float64 in [0, 1].
    """
    names = keys(granular_spectrum_length)
    shape = np.array(image.shape)
    small = (shape * subsample_size).astype(int) if subsample_size < 1 else shape
    if (small < 2).any():  # too small to interpolate: cp_measure gives NaN
        return {k: np.full(n, np.nan) for k in names}
    options = (subsample_size, image_sample_size, element_size, granular_spectrum_length)
    series = cached_on(image, ("granularity", options), lambda: spectrum(image, *options))
    obj = objects(labels, n)
    restore = cached_on(labels, ("granularity", n, tuple(small)), lambda: _restore_means(obj, tuple(int(s) for s in small)))
    means = torch.zeros((len(series) - 1, n), dtype=torch.float64, device=series.device)
    if numpy_path(series):
        _object_means(series.reshape(len(series), -1).numpy(), restore["index"].numpy(), restore["object"].numpy(),
                      restore["weight"].numpy(), means.numpy())
    else:
        values = torch.index_select(series[1:].reshape(len(series) - 1, -1), 1, restore["index"]) * restore["weight"]
        means.index_add_(1, restore["object"], values)
    start = obj.mean(obj.pixels(image).to(torch.float64))
    means = torch.cat([start[None], means])
    gss = (means[:-1] - means[1:]) * 100 / start.clamp(min=np.finfo(float).eps)
    out = gss.cpu().numpy()
    return {k: out[i] for i, k in enumerate(names)}
