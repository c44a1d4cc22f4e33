"""MeasureObjectSizeShape: area, bounding box, perimeters, Euler number, convex and filled areas,
radii, moments and the moment ellipse, for every object of a label image at once.

Semantics of cp_measure's ``get_sizeshape`` (skimage ``regionprops`` on each object's own binary
image, plus cp_measure's batched moments):

* perimeter: skimage's 4-connectivity border-pixel weighting; Crofton perimeter and Euler number
  (8-connectivity): counts of 2x2 pixel configurations. All three are local patterns, counted
  for every object in one pass over the label image.
* convex area: pixel centres inside or on the convex hull of the pixels' edge midpoints (skimage's
  ``convex_hull_image``), i.e. the Minkowski sum of the hull of pixel centres with a diamond of
  radius 1/2, rasterized row by row from its half-planes.
* filled area (holes through 8-connected background) and the maximum / mean / median distance to
  the object's outside (radii) use scipy on a montage of the objects' padded crops.
* moments up to order 3 in each object's bounding-box frame; axes, eccentricity and orientation
  from the inertia tensor.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from scipy import ndimage

from cpvs.profile.engine.inner_distance import edge_distance
from cpvs.profile.engine.objects import F64, Hulls, Objects, convex_hulls, numpy_path

SQRT2 = math.sqrt(2.0)
_PERIMETER_WEIGHTS = torch.zeros(50, dtype=F64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = SQRT2
_PERIMETER_WEIGHTS[[13, 23]] = (1 + SQRT2) / 2
# 2x2 configuration codes (bit 1: the pixel, 2: above, 4: left, 8: above-left), skimage's tables.
_EULER8 = torch.tensor([0, 0, 0, 0, 0, 0, -1, 0, 1, 0, 0, 0, 0, 0, -1, 0], dtype=F64)
_a, _b, _c = math.pi / 4 * (1 + 1 / SQRT2), math.pi / (4 * SQRT2), math.pi / (2 * SQRT2)
_CROFTON4 = torch.tensor([0, _a, _b, _c, 0, _a, 0, _b, math.pi / 4, math.pi / 2, _b, _b, math.pi / 4, math.pi / 2, 0, 0],
                         dtype=F64)
MONTAGE_PIXELS = 2**23  # crop pixels per scipy montage (filled area)


def _padded(labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(labels, (1, 1, 1, 1))


def perimeters(obj: Objects) -> torch.Tensor:
    """(n,) skimage ``perimeter(image, 4)`` of every object."""
    lab = _padded(obj.labels)
    if numpy_path(lab):
        out = torch.zeros(obj.n, dtype=F64)
        _perimeter_pass(lab.numpy(), _PERIMETER_WEIGHTS.numpy(), out.numpy())
        return out
    H2, W2 = lab.shape
    flat_lab = lab.reshape(-1)
    # Border pixels: the object's pixels with a 4-neighbour outside the object (or the field).
    c = lab[1:-1, 1:-1]
    border = (c > 0) & ((lab[:-2, 1:-1] != c) | (lab[2:, 1:-1] != c) | (lab[1:-1, :-2] != c) | (lab[1:-1, 2:] != c))
    is_border = torch.nn.functional.pad(border, (1, 1, 1, 1)).reshape(-1)
    idx = torch.nonzero(is_border).squeeze(1)
    own = flat_lab[idx]
    code = torch.ones_like(idx)
    for off, w in ((-W2, 2), (W2, 2), (-1, 2), (1, 2), (-W2 - 1, 10), (-W2 + 1, 10), (W2 - 1, 10), (W2 + 1, 10)):
        nb = idx + off
        code += w * ((flat_lab[nb] == own) & is_border[nb]).to(torch.int64)
    weight = _PERIMETER_WEIGHTS.to(lab.device)[code]
    return torch.zeros(obj.n, dtype=F64, device=lab.device).index_add_(0, own - 1, weight)


def euler_and_crofton(obj: Objects) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) Euler numbers (8-connectivity) and Crofton perimeters (4 directions) of every object.

    Both sum a coefficient over the 2x2 windows of the object's zero-padded binary image; here
    every window of the padded label image adds, for each label in it, the coefficient of that
    label's configuration. Uniform windows add nothing, so only windows next to a border count.
    """
    lab = _padded(obj.labels)
    if numpy_path(lab):
        out = torch.zeros((2, obj.n + 1), dtype=F64)
        _window_pass(lab.numpy(), _EULER8.numpy(), _CROFTON4.numpy(), out.numpy())
        return out[0, 1:], out[1, 1:]
    br, ab, le, al = lab[1:, 1:], lab[:-1, 1:], lab[1:, :-1], lab[:-1, :-1]  # pixel, above, left, above-left
    mixed = torch.nonzero(((br != ab) | (br != le) | (br != al)).reshape(-1)).squeeze(1)
    br, ab, le, al = (t.reshape(-1)[mixed] for t in (br, ab, le, al))
    euler = torch.zeros(obj.n + 1, dtype=F64, device=lab.device)
    crofton = torch.zeros(obj.n + 1, dtype=F64, device=lab.device)
    eu, cr = _EULER8.to(lab.device), _CROFTON4.to(lab.device)

    def add(label, code, first):
        keep = first & (label > 0)
        euler.index_add_(0, label[keep], eu[code[keep]])
        crofton.index_add_(0, label[keep], cr[code[keep]])

    i64 = torch.int64
    add(br, 1 + 2 * (ab == br).to(i64) + 4 * (le == br).to(i64) + 8 * (al == br).to(i64), torch.ones_like(br, dtype=torch.bool))
    add(ab, 2 + 4 * (le == ab).to(i64) + 8 * (al == ab).to(i64), ab != br)
    add(le, 4 + 8 * (al == le).to(i64), (le != br) & (le != ab))
    add(al, torch.full_like(al, 8), (al != br) & (al != ab) & (al != le))
    return euler[1:], crofton[1:]


@numba.njit(cache=True, nogil=True)
def _perimeter_pass(lab, weights, out):
    """:func:`perimeters` on the CPU: border pixels, then each one's code from its border neighbours
    of the same object, summed per object in row-major order (the torch path's order)."""
    H2, W2 = lab.shape
    border = np.zeros((H2, W2), np.bool_)
    for y in range(1, H2 - 1):
        for x in range(1, W2 - 1):
            c = lab[y, x]
            border[y, x] = c > 0 and (lab[y - 1, x] != c or lab[y + 1, x] != c or lab[y, x - 1] != c or lab[y, x + 1] != c)
    for y in range(1, H2 - 1):
        for x in range(1, W2 - 1):
            if not border[y, x]:
                continue
            c = lab[y, x]
            code = 1
            for dy in range(-1, 2):
                for dx in range(-1, 2):
                    if (dy or dx) and lab[y + dy, x + dx] == c and border[y + dy, x + dx]:
                        code += 10 if dy and dx else 2
            out[c - 1] += weights[code]


@numba.njit(cache=True, nogil=True)
def _window_pass(lab, euler, crofton, out):
    """:func:`euler_and_crofton` on the CPU: every 2x2 window of the padded labels adds, for each
    label in it (first occurrence: pixel, above, left, above-left), its configuration's coefficients."""
    H2, W2 = lab.shape
    for y in range(1, H2):
        for x in range(1, W2):
            br, ab, le, al = lab[y, x], lab[y - 1, x], lab[y, x - 1], lab[y - 1, x - 1]
            if br == ab and br == le and br == al:
                continue
            if br > 0:
                code = 1 + 2 * (ab == br) + 4 * (le == br) + 8 * (al == br)
                out[0, br] += euler[code]
                out[1, br] += crofton[code]
            if ab != br and ab > 0:
                code = 2 + 4 * (le == ab) + 8 * (al == ab)
                out[0, ab] += euler[code]
                out[1, ab] += crofton[code]
            if le != br and le != ab and le > 0:
                code = 4 + 8 * (al == le)
                out[0, le] += euler[code]
                out[1, le] += crofton[code]
            if al != br and al != ab and al != le and al > 0:
                out[0, al] += euler[8]
                out[1, al] += crofton[8]


def convex_areas(obj: Objects, hulls: Hulls) -> torch.Tensor:
    """(n,) skimage ``area_convex``: integer points inside or on hull(pixel centres) + diamond(1/2)."""
    n, dev = obj.n, obj.device
    counts = torch.as_tensor(hulls.counts, device=dev)
    out = torch.zeros(n, dtype=F64, device=dev)
    if n == 0 or int(counts.max()) == 0:
        return out
    h = int(counts.max())
    pts = torch.as_tensor(hulls.points[:, 1:], dtype=F64, device=dev)
    owner = torch.as_tensor(hulls.points[:, 0], device=dev) - 1
    rank = torch.arange(len(owner), device=dev) - torch.as_tensor(hulls.offsets, device=dev)[owner]
    V = torch.full((n, h, 2), float("nan"), dtype=F64, device=dev)
    V[owner, rank] = pts
    valid = torch.arange(h, device=dev)[None, :] < counts[:, None]
    # Directions: both normals of every hull edge, the diamond's four normals and the axes.
    nxt = torch.where(torch.arange(h, device=dev)[None, :] + 1 < counts[:, None], torch.arange(h, device=dev)[None, :] + 1,
                      torch.zeros(1, dtype=torch.int64, device=dev))
    E = torch.gather(V, 1, nxt[:, :, None].expand(-1, -1, 2)) - V  # edge vectors (n, h, 2)
    normals = torch.stack([E[..., 1], -E[..., 0]], -1)
    fixed = torch.tensor([[1, 1], [1, -1], [-1, 1], [-1, -1], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=F64, device=dev)
    dirs = torch.cat([normals, -normals, fixed.expand(n, -1, -1)], 1)  # (n, D, 2)
    dvalid = torch.cat([valid, valid, torch.ones((n, 8), dtype=torch.bool, device=dev)], 1)
    dvalid &= (dirs.abs().sum(-1) > 0)
    proj = torch.einsum("ndk,nhk->ndh", dirs, torch.nan_to_num(V))
    proj = torch.where(valid[:, None, :], proj, torch.full_like(proj, -float("inf")))
    support = proj.max(-1).values + 0.5 * dirs.abs().max(-1).values  # (n, D): h_P + h_diamond
    ny, nx = dirs[..., 0], dirs[..., 1]
    y0 = obj.bbox[:, 0]
    rows = (obj.bbox[:, 2] - obj.bbox[:, 0]).max()
    for chunk in torch.split(torch.arange(n, device=dev), max(1, 2**22 // max(int(rows) * dirs.shape[1], 1))):
        ys = (y0[chunk, None] + torch.arange(int(rows), device=dev)[None, :]).to(F64)  # (m, R)
        rhs = support[chunk, None, :] - ny[chunk, None, :] * ys[:, :, None]  # (m, R, D): nx * x <= rhs
        nxc = nx[chunk, None, :].expand_as(rhs)
        ok = dvalid[chunk, None, :].expand_as(rhs)
        inf = torch.full_like(rhs, float("inf"))
        upper = torch.where(ok & (nxc > 0), torch.floor(rhs / nxc), inf).min(-1).values
        lower = torch.where(ok & (nxc < 0), torch.ceil(rhs / nxc), -inf).max(-1).values
        row_ok = torch.where(ok & (nxc == 0), rhs >= 0, torch.ones_like(ok)).all(-1)
        width = (upper - lower + 1).clamp(min=0)
        out[chunk] = torch.where(row_ok, width, torch.zeros_like(width)).sum(-1)
    return out


def filled_areas_and_radii(obj: Objects) -> dict[str, torch.Tensor]:
    """FilledArea from scipy on crop montages, and the Maximum/Mean/MedianRadius of every object.

    Each object's crop is padded by one background pixel, and crops are stacked vertically, so a
    crop's own padding separates it from the others: hole filling is that of the object alone, as
    cp_measure computes it crop by crop. The radius is the distance to the nearest pixel outside the
    object, the field's border included (cp_measure pads each crop): the edge distances the radial
    distribution uses (remembered per label image), capped by the distance out of the field.
    """
    n = obj.n
    filled = np.full(n, np.nan)
    for index in obj.batches(MONTAGE_PIXELS, pad=1, max_waste=1.3):
        m = obj.masks(pad=1, index=index).cpu().numpy()
        k, h, w = m.shape
        filled[index.cpu().numpy()] = ndimage.binary_fill_holes(m.reshape(k * h, w), np.ones((3, 3), bool)).reshape(k, h, w).sum((1, 2))
    H, W = obj.labels.shape
    out_of_field = torch.minimum(torch.minimum(obj.y + 1, H - obj.y), torch.minimum(obj.x + 1, W - obj.x)).to(F64)
    d = edge_distance(obj)
    # Squared distances are integers: sort them exactly within each object for the medians.
    d2 = torch.minimum(torch.round(d * d), out_of_field * out_of_field).to(torch.int64)
    key = (obj.seg << 32) | d2
    d2 = (torch.from_numpy(np.sort(key.numpy())) if numpy_path(key) else torch.sort(key).values) & 0xFFFFFFFF
    dist = torch.sqrt(d2.to(F64))
    count = obj.count.to(torch.int64)
    starts = obj.starts
    top = max(dist.numel() - 1, 0)
    lo, hi = (starts + (count - 1) // 2).clamp(0, top), (starts + count // 2).clamp(0, top)
    return {"FilledArea": torch.as_tensor(filled, device=obj.device), "MaximumRadius": dist[(starts + count - 1).clamp(0, top)],
            "MeanRadius": obj.sum(dist) / obj.count, "MedianRadius": (dist[lo] + dist[hi]) / 2}


def _powers(t: torch.Tensor) -> torch.Tensor:
    t2 = t * t
    return torch.stack([torch.ones_like(t), t, t2, t2 * t], -1)


def _moment_sums(obj: Objects, dy_run: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """(n, 4, 4) sums of dy^p dx^q over each object's pixels, dy given per row run (R,) (it is
    constant along a run), dx per pixel (P,): powers of dx are summed along runs first."""
    px = obj.row_sum(_powers(dx).T.contiguous())  # (4, R)
    py = _powers(dy_run).T  # (4, R)
    return obj.run_sum((py[:, None, :] * px[None, :, :]).reshape(16, -1)).T.reshape(-1, 4, 4)


def moments(obj: Objects) -> dict[str, torch.Tensor]:
    """Spatial, central, normalized and Hu moments, the inertia tensor and the moment ellipse."""
    _, _, run_seg, run_y = obj.rows
    ly = run_y - obj.bbox[:, 0].to(F64)[run_seg]
    lx = obj.x - obj.expand(obj.bbox[:, 1].to(F64))
    raw = _moment_sums(obj, ly, lx)
    cy = raw[:, 1, 0] / raw[:, 0, 0]
    cx = raw[:, 0, 1] / raw[:, 0, 0]
    central = _moment_sums(obj, ly - cy[run_seg], lx - obj.expand(cx))
    mu00 = central[:, 0, 0]
    normalized = torch.full_like(central, float("nan"))
    for p in range(4):
        for q in range(4):
            if p + q >= 2:
                normalized[:, p, q] = central[:, p, q] / mu00 ** ((p + q) / 2 + 1)
    nu = normalized
    n20, n02, n11 = nu[:, 2, 0], nu[:, 0, 2], nu[:, 1, 1]
    n30, n03, n21, n12 = nu[:, 3, 0], nu[:, 0, 3], nu[:, 2, 1], nu[:, 1, 2]
    a, b = n30 + n12, n21 + n03
    hu = [n20 + n02,
          (n20 - n02) ** 2 + 4 * n11 ** 2,
          (n30 - 3 * n12) ** 2 + (3 * n21 - n03) ** 2,
          a ** 2 + b ** 2,
          (n30 - 3 * n12) * a * (a ** 2 - 3 * b ** 2) + (3 * n21 - n03) * b * (3 * a ** 2 - b ** 2),
          (n20 - n02) * (a ** 2 - b ** 2) + 4 * n11 * a * b,
          (3 * n21 - n03) * a * (a ** 2 - 3 * b ** 2) - (n30 - 3 * n12) * b * (3 * a ** 2 - b ** 2)]
    ia, ib, ic = central[:, 2, 0] / mu00, central[:, 1, 1] / mu00, central[:, 0, 2] / mu00
    half_trace = (ia + ic) / 2
    disc = torch.sqrt(((ic - ia) / 2) ** 2 + ib ** 2)
    eig_major = (half_trace + disc).clamp(min=0)
    eig_minor = (half_trace - disc).clamp(min=0)
    it00, it_off, it11 = ic, -ib, ia
    ecc = torch.where(eig_major == 0, torch.zeros_like(eig_major), torch.sqrt(1 - eig_minor / eig_major))
    orient = torch.where(it00 - it11 == 0, torch.where(it_off < 0, torch.full_like(it_off, math.pi / 4), torch.full_like(it_off, -math.pi / 4)),
                         0.5 * torch.atan2(-2 * it_off, it11 - it00))
    out = {"MajorAxisLength": 4 * torch.sqrt(eig_major), "MinorAxisLength": 4 * torch.sqrt(eig_minor),
           "Eccentricity": ecc, "Orientation": orient * (180 / math.pi)}
    for p in range(3):
        for q in range(4):
            out[f"SpatialMoment_{p}_{q}"] = raw[:, p, q]
    for p in range(3):
        for q in range(4):
            out[f"CentralMoment_{p}_{q}"] = central[:, p, q]
    for p in range(4):
        for q in range(4):
            out[f"NormalizedMoment_{p}_{q}"] = normalized[:, p, q]
    for k in range(7):
        out[f"HuMoment_{k}"] = hu[k]
    out |= {"InertiaTensor_0_0": it00, "InertiaTensor_0_1": it_off, "InertiaTensor_1_0": it_off.clone(),
            "InertiaTensor_1_1": it11, "InertiaTensorEigenvalues_0": eig_major, "InertiaTensorEigenvalues_1": eig_minor}
    return out


def measure(obj: Objects, hulls: Hulls | None = None) -> dict[str, torch.Tensor]:
    """cp_measure's AreaShape keys (``Area``, ``Perimeter``, ``HuMoment_3`` ...) -> (n,) float64.

    ``hulls``: :func:`convex_hulls` of the same labels, when the caller shares them with Feret.
    """
    hulls = hulls if hulls is not None else convex_hulls(obj.labels, obj.n)
    area = obj.count
    box = obj.bbox.to(F64)
    bbox_area = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1])
    perimeter = perimeters(obj)
    euler, crofton = euler_and_crofton(obj)
    convex = convex_areas(obj, hulls)
    four_pi_area = 4.0 * math.pi * area
    out = {
        "Area": area,
        "BoundingBoxArea": bbox_area,
        "ConvexArea": convex,
        "EquivalentDiameter": torch.sqrt(4 * area / math.pi),
        "Perimeter": perimeter,
        "Center_X": obj.mean(obj.x),
        "Center_Y": obj.mean(obj.y),
        "BoundingBoxMinimum_X": box[:, 1],
        "BoundingBoxMaximum_X": box[:, 3],
        "BoundingBoxMinimum_Y": box[:, 0],
        "BoundingBoxMaximum_Y": box[:, 2],
        "FormFactor": four_pi_area / perimeter ** 2,
        "Extent": area / bbox_area,
        "Solidity": area / convex,
        "Compactness": perimeter ** 2 / four_pi_area.clamp(min=1),
        "EulerNumber": euler,
        "PerimeterCrofton": crofton,
    }
    out |= filled_areas_and_radii(obj)
    out |= moments(obj)
    return out
