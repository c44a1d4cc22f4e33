"""``cpvs preprocess``: plates of TIFFs -> illumination-corrected, z-scored, chunked store.

Resumable: illumination functions and each field are marked done only once fully
written, so a killed run rerun into the same store continues where it stopped
and ends with the same arrays as an uninterrupted run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import zarr

from cpvs import __version__
from cpvs.errors import CpvsError, warn
from cpvs.jobs import OutputLock, clear_outputs, is_empty_output, thread_pool
from cpvs.plate.layout import Field, Plate
from cpvs.plate.stack import read_field_stack
from cpvs.preprocess.illumination import illumination_function
from cpvs.preprocess.normalize import clip, resize_image, zscore
from cpvs.preprocess.store import FORMAT, create_store, is_created
from cpvs.runinfo import fingerprint, write_run_record

Progress = Callable[[str, int, int], None]  # (stage, completed, total)


@dataclass
class PreprocessResult:
    store: Path
    channels: list[str]
    shape: tuple[int, int]
    n_fields: int
    n_written: int  # fields written by this run
    n_resumed: int  # fields already finished by an earlier run
    skipped: list[dict] = field(default_factory=list)
    channel_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def _try(fn, *args):
    try:
        return fn(*args), None
    except CpvsError as e:
        return None, e


FEW_FIELDS = 10  # below this, an averaged field is mostly cells (METHODS §1 averages a whole plate)


def _params(plates: list[Plate], illum_size, size, resize_method, clip_z, dtype, chunk) -> dict:
    return {
        "channels": plates[0].channels,
        "plates": [p.name for p in plates],
        "fields": fingerprint([f.files[c] for p in plates for f in p.fields for c in p.channels]),
        "n_fields_found": sum(len(p.fields) for p in plates),
        "illum_size": illum_size,
        "size": list(size) if size else None,
        "resize_method": resize_method,
        "clip": clip_z,
        "dtype": dtype,
        "chunk": chunk,
    }


def _check_target(out: Path, params: dict, overwrite: bool) -> None:
    if not out.exists():
        return
    if overwrite:
        clear_outputs(out)
        return
    if (out / "zarr.json").exists():
        old = dict(zarr.open_group(str(out), mode="r").attrs).get("params")
        if old is not None and old != params:
            diff = [k for k in params if old.get(k) != params[k]]
            raise CpvsError(
                f"store was made from other inputs or parameters (differs in: {', '.join(diff)})",
                out,
                "write to a new -o folder, or pass --overwrite to replace it",
            )
        return
    if not is_empty_output(out) and any(p.name != "skipped.csv" for p in out.iterdir() if not p.name.startswith(".cpvs-lock")):
        raise CpvsError("output folder exists and is not a cpvs store", out, "choose an empty or new -o folder")


def _illumination_pass(g, out: Path, p: Plate, channels, illum_size, workers, on_error, progress) -> dict:
    """Read every field of plate ``p`` once, store its illumination functions, and
    return what a resumed run needs: the native shape and the unreadable fields."""
    bad: list[dict] = []

    def fail(f: Field, err: CpvsError) -> None:
        if on_error != "skip":
            raise err
        bad.append({"field": f.key, "reason": err.render()})

    shape0 = None
    for f in p.fields:  # the first readable field fixes the expected shape
        stack, err = _try(read_field_stack, f, channels)
        if err is None:
            shape0 = stack.shape[1:]
            break
        fail(f, err)
    if shape0 is None:
        pd.DataFrame(bad).to_csv(out / "skipped.csv", index=False)
        raise CpvsError(f"no readable field in plate {p.name} ({len(bad)} tried; the first: {bad[0]['reason'].splitlines()[0]})",
                        p.root, "fix or re-export the files listed in skipped.csv of the output, then rerun")
    if illum_size > 1 and len(p.fields) < FEW_FIELDS:
        warn(f"the illumination function of plate {p.name} is estimated from {len(p.fields)} field(s): with so few it "
             "follows the cells as much as the illumination", p.root,
             "preprocess more fields of the plate together, or pass --illum-size 0 to leave illumination uncorrected")
    total = np.zeros((len(channels), *shape0), dtype=np.float64)
    n_ok = 0
    todo = [f for f in p.fields if f.key not in {b["field"] for b in bad}]
    with thread_pool(workers) as ex:
        # map() keeps field order, so the float sum is the same on every run.
        results = ex.map(lambda f: _try(read_field_stack, f, channels, shape0), todo)
        for i, (f, (stack, err)) in enumerate(zip(todo, results)):
            if err is not None:
                fail(f, err)
            else:
                total += stack
                n_ok += 1
            progress(f"illumination {p.name}", i + 1, len(todo))
    mean = total / max(n_ok, 1)
    func = np.stack([illumination_function(m, illum_size) if illum_size > 1 else np.ones_like(m, dtype=np.float32) for m in mean])
    g.require_group("illum").create_array(p.name, data=func, chunks=(1, *func.shape[1:]), overwrite=True)
    return {"shape": list(shape0), "bad": bad, "n_fields": n_ok}


def preprocess_plates(
    plates: list[Plate],
    out: str | Path,
    *,
    illum_size: int = 249,
    size: tuple[int, int] | None = None,
    resize_method: str = "bilinear",
    clip_z: float | None = 15.0,
    dtype: str = "float16",
    chunk: int = 256,
    workers: int = 2,
    on_error: str = "raise",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> PreprocessResult:
    """Illumination-correct, resize, z-score and clip every field of ``plates`` into a store at ``out``.

    Each plate gets its own illumination function per channel. All plates must
    have the same channels; fields of different sizes need a common ``size``.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if not plates:
        raise CpvsError("no plates given")
    channels = plates[0].channels
    for p in plates[1:]:
        if p.channels != channels:
            raise CpvsError(
                f"plate {p.name} has channels {p.channels}, plate {plates[0].name} has {channels}",
                p.root,
                "give every plate the same channel map, or pass --channels",
            )
    names = [p.name for p in plates]
    if len(set(names)) != len(names):
        raise CpvsError(f"two plates share a name ({names}); plates must have distinct names", hint="pass --plate-name")
    if dtype not in ("float16", "float32"):
        raise CpvsError(f"--dtype must be float16 or float32, got {dtype!r}")
    params = _params(plates, illum_size, size, resize_method, clip_z, dtype, chunk)
    with OutputLock(out, "preprocess"):
        _check_target(out, params, overwrite)
        fresh = not (out / "zarr.json").exists()
        try:
            return _preprocess(plates, out, params, channels, illum_size, size, resize_method, clip_z, dtype, chunk, workers,
                               on_error, progress, t0)
        except CpvsError:
            if fresh:  # nothing was stored: leave no half store behind, only the list of bad fields
                clear_outputs(out, [p.name for p in out.iterdir() if p.name != "skipped.csv"])
            raise


def _preprocess(plates, out, params, channels, illum_size, size, resize_method, clip_z, dtype, chunk, workers, on_error,
                progress, t0) -> PreprocessResult:
    out.mkdir(parents=True, exist_ok=True)
    g = zarr.open_group(str(out), mode="a")
    g.attrs.update({"params": params, "cpvs_version": __version__})
    progress = progress or (lambda *_: None)
    skipped: list[dict] = [s for p in plates for s in p.skipped]

    # Pass 1: illumination function per plate and channel.
    illum_done = dict(g.attrs).get("illum_done", {})
    native: dict[str, tuple[int, int]] = {}
    bad: dict[str, set[str]] = {}
    for p in plates:
        if p.name not in illum_done:
            illum_done[p.name] = _illumination_pass(g, out, p, channels, illum_size, workers, on_error, progress)
            g.attrs["illum_done"] = illum_done
        native[p.name] = tuple(illum_done[p.name]["shape"])
        bad[p.name] = {b["field"] for b in illum_done[p.name]["bad"]}
        skipped += illum_done[p.name]["bad"]
    shapes = {tuple(s) for s in native.values()}
    if size is None and len(shapes) > 1:
        raise CpvsError(f"plates have different field sizes {sorted(shapes)}", hint="pass --size to resize all fields to one size")
    target = tuple(size) if size else next(iter(shapes))

    # Pass 2: fields.
    entries = [(p, f) for p in plates for f in p.fields if f.key not in bad[p.name]]
    if not entries:
        raise CpvsError("no readable fields left", hint="see the skipped fields in the run folder")
    table = pd.concat(
        [p.table()[[f.key not in bad[p.name] for f in p.fields]] for p in plates], ignore_index=True
    )
    if not is_created(g):
        g = create_store(out, channels, target, table, params, dtype=dtype, chunk=chunk)
    else:
        old = pd.read_parquet(out / "fields.parquet")
        if len(old) != len(table):
            raise CpvsError("store holds a different field list; it cannot be resumed", out, "pass --overwrite")
    images, done, stats = g["images"], g["done"], g["stats"]
    done_mask = np.asarray(done[:], dtype=bool)
    n_resumed = int(done_mask.sum())
    illum = {p.name: np.asarray(g["illum"][p.name][:]) for p in plates}

    def process(i: int):
        p, f = entries[i]
        stack, err = _try(read_field_stack, f, channels, native[p.name])
        if err is not None:
            return i, err
        stack /= illum[p.name]
        z = np.empty((len(channels), *target), dtype=np.float32)
        st = np.empty((len(channels), 2))
        for c in range(len(channels)):
            img = resize_image(stack[c], target, resize_method)
            z[c], st[c, 0], st[c, 1] = zscore(img)
            clip(z[c], clip_z)
        images[i] = z.astype(dtype)
        stats[i] = st
        done[i] = True  # only after the image chunks are on disk
        return i, None

    todo = [i for i in range(len(entries)) if not done_mask[i]]
    n_written = 0
    progress("fields", n_resumed, len(entries))
    with thread_pool(workers) as ex:
        for k, (i, err) in enumerate(ex.map(process, todo)):
            if err is not None:
                if on_error != "skip":
                    raise err
                skipped.append({"field": entries[i][1].key, "reason": err.render()})
            else:
                n_written += 1
            progress("fields", n_resumed + k + 1, len(entries))

    done_mask = np.asarray(done[:], dtype=bool)
    st = np.asarray(stats[:])[done_mask]
    channel_stats = {
        c: {"mean": float(np.median(st[:, j, 0])), "std": float(np.median(st[:, j, 1]))} for j, c in enumerate(channels)
    }
    g.attrs.update({"format": FORMAT, "complete": bool(done_mask.all()), "channel_stats": channel_stats, "skipped": skipped})
    if skipped:
        pd.DataFrame(skipped).to_csv(out / "skipped.csv", index=False)
    write_run_record(
        out, "preprocess", params,
        inputs={p.name: {"root": str(p.root), "layout": p.layout, "platemap": str(p.platemap_path) if p.platemap_path else None} for p in plates},
        n_fields=len(entries), skipped=skipped,
    )
    return PreprocessResult(
        out, channels, target, len(entries), n_written, n_resumed, skipped, channel_stats, time.perf_counter() - t0
    )
