"""``cpvs predict-plate``: a whole plate of brightfield fields -> predicted Cell Painting TIFFs
(or an OME-Zarr plate).

One path for every model: the checkpoint says its family, which picks the strategy
(:mod:`cpvs.predict.staining` for the U-Net, cWGAN generator and linear baseline;
:mod:`cpvs.predict.diffusion` for the diffusion model); ``model`` is only a check.
Shared by both: the checkpoint's own preprocessing of the raw TIFFs (illumination
correction estimated on this plate, resize, z-score, clip), the output plan (names,
resume, ``shard``), writing intensities and the run record (:mod:`cpvs.predict.plan`).

Options of one strategy given for another are an error naming them, never ignored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cpvs.device import check_precision, resolve_device
from cpvs.errors import CpvsError
from cpvs.jobs import OutputLock, claim_identity, clear_outputs
from cpvs.models import LoadedModel, load_model
from cpvs.plate.discover import discover_plate
from cpvs.plate.layout import Plate
from cpvs.predict import diffusion, staining
from cpvs.predict.config import BATCH_SIZE, DiffusionOptions, PredictConfig, TileOptions
from cpvs.predict.plan import FORMATS, FieldWriter, OutputPlan, plan_outputs, write_record
from cpvs.preprocess.apply import FieldNormalizer
from cpvs.runinfo import file_digest, fingerprint

Progress = Callable[..., None]
__all__ = ["PredictConfig", "PredictResult", "predict_plate", "TileOptions", "DiffusionOptions", "BATCH_SIZE"]


@dataclass
class PredictResult:
    out: Path
    channels: list[str]
    n_fields: int  # in this shard
    n_written: int
    n_resumed: int
    seconds: float
    device: str
    family: str = ""
    skipped: list[dict] = field(default_factory=list)


@dataclass
class PlateJob:
    """Everything a strategy needs, prepared the same way for every family."""

    cfg: PredictConfig
    model: LoadedModel
    device: object  # torch.device
    plate: Plate
    plan: OutputPlan
    normalizer: FieldNormalizer
    writer: FieldWriter
    batch_size: int

    @property
    def inputs(self) -> list[str]:
        return self.model.checkpoint["inputs"]

    @property
    def outputs(self) -> list[str]:
        return self.model.checkpoint["outputs"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_options(cfg: PredictConfig, role: str) -> None:
    if role == "staining":
        wrong = cfg.given(DiffusionOptions)
        if wrong:
            raise CpvsError(f"{', '.join(map(_flag, wrong))} only apply to diffusion checkpoints; this is a staining model",
                            cfg.checkpoint, "drop those options, or pass a ddpm checkpoint")
        return
    strategy = cfg.field_strategy or DiffusionOptions.field_strategy
    if strategy not in ("resize", "tiles"):
        raise CpvsError(f"--field-strategy must be resize or tiles, got {strategy!r}")
    tiling = cfg.given(TileOptions)
    if strategy == "resize" and tiling:
        raise CpvsError(f"{', '.join(map(_flag, tiling))} apply to tiles; diffusion samples whole fields by default",
                        hint="add --field-strategy tiles, or drop those options")


def predict_plate(cfg: PredictConfig, progress: Progress | None = None) -> PredictResult:
    t0 = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    check_precision(cfg.precision)
    if cfg.dtype not in ("uint16", "float32"):
        raise CpvsError(f"--dtype must be uint16 or float32, got {cfg.dtype!r}")
    if cfg.format not in FORMATS:
        raise CpvsError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    device = resolve_device(cfg.device)
    model = load_model(cfg.checkpoint, device, roles=("staining", "diffusion"), expect=cfg.model)
    _check_options(cfg, model.role)
    strategy = staining if model.role == "staining" else diffusion
    ck = model.checkpoint
    plate = discover_plate(cfg.plate, channel_map=cfg.channel_map, channels=ck["inputs"], plate_name=cfg.plate_name,
                           platemap=cfg.platemap, on_error=cfg.on_error)
    out = Path(cfg.out)
    with OutputLock(out, "predict-plate", cfg.shard):
        if cfg.overwrite:
            clear_outputs(out)
        claim_identity(out, "predict-plate", identity(cfg, model, plate), cfg.overwrite)
        plan = plan_outputs(plate, out, strategy.written_channels(cfg, ck["outputs"]), cfg.shard, cfg.format)
        cache = out / ".cpvs-cache"
        cache.mkdir(exist_ok=True)
        progress("illumination", 0, 1, info=f"estimating the plate's illumination from up to {cfg.illum_fields} fields")
        normalizer = FieldNormalizer.for_plate(plate, ck["inputs"], ck["normalization"], cfg.illum_fields, cache, cfg.workers,
                                               cfg.on_error)
        progress("illumination", 1, 1)
        progress("fields", len(plan.done), len(plan.fields))  # the bar shows from the start, not after the first field
        writer = FieldWriter(plan, ck["outputs"], ck["normalization"], cfg.dtype)
        job = PlateJob(cfg, model, device, plate, plan, normalizer, writer, cfg.batch_size or BATCH_SIZE[model.role])
        written, skipped, extra = strategy.run(job, progress)
        write_record(cfg, plan, model.path, skipped=skipped, family=model.family, **extra)
    return PredictResult(out, strategy.written_channels(cfg, ck["outputs"]), len(plan.fields), written, len(plan.done),
                         time.perf_counter() - t0, str(device), model.family, skipped)


def identity(cfg: PredictConfig, model: LoadedModel, plate: Plate) -> dict:
    """What determines the predicted files: the checkpoint's bytes, the input plate, and every option
    that changes pixels (not devices, workers, batching or sharding, which never do)."""
    opts = cfg.resolved(TileOptions).__dict__ if model.role == "staining" else {
        **cfg.resolved(DiffusionOptions).__dict__, **cfg.resolved(TileOptions).__dict__}
    for key, default in (("estimate", "samples"), ("shrink", True)):  # recorded only when changed: older outputs still resume
        if opts.get(key) == default:
            opts = {k: v for k, v in opts.items() if k != key}
    return {"checkpoint": file_digest(model.path), "family": model.family, "plate": plate.name,
            "input_files": fingerprint([p for f in plate.fields for p in f.files.values()]),
            "channel_map": cfg.channel_map, "platemap": str(cfg.platemap) if cfg.platemap else None,
            "illum_fields": cfg.illum_fields, "precision": cfg.precision, "dtype": cfg.dtype, "format": cfg.format,
            **{k: str(v) if isinstance(v, Path) else v for k, v in opts.items()}}
