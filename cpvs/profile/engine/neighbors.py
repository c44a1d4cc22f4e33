"""MeasureObjectNeighbors, "Adjacent" method, objects of one label image as each other's
neighbours (as cpvs measures Nuclei and Cells).

Semantics of cp_measure's ``measureobjectneighbors(labels, labels, "Adjacent")``:

* NumberOfNeighbors: distinct other labels 4-adjacent to the object.
* PercentTouching: of the object's outline pixels (an 8-neighbour of another label, or on the
  field's edge), the percentage with an 8-neighbour in another object (not background).
* First/SecondClosestDistance: centre-to-centre distances to the nearest and second-nearest other
  objects; AngleBetweenNeighbors: the angle at the object's centre between them, in degrees.
  With two objects the second distance and the angle are 0 (cp_measure's initial values); a lone
  object has no neighbour: 0 neighbours, NaN distances and angle, 0 % touching.
"""

from __future__ import annotations

import math

import torch

from cpvs.profile.engine.objects import F64, Objects, take

_OFFSETS8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def measure(obj: Objects) -> dict[str, torch.Tensor]:
    """``Neighbors_<feature>_Adjacent`` -> (n,) float64 for every object of ``obj``."""
    n, dev = obj.n, obj.device
    nan = torch.full((n,), float("nan"), dtype=F64, device=dev)
    zero = torch.zeros(n, dtype=F64, device=dev)
    keys = ("NumberOfNeighbors", "FirstClosestDistance", "SecondClosestDistance", "AngleBetweenNeighbors", "PercentTouching")
    if n < 2:
        values = (zero, nan, nan, nan, zero)
        return {f"Neighbors_{k}_Adjacent": v.clone() for k, v in zip(keys, values)}

    lab = obj.labels
    H, W = lab.shape
    # Neighbour counts: distinct (object, other object) pairs across 4-adjacent pixels.
    a = torch.cat([lab[:, :-1].reshape(-1), lab[:-1, :].reshape(-1)])
    b = torch.cat([lab[:, 1:].reshape(-1), lab[1:, :].reshape(-1)])
    touch = (a != b) & (a > 0) & (b > 0)
    a, b = a[touch], b[touch]
    pairs = torch.unique(torch.cat([a * (n + 1) + b, b * (n + 1) + a]))
    count = torch.bincount(torch.div(pairs, n + 1, rounding_mode="floor") - 1, minlength=n).to(F64)

    # Outline and touching pixels from the 8 neighbours of each object pixel (outside the field:
    # another "label", -1), gathered from the padded field.
    padded = torch.nn.functional.pad(lab, (1, 1, 1, 1), value=-1).reshape(-1)
    W2 = W + 2
    at = (obj.y.to(torch.int64) + 1) * W2 + obj.x.to(torch.int64) + 1
    own = obj.seg + 1
    differs = torch.zeros_like(at, dtype=torch.bool)
    other_object = torch.zeros_like(differs)
    for dy, dx in _OFFSETS8:
        nb = take(padded, at + (dy * W2 + dx))
        ne = nb != own
        differs |= ne
        other_object |= ne & (nb > 0)
    percent = obj.sum((differs & other_object).to(F64)) * 100 / obj.sum(differs.to(F64))

    # Nearest other objects by centre distance (the object itself is the nearest, at 0).
    cy, cx = obj.mean(obj.y), obj.mean(obj.x)
    d = torch.sqrt((cy[:, None] - cy[None, :]) ** 2 + (cx[:, None] - cx[None, :]) ** 2)
    order = torch.topk(d, min(3, n), dim=1, largest=False, sorted=True).indices
    v1 = torch.stack([cx[order[:, 1]] - cx, cy[order[:, 1]] - cy])
    first = torch.sqrt((v1 ** 2).sum(0))
    if n > 2:
        v2 = torch.stack([cx[order[:, 2]] - cx, cy[order[:, 2]] - cy])
        second = torch.sqrt((v2 ** 2).sum(0))
        dot = (v1 * v2).sum(0) / torch.sqrt((v1 ** 2).sum(0) * (v2 ** 2).sum(0))
        angle = torch.arccos(dot) * 180.0 / math.pi
    else:
        second, angle = zero.clone(), zero.clone()
    values = (count, first, second, angle, percent)
    return {f"Neighbors_{k}_Adjacent": v for k, v in zip(keys, values)}
