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

import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.plate.channels import is_brightfield
from cpvs.plate.discover import discover_plate
from cpvs.plate.layout import Field, Plate
from cpvs.plate.tiff import read_image, write_image
from cpvs.predict.runner import shard_fields
from cpvs.preprocess.illumination import plate_illumination
from cpvs.profile.features import check_engine, check_skip
from cpvs.profile.features import measure_field as measure_field_cp_measure
from cpvs.profile.segment import Masks, SegmentParams, pair_objects, segment_field
from cpvs.runinfo import atomic_path, plain, write_run_record
from cpvs.tables import aggregate

Progress = Callable[..., None]
CELLS_DIR = ".cpvs-cells"
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
    (``masks/<plate>/``), a folder of ``<plate>/`` sub-folders, or the files themselves
    (e.g. ``cpvs simulate``'s ground-truth ``masks/``)."""
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
    f, read_channels, measure_channels, illum, cfg, cell_path, overlay = job
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
        with atomic_path(cell_path) as tmp:
            table.to_parquet(tmp, index=False)
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
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cells_dir = out / CELLS_DIR / plate.name
    cell_path = lambda f: cells_dir / f"{f.well}_s{f.site}.parquet"  # noqa: E731
    mine = shard_fields(plate.fields, cfg.shard)
    done = [f for f in mine if cell_path(f).exists()]
    todo = [f for f in mine if not cell_path(f).exists()]
    illum = (plate_illumination(plate, read, cfg.illum_size, cfg.illum_fields, out / ".cpvs-cache", max(1, cfg.workers))
             if cfg.illum_size > 1 else None)
    overlay_keys = {f.key for f in plate.fields[: cfg.overlays]}
    jobs = [(f, read, measure, illum, cfg, cell_path(f), f.key in overlay_keys) for f in todo]
    skipped: list[dict] = list(plate.skipped)
    n_written = 0
    if cfg.workers > 1 and len(jobs) > 1:
        ex = ProcessPoolExecutor(cfg.workers, initializer=_one_thread)
        results = ex.map(_field_job, jobs, chunksize=1)
        threads = None
    else:
        ex = None
        results = map(_field_job, jobs)
        threads = _one_thread() if cfg.engine == "cpvs" and jobs else None
    try:
        for k, (key, n_cells, err) in enumerate(results):
            if err is not None:
                if cfg.on_error != "skip":
                    raise CpvsError(err)
                skipped.append({"field": key, "reason": err})
            else:
                n_written += 1
            progress("fields", len(done) + k + 1, len(mine), info=f"{n_cells} cells")
    finally:
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
    params = plain(cfg)
    record = "cpvs-run.json" if cfg.shard == (1, 1) else f"cpvs-run.shard-{cfg.shard[0]}-of-{cfg.shard[1]}.json"
    write_run_record(out, "profile", params, inputs={"plate": str(cfg.plate)}, name=record, skipped=skipped)
    res = ProfileResult(out, plate.name, len(mine), n_written, len(done), 0, False, skipped=skipped)
    finished = [f for f in plate.fields if cell_path(f).exists()]
    failed = {s["field"] for s in skipped}
    if len(finished) + len([f for f in plate.fields if f.key in failed]) >= len(plate.fields) and finished:
        res.tables = aggregate_plate(plate, finished, cell_path, out, cfg)
        res.complete = True
        res.n_cells = int(pd.read_parquet(res.tables["image"], columns=["Image_Count_Cells"])["Image_Count_Cells"].sum())
    res.seconds = time.perf_counter() - t0
    return res


def perturbation_columns(table: pd.DataFrame) -> list[str]:
    if "Metadata_Perturbation" in table.columns:
        return ["Metadata_Perturbation"]
    cols = [c for c in ("Metadata_Compound", "Metadata_Concentration") if c in table.columns]
    return cols or ["Metadata_Well"]


def aggregate_plate(plate: Plate, fields: list[Field], cell_path, out: Path, cfg: ProfileConfig) -> dict[str, Path]:
    """Single cells -> image (median) -> well -> perturbation tables with the platemap's metadata."""
    meta = plate.table()
    index = {f.key: i for i, f in enumerate(plate.fields)}
    images, cells_all = [], []
    for f in fields:
        cells = pd.read_parquet(cell_path(f))
        feats = [c for c in cells.columns if not c.startswith("Metadata_")]
        row = cells[feats].median().to_frame().T if len(cells) else pd.DataFrame([{c: np.nan for c in feats}])
        row.insert(0, "Image_Count_Cells", len(cells))
        images.append(pd.concat([meta.iloc[[index[f.key]]].reset_index(drop=True), row], axis=1))
        if cfg.single_cells:
            cells_all.append(cells)
    image = pd.concat(images, ignore_index=True)
    features = [c for c in image.columns if not c.startswith("Metadata_")]
    well_keys = ["Metadata_Plate", "Metadata_Well"]
    keep = [c for c in meta.columns if c not in well_keys + ["Metadata_Site"]]
    well = aggregate(image, well_keys, features, cfg.aggregate, keep).rename(columns={"n_profiles": "Metadata_Count_Images"})
    pert_keys = perturbation_columns(well)
    keep_p = [c for c in keep if c not in pert_keys and c != "Metadata_Well"]
    pert = aggregate(well, pert_keys, features, cfg.aggregate, keep_p).rename(columns={"n_profiles": "Metadata_Count_Wells"})
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
