"""``cpvs profile PLATE``: segment, measure, aggregate (and optionally normalize and select).

Per field (in parallel worker processes): read the stains, correct illumination
per plate and channel (as for training), scale to [0, 1], segment (or load the
masks of another plate with ``masks_from``), measure (``engine``: cpvs's own
vectorized engine, or cp_measure, the reference), and write the single-cell
table and the masks. Finished fields are skipped on a rerun;
``shard`` takes every n-th field. When every field of a plate is done, single
cells are aggregated to images (median), wells and perturbations, with the
platemap's ``Metadata_`` columns, and written as Parquet.

Real and predicted plates go through exactly the same steps; with
``masks_from`` pointing at the real plate's profile output, a predicted plate is
measured inside the ground-truth cells.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.jobs import OutputLock, claim_identity, clear_outputs, process_pool
from cpvs.plate.channels import is_brightfield
from cpvs.plate.discover import discover_plate
from cpvs.plate.layout import Field, Plate
from cpvs.plate.omezarr import is_plate_store, label_plane
from cpvs.plate.omezarr_write import write_field_labels
from cpvs.plate.shards import Shard
from cpvs.plate.tiff import read_image, write_image
from cpvs.preprocess.illumination import plate_illumination
from cpvs.profile.features import check_engine, check_skip
from cpvs.profile.features import measure_field as measure_field_cp_measure
from cpvs.profile.segment import Masks, SegmentParams, pair_objects, segment_field
from cpvs.runinfo import atomic_path, fingerprint, plain, write_json_atomic, write_run_record
from cpvs.tables import to_perturbations, to_wells

Progress = Callable[..., None]
CELLS_DIR = ".cpvs-cells"
IDENTITY_KEY = "cpvs_identity"
MASK_KINDS = ("nuclei", "cells")


@dataclass
class ProfileConfig:
    plate: Path
    out: Path
    channel_map: str | None = None
    channels: list[str] | None = None  # measured channels; default: every stain (not brightfield)
    platemap: Path | None = None
    plate_name: str | None = None
    segment: SegmentParams = field(default_factory=SegmentParams)
    masks_from: Path | None = None
    masks_format: str = "tiff"  # tiff: OUT/masks/<plate>/; ome-zarr: NGFF labels in the (OME-Zarr) plate's own store
    skip: tuple[str, ...] = ()
    engine: str = "cpvs"  # cpvs | cp_measure (the reference, ~20-50x slower)
    device: str = "cpu"  # torch device of the cpvs engine: cpu, cuda, cuda:N
    illum_size: int = 249
    illum_fields: int = 256
    workers: int = 1
    shard: tuple[int, int] = (1, 1)
    single_cells: bool = False
    aggregate: str = "median"
    overlays: int = 0
    on_error: str = "raise"
    overwrite: bool = False  # replace this plate's outputs made with other parameters

    def identity(self, plate: Plate) -> dict:
        """What determines the per-field results (not workers, shards, error policy or the final aggregation)."""
        d = {k: v for k, v in plain(self).items() if k not in ("out", "workers", "shard", "on_error", "overwrite", "aggregate",
                                                                "single_cells", "overlays", "plate")}
        d["plate"], d["input_files"] = plate.name, fingerprint([p for f in plate.fields for p in f.files.values()])
        return d


@dataclass
class ProfileResult:
    out: Path
    plate: str
    n_fields: int
    n_written: int
    n_resumed: int
    n_cells: int
    complete: bool
    tables: dict[str, Path] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def mask_name(f: Field, kind: str) -> str:
    return f"{f.well}_s{f.site}_{kind}.tiff"


def find_masks(folder: Path, f: Field) -> tuple[Path, Path]:
    """Nuclei and cell label images of field ``f`` under ``folder``: a ``cpvs profile`` output
    (``masks/<plate>/``), a folder of ``<plate>/`` sub-folders, the files themselves
    (e.g. ``cpvs simulate``'s ground-truth ``masks/``), or an OME-Zarr plate's NGFF labels."""
    if is_plate_store(folder):
        return label_plane(folder, f.well, f.site, "nuclei"), label_plane(folder, f.well, f.site, "cells")  # type: ignore[return-value]
    for base in (folder / "masks" / f.plate, folder / f.plate, folder / "masks", folder):
        paths = tuple(base / mask_name(f, k) for k in MASK_KINDS)
        if all(p.exists() for p in paths):
            return paths  # type: ignore[return-value]
    raise CpvsError(f"no masks for field {f.well} site {f.site} (looked for {mask_name(f, 'nuclei')})", folder,
                    "point --masks-from at the output of `cpvs profile` on the matching plate")


def load_masks(folder: Path, f: Field) -> Masks:
    """Masks of another plate; objects without both a nucleus and a cell are left out."""
    nuc_path, cell_path = find_masks(folder, f)
    nuclei, cells = read_image(nuc_path).astype(np.int32), read_image(cell_path).astype(np.int32)
    if nuclei.shape != cells.shape:
        raise CpvsError(f"nuclei and cell masks differ in shape ({nuclei.shape} vs {cells.shape})", nuc_path)
    return pair_objects(nuclei, cells)


def _overlay_png(path: Path, images: dict[str, np.ndarray], masks: Masks, seg: SegmentParams) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage.segmentation import find_boundaries

    def norm(x):
        lo, hi = np.percentile(x, [1, 99.7])
        return np.clip((x - lo) / max(hi - lo, 1e-12), 0, 1)

    rgb = np.zeros((*masks.cells.shape, 3))
    rgb[..., 2] = norm(images[seg.nuclei_channel])
    if seg.cell_channel in images:
        rgb[..., 1] = 0.8 * norm(images[seg.cell_channel])
    rgb[find_boundaries(masks.cells)] = (1, 0.25, 0.25)
    rgb[find_boundaries(masks.nuclei)] = (1, 1, 0)
    fig = plt.figure(figsize=(8, 8))
    plt.imshow(rgb)
    plt.axis("off")
    plt.title(f"{path.stem}: {masks.n} cells (red), nuclei (yellow)")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight", format="png")
    plt.close(fig)


def measure(images: dict[str, np.ndarray], masks: Masks, channels: list[str], cfg: ProfileConfig) -> pd.DataFrame:
    """One field's single-cell table with the configured engine."""
    if cfg.engine == "cp_measure":
        return measure_field_cp_measure(images, masks, channels, cfg.skip)
    from cpvs.profile.engine import measure_field

    return measure_field(images, masks, channels, cfg.skip, device=cfg.device)


def _one_thread() -> int:
    """One torch thread per process: the engine's parallelism is across fields (--workers). Its
    many small kernels gain nothing from intra-op threads, and OpenMP's spinning threads lose
    several-fold on a busy machine (measured in benchmarks/profile_field.py). Returns the
    previous thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    return before


def _field_job(job: tuple) -> tuple[str, int, str | None]:
    """Runs in a worker process: one field to its single-cell table, masks and overlay."""
    f, read_channels, measure_channels, illum, cfg, cell_path, overlay, digest = job
    try:
        images = {}
        for i, c in enumerate(read_channels):
            img = read_image(f.files[c]).astype(np.float64)
            if illum is not None:
                img = img / illum[i]
            images[c] = img / 65535.0  # cp_measure expects CellProfiler's [0, 1] scale
        if cfg.masks_from is not None:
            masks = load_masks(Path(cfg.masks_from), f)
            shape = next(iter(images.values())).shape
            if masks.cells.shape != shape:
                raise CpvsError(f"masks are {masks.cells.shape}, the field {shape}", find_masks(Path(cfg.masks_from), f)[1])
        else:
            masks = segment_field(images, cfg.segment)
            if cfg.masks_format == "ome-zarr":
                write_field_labels(f, {"nuclei": masks.nuclei.astype(np.uint32), "cells": masks.cells.astype(np.uint32)})
            else:
                mdir = Path(cfg.out) / "masks" / f.plate
                write_image(mdir / mask_name(f, "nuclei"), masks.nuclei.astype(np.uint32), compression="zlib")
                write_image(mdir / mask_name(f, "cells"), masks.cells.astype(np.uint32), compression="zlib")
        table = measure(images, masks, measure_channels, cfg)
        table.insert(0, "Metadata_Site", f.site)
        table.insert(0, "Metadata_Well", f.well)
        table.insert(0, "Metadata_Plate", f.plate)
        table = table.rename(columns={"ObjectNumber": "Metadata_ObjectNumber"})
        if overlay:
            _overlay_png(Path(cfg.out) / "overlays" / f"{f.plate}_{f.well}_s{f.site}.png", images, masks, cfg.segment)
        table.attrs[IDENTITY_KEY] = digest  # the parameters this field was measured with
        with atomic_path(cell_path) as tmp:
            table.to_parquet(tmp, index=False)
        cell_path.with_name(cell_path.stem + ".skipped.json").unlink(missing_ok=True)  # skipped by an earlier run
        return f.key, masks.n, None
    except CpvsError as e:
        return f.key, 0, e.render()


def _read_channels(plate: Plate, cfg: ProfileConfig) -> tuple[list[str], list[str]]:
    measure = cfg.channels or [c for c in plate.channels if not is_brightfield(c)]
    missing = [c for c in measure if c not in plate.channels]
    if missing:
        raise CpvsError(f"channel(s) {', '.join(missing)} not in the plate (it has {', '.join(plate.channels)})", plate.root)
    read = list(measure)
    if cfg.masks_from is None:
        for c in (cfg.segment.nuclei_channel, cfg.segment.cell_channel):
            if c not in plate.channels:
                raise CpvsError(f"segmentation needs the {c} channel, which the plate lacks (it has {', '.join(plate.channels)})",
                                plate.root, "choose --nuclei-channel / --cell-channel, or pass --masks-from")
            if c not in read:
                read.append(c)
    return read, measure


def profile_plate(cfg: ProfileConfig, progress: Progress | None = None) -> ProfileResult:
    t0 = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    check_skip(cfg.skip)
    check_engine(cfg.engine, cfg.device)
    if cfg.aggregate not in ("median", "mean"):
        raise CpvsError(f"--aggregate must be median or mean, got {cfg.aggregate!r}")
    plate = discover_plate(cfg.plate, channel_map=cfg.channel_map, plate_name=cfg.plate_name, platemap=cfg.platemap,
                           on_error=cfg.on_error)
    read, measure = _read_channels(plate, cfg)
    if cfg.masks_format not in ("tiff", "ome-zarr"):
        raise CpvsError(f"--masks-format must be tiff or ome-zarr, got {cfg.masks_format!r}")
    if cfg.masks_format == "ome-zarr" and plate.layout != "ome-zarr":
        raise CpvsError("--masks-format ome-zarr writes NGFF labels into the plate's own OME-Zarr store; this plate is TIFFs",
                        cfg.plate, "convert it first (`cpvs convert PLATE -o plate.zarr`), or use --masks-format tiff")
    out = Path(cfg.out)
    with OutputLock(out, "profile", cfg.shard, name=plate.name):
        if cfg.overwrite:
            clear_outputs(out / CELLS_DIR, [plate.name])
            clear_outputs(out / "masks", [plate.name])
        digest = claim_identity(out, "profile", cfg.identity(plate), cfg.overwrite, name=plate.name)
        return _profile_plate(cfg, plate, read, measure, out, digest, progress, t0)


def _profile_plate(cfg: ProfileConfig, plate: Plate, read, measure, out: Path, digest: str, progress, t0) -> ProfileResult:
    cells_dir = out / CELLS_DIR / plate.name
    cell_path = lambda f: cells_dir / f"{f.well}_s{f.site}.parquet"  # noqa: E731
    skip_path = lambda f: cells_dir / f"{f.well}_s{f.site}.skipped.json"  # noqa: E731
    mine = Shard(*cfg.shard).select(plate.fields)
    done = [f for f in mine if cell_path(f).exists()]
    todo = [f for f in mine if not cell_path(f).exists()]
    progress("illumination", 0, 1, info=f"estimating the plate's illumination from up to {cfg.illum_fields} fields")
    illum = (plate_illumination(plate, read, cfg.illum_size, cfg.illum_fields, out / ".cpvs-cache", max(1, cfg.workers),
                                 cfg.on_error)
             if cfg.illum_size > 1 else None)
    progress("illumination", 1, 1)
    progress("fields", len(done), len(mine), info="segmenting and measuring")
    overlay_keys = {f.key for f in plate.fields[: cfg.overlays]}
    jobs = [(f, read, measure, illum, cfg, cell_path(f), f.key in overlay_keys, digest) for f in todo]
    skipped: list[dict] = list(plate.skipped)
    n_written = 0
    threads = _one_thread() if cfg.engine == "cpvs" and jobs and not (cfg.workers > 1 and len(jobs) > 1) else None
    try:
        with process_pool(cfg.workers, _one_thread) if cfg.workers > 1 and len(jobs) > 1 else nullcontext() as ex:
            results = ex.map(_field_job, jobs, chunksize=1) if ex is not None else map(_field_job, jobs)
            for k, (key, n_cells, err) in enumerate(results):
                if err is not None:
                    if cfg.on_error != "skip":
                        raise CpvsError(err)
                    skipped.append({"field": key, "reason": err})
                else:
                    n_written += 1
                progress("fields", len(done) + k + 1, len(mine), info=f"{n_cells} cells")
    finally:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    by_key = {f.key: f for f in plate.fields}
    for item in skipped:  # other shards see it: the plate is complete without it (a rerun retries it)
        if item["field"] in by_key:
            write_json_atomic(skip_path(by_key[item["field"]]), item)
    params = plain(cfg)
    record = Shard(*cfg.shard).record_name()
    write_run_record(out, "profile", params, inputs={"plate": str(cfg.plate)}, name=record, skipped=skipped)
    res = ProfileResult(out, plate.name, len(mine), n_written, len(done), 0, False, skipped=skipped)
    finished = [f for f in plate.fields if cell_path(f).exists()]
    if finished and all(cell_path(f).exists() or skip_path(f).exists() for f in plate.fields):
        res.tables = _finalize(plate, finished, cell_path, out, cfg, digest)
        res.complete = bool(res.tables)
        if res.complete:
            res.n_cells = int(pd.read_parquet(res.tables["image"], columns=["Image_Count_Cells"])["Image_Count_Cells"].sum())
    res.seconds = time.perf_counter() - t0
    return res


def _finalize(plate: Plate, finished: list[Field], cell_path, out: Path, cfg: ProfileConfig, digest: str) -> dict[str, Path]:
    """The plate tables, written once: by the shard that completes the plate (another finishing at the same
    moment finds the lock held and leaves it), and not again by a rerun that would write the same tables."""
    names = ["image", "well", "perturbation"] + (["single_cells"] if cfg.single_cells else [])
    paths = {n: out / f"{plate.name}_{n}.parquet" for n in names}
    marker = out / f".cpvs-tables-{plate.name}.json"
    state = {"identity": digest, "fields": sorted(f.key for f in finished), "aggregate": cfg.aggregate,
             "single_cells": cfg.single_cells}
    try:
        lock = OutputLock(out, "profile tables", name=f"{plate.name}-tables").acquire()
    except CpvsError:
        return {}
    try:
        if marker.exists() and json.loads(marker.read_text()) == state and all(p.exists() for p in paths.values()):
            return paths
        paths = aggregate_plate(plate, finished, cell_path, out, cfg, digest)
        write_json_atomic(marker, state)
        return paths
    finally:
        lock.release()


def aggregate_plate(plate: Plate, fields: list[Field], cell_path, out: Path, cfg: ProfileConfig,
                    digest: str | None = None) -> dict[str, Path]:
    """Single cells -> image (median) -> well -> perturbation tables with the platemap's metadata.
    Every field's table must carry ``digest`` (the parameters of this run) when given."""
    meta = plate.table()
    index = {f.key: i for i, f in enumerate(plate.fields)}
    images, cells_all = [], []
    for f in fields:
        cells = pd.read_parquet(cell_path(f))
        if digest is not None and cells.attrs.get(IDENTITY_KEY) != digest:
            raise CpvsError("this field was measured with other parameters than the rest of the plate", cell_path(f),
                            "rerun with --overwrite to measure every field with the same parameters")
        feats = [c for c in cells.columns if not c.startswith("Metadata_")]
        row = cells[feats].median().to_frame().T if len(cells) else pd.DataFrame([{c: np.nan for c in feats}])
        row.insert(0, "Image_Count_Cells", len(cells))
        images.append(pd.concat([meta.iloc[[index[f.key]]].reset_index(drop=True), row], axis=1))
        if cfg.single_cells:
            cells_all.append(cells)
    image = pd.concat(images, ignore_index=True)
    features = [c for c in image.columns if not c.startswith("Metadata_")]
    well = to_wells(image, features, cfg.aggregate)
    pert = to_perturbations(well, features, cfg.aggregate)
    paths = {}
    for name, df in (("image", image), ("well", well), ("perturbation", pert)):
        paths[name] = out / f"{plate.name}_{name}.parquet"
        with atomic_path(paths[name]) as tmp:
            df.to_parquet(tmp, index=False)
    if cfg.single_cells:
        cells = pd.concat(cells_all, ignore_index=True)
        cells = cells.merge(meta, on=["Metadata_Plate", "Metadata_Well", "Metadata_Site"], how="left")
        cells = cells[[c for c in cells.columns if c.startswith("Metadata_")] + [c for c in cells.columns if not c.startswith("Metadata_")]]
        paths["single_cells"] = out / f"{plate.name}_single_cells.parquet"
        with atomic_path(paths["single_cells"]) as tmp:
            cells.to_parquet(tmp, index=False)
    return paths
