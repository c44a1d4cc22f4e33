"""cpvs's own CellProfiler-feature engine: the measurements of the cp_measure path
(:func:`cpvs.profile.features.measure_field`), vectorized over objects in torch, so the same
code runs on one CPU thread, on all cores, or on a GPU (``device="cuda"``).

One module per CellProfiler module: :mod:`.intensity`, :mod:`.sizeshape` (with :mod:`.zernike`
and :mod:`.feret`), :mod:`.texture`, :mod:`.granularity`, :mod:`.radial` (with :mod:`.inner_distance`), :mod:`.correlation`
(with :mod:`.costes`) and :mod:`.neighbors`, on the shared bookkeeping of :mod:`.objects`.
:func:`measure_field` returns the same columns, named the same way, with the same row
conventions as the cp_measure path (one row per object 1..N, NaN where a compartment has no
pixels for an object, no row at all for an empty field, a lone object without neighbours).
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import torch

from cpvs.device import resolve_device
from cpvs.errors import CpvsError
from cpvs.profile.features import COMPARTMENTS, LONE_OBJECT, check_skip, cellprofiler_name
from cpvs.profile.segment import Masks

# Modules written alongside this package; the engine tells which of them a measurement needs.
# Object pixels measured at once: a 998² field's cells are ~250k; denser fields go in slices,
# which bounds the engine's memory (each module keeps a few dozen per-pixel arrays).
MAX_PIXELS = 2**20
_CHANNEL_MODULES = {"texture": ("texture",), "granularity": ("granularity",),
                    "radial": ("radial_distribution", "radial_zernikes")}


def available(module: str) -> bool:
    """Whether the engine module ``cpvs.profile.engine.<module>`` exists in this installation."""
    return importlib.util.find_spec(f"{__name__}.{module}") is not None


def _module(name: str, skip: tuple[str, ...]):
    wanted = [m for m in _CHANNEL_MODULES[name] if m not in skip]
    if not wanted:
        return None
    if not available(name):
        raise CpvsError(f"the cpvs engine cannot measure {', '.join(wanted)} yet",
                        hint=f"pass --skip {','.join(wanted)}, or use --engine cp_measure")
    return importlib.import_module(f"{__name__}.{name}")


def _objects(labels: torch.Tensor, n: int):
    """One :class:`~.objects.Objects` per label image, shared with the modules that cache it."""
    if available("texture"):
        from cpvs.profile.engine.texture import objects

        return objects(labels, n)
    from cpvs.profile.engine.objects import Objects

    return Objects.from_labels(labels, n)


@contextmanager
def _timed(timings: dict[str, float] | None, name: str, device: torch.device):
    """Adds the seconds spent in the block to ``timings[name]`` (when timings are asked for): CPU
    seconds of the process on a CPU device (on a busy machine its wall time says little), wall
    seconds on a GPU."""
    if timings is None:
        yield
        return
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    t = clock()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name] = timings.get(name, 0.0) + clock() - t


def _hulls(labels: torch.Tensor, n: int):
    """Convex hulls of one label image, shared with the radial Zernikes (which cache them)."""
    from cpvs.profile.engine.objects import convex_hulls

    if available("texture"):
        from cpvs.profile.engine.texture import cached_on

        return cached_on(labels, ("convex_hulls", n), lambda: convex_hulls(labels, n))
    return convex_hulls(labels, n)


def _numpy(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu").numpy()
    return np.asarray(v, dtype=np.float64)


def _channel_key(key: str, channel: str) -> str:
    """cp_measure's key of a per-channel feature (``Contrast_3_00_256__DNA``)."""
    return f"{key.removeprefix('Texture_')}__{channel}"


def measure_field(images: dict[str, np.ndarray], masks: Masks, channels: list[str], skip: tuple[str, ...] = (),
                  device: str = "cpu", timings: dict[str, float] | None = None, max_pixels: int = MAX_PIXELS) -> pd.DataFrame:
    """One row per object (``ObjectNumber`` 1..N) with every measurement of every compartment and channel.

    images: {channel: (H, W) float in [0, 1]}; masks: nuclei/cells/cytoplasm sharing labels 1..N;
    device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (a GPU when there is one). Same columns as the
    cp_measure path.
    timings: if given, seconds per module are added to it (``{"intensity": 0.21, ...}``).
    max_pixels: a compartment with more object pixels is measured in slices of its objects.
    """
    from cpvs.profile.engine import neighbors

    skip = check_skip(skip)
    n = masks.n
    if n == 0:
        return pd.DataFrame({"ObjectNumber": pd.Series([], dtype=np.int64)})
    on = lambda m: m not in skip  # noqa: E731
    texture, granularity, radial = (_module(m, skip) for m in ("texture", "granularity", "radial"))
    dev = resolve_device(device)
    imgs = {c: torch.as_tensor(np.asarray(images[c], dtype=np.float64), device=dev) for c in channels}
    corr = on("correlation") and len(channels) > 1
    labels_of = {"Nuclei": masks.nuclei, "Cells": masks.cells, "Cytoplasm": masks.cytoplasm}

    cols: dict[str, np.ndarray] = {}
    for comp in COMPARTMENTS:
        full = np.asarray(labels_of[comp])
        blocks: dict[str, np.ndarray] = {}
        whole = None  # the compartment's (labels, objects) when measured in one piece
        for lo, hi in _label_chunks(full, n, max_pixels):
            with _timed(timings, "objects", dev):
                part = full if (lo, hi) == (1, n + 1) else np.where((full >= lo) & (full < hi), full - (lo - 1), 0)
                labels = torch.as_tensor(part.astype(np.int64), device=dev)
                m = hi - lo
                obj = _objects(labels, m)
            if (lo, hi) == (1, n + 1):
                whole = labels, obj
            if not obj.seg.numel():
                continue
            res = _measure_objects(obj, labels, m, imgs, channels, on, corr, (texture, granularity, radial), timings, dev)
            blank = ~obj.present.cpu().numpy()
            for k, v in res.items():
                block = blocks.get(k)
                if block is None:
                    block = blocks[k] = np.full(n, np.nan)
                block[lo - 1:hi - 1] = _numpy(v)
                block[lo - 1:hi - 1][blank] = np.nan
            del obj, labels, res
        blocks = {cellprofiler_name(comp, k): v for k, v in blocks.items()}
        cols |= blocks
        if on("neighbors") and comp in ("Nuclei", "Cells"):
            with _timed(timings, "neighbors", dev):
                if n >= 2:
                    if whole is None:
                        labels = torch.as_tensor(full.astype(np.int64), device=dev)
                        whole = labels, _objects(labels, n)
                    found = neighbors.measure(whole[1])
                else:  # a lone object has no neighbour (cp_measure's measurement fails on it)
                    found = {f"Neighbors_{k}_Adjacent": np.full(n, v, dtype=np.float64) for k, v in LONE_OBJECT.items()}
                cols |= {f"{comp}_{k}": _numpy(v) for k, v in found.items()}
    # one float64 block for all the features (a frame built from thousands of columns is slow)
    df = pd.DataFrame(np.stack(list(cols.values()), 1) if cols else np.zeros((n, 0)), columns=list(cols))
    df.insert(0, "ObjectNumber", np.arange(1, n + 1))
    return _fill_empty_compartments(df, n)


def _label_chunks(labels: np.ndarray, n: int, max_pixels: int) -> list[tuple[int, int]]:
    """Consecutive label ranges [lo, hi) of at most ``max_pixels`` object pixels each (at least one
    label each): a dense field is measured a slice of its objects at a time, which bounds memory."""
    if np.count_nonzero(labels) <= max_pixels:  # the usual case, without counting per label
        return [(1, n + 1)]
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:n + 1]
    chunks, lo, size = [], 1, 0
    for label, c in enumerate(counts.tolist(), 1):  # a loop over object sizes, one number per object
        if size and size + c > max_pixels:
            chunks.append((lo, label))
            lo, size = label, 0
        size += c
    chunks.append((lo, n + 1))
    return chunks


def _measure_objects(obj, labels, n, imgs, channels, on, corr, p2_modules, timings, dev) -> dict:
    """cp_measure keys (channel-suffixed) -> (n,) values for the objects of one label image."""
    from cpvs.profile.engine import correlation, feret, intensity, sizeshape, zernike

    texture, granularity, radial = p2_modules
    res: dict[str, torch.Tensor | np.ndarray] = {}
    if on("sizeshape") or on("zernike") or on("feret"):
        with _timed(timings, "hulls", dev):
            hulls = _hulls(obj.labels, n)
        for name, module in (("sizeshape", sizeshape), ("zernike", zernike), ("feret", feret)):
            if on(name):
                with _timed(timings, name, dev):
                    res |= module.measure(obj, hulls)
    with _timed(timings, "intensity", dev):
        edge = intensity.edge_pixels(obj) if on("intensity") else None
    for ch in channels:
        image = imgs[ch]
        if on("intensity"):
            with _timed(timings, "intensity", dev):
                res |= {_channel_key(k, ch): v for k, v in intensity.measure(obj, image, edge).items()}
        for name, module in (("texture", texture), ("granularity", granularity)):
            if module is not None:
                with _timed(timings, name, dev):
                    res |= {_channel_key(k, ch): v for k, v in module.measure(labels, image, n).items()}
        if radial is not None:
            with _timed(timings, "radial", dev):
                found = radial.measure(labels, image, n, distribution=on("radial_distribution"), zernikes=on("radial_zernikes"))
            res |= {_channel_key(k, ch): v for k, v in found.items()}
    if corr:
        with _timed(timings, "correlation", dev):
            res |= correlation.measure(obj, imgs, costes=False)
        if on("costes"):
            with _timed(timings, "costes", dev):
                res |= correlation.measure_costes(obj, imgs)
    return res


def _fill_empty_compartments(df: pd.DataFrame, n: int) -> pd.DataFrame:
    """A compartment without any pixel (no cytoplasm anywhere) still gets its columns, all NaN,
    named after those measured in another compartment, as the cp_measure path names them."""
    have = {c.split("_", 1)[0] for c in df.columns if c != "ObjectNumber"}
    missing = [c for c in COMPARTMENTS if c not in have or not any(
        col.startswith(f"{c}_") and "_Neighbors_" not in col for col in df.columns)]
    if not missing:
        return df
    donor = next((c for c in COMPARTMENTS if c not in missing), None)
    if donor is None:
        return df
    extra = {}
    for col in df.columns:
        if col.startswith(f"{donor}_") and "_Neighbors_" not in col:
            for comp in missing:
                extra[comp + col[len(donor):]] = np.full(n, np.nan)
    return pd.concat([df, pd.DataFrame(extra, index=df.index)], axis=1)
