"""Feret diameters (MeasureObjectSizeShape): the largest and smallest caliper widths of each
object's convex hull of pixel centres, all objects at once on padded hull-vertex arrays.

MaxFeretDiameter is the largest distance between two hull vertices; MinFeretDiameter the
smallest, over the hull's edges, of the largest distance of a vertex to the edge's line (0 for
an object whose hull is a point or a segment), as centrosome's rotating calipers give them.
"""

from __future__ import annotations

import torch

from cpvs.profile.engine.objects import F64, Hulls, Objects, convex_hulls


def hull_vertices(hulls: Hulls, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Hull vertices as a padded (n, h, 2) float64 (y, x) array and its (n, h) validity mask."""
    counts = torch.as_tensor(hulls.counts, device=device)
    h = int(counts.max()) if n else 0
    V = torch.zeros((n, h, 2), dtype=F64, device=device)
    if h:
        owner = torch.as_tensor(hulls.points[:, 0], device=device) - 1
        rank = torch.arange(len(owner), device=device) - torch.as_tensor(hulls.offsets, device=device)[owner]
        V[owner, rank] = torch.as_tensor(hulls.points[:, 1:], dtype=F64, device=device)
    return V, torch.arange(h, device=device)[None, :] < counts[:, None]


def measure(obj: Objects, hulls: Hulls | None = None) -> dict[str, torch.Tensor]:
    """``MinFeretDiameter`` and ``MaxFeretDiameter`` -> (n,) float64."""
    n, dev = obj.n, obj.device
    hulls = hulls if hulls is not None else convex_hulls(obj.labels, n)
    V, valid = hull_vertices(hulls, n, dev)
    if V.shape[1] == 0:
        z = torch.zeros(n, dtype=F64, device=dev)
        return {"MinFeretDiameter": z, "MaxFeretDiameter": z.clone()}
    pair = valid[:, :, None] & valid[:, None, :]
    d2 = ((V[:, :, None, :] - V[:, None, :, :]) ** 2).sum(-1)
    max_feret = torch.sqrt(torch.where(pair, d2, torch.zeros_like(d2)).amax((1, 2)))
    counts = valid.sum(1)
    h = V.shape[1]
    nxt = (torch.arange(h, device=dev)[None, :] + 1) % counts.clamp(min=1)[:, None]
    E = torch.gather(V, 1, nxt[:, :, None].expand(-1, -1, 2)) - V  # (n, h, 2) edge vectors
    length = torch.sqrt((E ** 2).sum(-1))
    rel = V[:, None, :, :] - V[:, :, None, :]  # (n, edge, vertex, 2)
    cross = (E[:, :, None, 0] * rel[..., 1] - E[:, :, None, 1] * rel[..., 0]).abs()
    width = torch.where(valid[:, None, :], cross, torch.zeros_like(cross)).amax(2) / length
    width = torch.where(valid & (length > 0), width, torch.full_like(width, float("inf"))).amin(1)
    min_feret = torch.where(counts > 2, width, torch.zeros_like(width))
    return {"MinFeretDiameter": min_feret, "MaxFeretDiameter": max_feret}
