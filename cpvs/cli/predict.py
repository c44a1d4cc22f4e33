"""``cpvs predict-plate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cpvs.cli.common import JsonOpt, finish, choices, ChannelMapOpt, PlatemapOpt, PlateNameOpt, Average, OnError, Precision, cli_errors, out_console, progress_bar, state, value
from cpvs.errors import CpvsError
from cpvs.predict.config import BATCH_SIZE, DiffusionOptions, PredictConfig, TileOptions

P_TILES, P_DIFF = "Tiles (U-Net; diffusion with --field-strategy tiles)", "Diffusion checkpoints (ddpm)"
# Families predict-plate can run: the checkpoint says which it is; --model only checks.
PredictModel = choices("PredictModel", "unet cwgan linear ddpm")
OutDtype = choices("OutDtype", "uint16 float32")
OutFormat = choices("OutFormat", "tiff ome-zarr")
Sampler = choices("Sampler", "ddpm ddim dpmpp")
FieldStrategy = choices("FieldStrategy", "resize tiles")
Estimate = choices("Estimate", "samples mean")


T, D = TileOptions(), DiffusionOptions()


@cli_errors
def predict_plate(
    ctx: typer.Context,
    plate: Annotated[Path, typer.Argument(metavar="PLATE", help="Plate folder or LoadData CSV with the brightfield input planes.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder for the predicted plate (TIFFs, load_data.csv, channel_map.csv; or PLATE.zarr with --format ome-zarr).")],
    checkpoint: Annotated[Optional[Path], typer.Option(metavar="RUN|FILE", help="Checkpoint file or run folder (its checkpoints/best.pt, else last.pt). It says what model it is.")] = None,
    model: Annotated[Optional[PredictModel], typer.Option(help="Model family the checkpoint must be (a check only: the checkpoint says what it is).")] = None,
    channel_map: ChannelMapOpt = None,
    platemap: PlatemapOpt = None,
    plate_name: PlateNameOpt = None,
    batch_size: Annotated[Optional[int], typer.Option(help=f"Tiles per model call, tiles of several fields sharing a batch (default {BATCH_SIZE['staining']}); diffusion: fields per call times --samples (default {BATCH_SIZE['diffusion']}).")] = None,
    precision: Annotated[Precision, typer.Option(help="Autocast precision on GPU (the CPU always computes in fp32).")] = Precision("bf16"),
    dtype: Annotated[OutDtype, typer.Option(help="Output type: uint16 intensities (clipped to 0..65535) or float32.")] = OutDtype("uint16"),
    out_format: Annotated[OutFormat, typer.Option("--format", help="tiff: one TIFF per channel and field; ome-zarr: one OME-Zarr 0.5 HCS plate OUT/PLATE.zarr (channels named, <ch>_std maps as extra channels, a pyramid per field).")] = OutFormat("tiff"),
    shard: Annotated[Optional[str], typer.Option(metavar="I/N", help="Process shard I of N (e.g. 2/3): every N-th field from the I-th; for job arrays.")] = None,
    workers: Annotated[int, typer.Option(help="Reader and writer threads each.")] = 2,
    illum_fields: Annotated[int, typer.Option(help="Fields (evenly spaced over the plate) averaged for the input illumination correction.")] = 256,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and report it.")] = OnError("raise"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a predicted plate made with another checkpoint, plate or options (a rerun with the same ones resumes).")] = False,
    tile: Annotated[Optional[int], typer.Option(help=f"Tile side in pixels of the model's input resolution (default: {T.tile}).", rich_help_panel=P_TILES)] = None,
    stride: Annotated[Optional[int], typer.Option(help=f"Tile step in pixels (half a tile: interior pixels are covered by 4 tiles) (default: {T.stride}).", rich_help_panel=P_TILES)] = None,
    stitch: Annotated[Optional[Average], typer.Option(help=f"How overlapping tiles are combined per pixel (default: {T.stitch}).", rich_help_panel=P_TILES)] = None,
    sampler: Annotated[Optional[Sampler], typer.Option(help=f"ddpm = ancestral, on a respaced sub-sequence below T steps; ddim; dpmpp = DPM-Solver++ 2M (default: {D.sampler}).", rich_help_panel=P_DIFF)] = None,
    steps: Annotated[Optional[int], typer.Option(help=f"Denoising steps, evenly spaced over the schedule (the published sampler: all 2000) (default: {D.steps}).", rich_help_panel=P_DIFF)] = None,
    eta: Annotated[Optional[float], typer.Option(help=f"DDIM eta (0 deterministic, 1 = the DDPM posterior) (default: {D.eta}).", rich_help_panel=P_DIFF)] = None,
    guidance: Annotated[Optional[float], typer.Option(help=f"Classifier guidance scale s (0 disables) (default: {D.guidance}).", rich_help_panel=P_DIFF)] = None,
    classifier: Annotated[Optional[Path], typer.Option(metavar="RUN|FILE", help="Run folder or checkpoint of `cpvs train --model classifier`, for --guidance.", rich_help_panel=P_DIFF)] = None,
    label_col: Annotated[Optional[str], typer.Option(metavar="COLUMN", help="Metadata column with each field's class (default: the model's own; 'none' samples without).", rich_help_panel=P_DIFF)] = None,
    samples: Annotated[Optional[int], typer.Option(help=f"Samples per field; K > 1 also writes per-pixel std maps (<channel>_std) (default: {D.samples}).", rich_help_panel=P_DIFF)] = None,
    estimate: Annotated[Optional[Estimate], typer.Option(help=f"What the written intensities are: the mean of the --samples (samples), or the network's clean-image estimate at the first step, averaged over the samples' starts (mean: the posterior mean the samples' mean approaches as K grows; the best per-pixel prediction, smoother than a sample). <channel>_std maps come from the samples either way (default: {D.estimate}).", rich_help_panel=P_DIFF)] = None,
    seed: Annotated[Optional[int], typer.Option(help=f"Seed; a field's samples depend only on it and the field (default: {D.seed}).", rich_help_panel=P_DIFF)] = None,
    field_strategy: Annotated[Optional[FieldStrategy], typer.Option(help=f"Resize fields to the training resolution and back, or sample tiles (shared noise, stitched) (default: {D.field_strategy}).", rich_help_panel=P_DIFF)] = None,
    residual_unet: Annotated[Optional[Path], typer.Option(metavar="RUN|FILE", help="Residual diffusion models (trained with --residual-of): the U-Net run or checkpoint they were trained on, when it is no longer where the checkpoint says (its digest is checked).", rich_help_panel=P_DIFF)] = None,
    shrink: Annotated[Optional[bool], typer.Option("--shrink/--no-shrink", help="Residual diffusion: weigh the residual in the prediction by the per-channel factor in [0, 1] fitted in training on validation crops the U-Net never saw (0: the U-Net's prediction; the <channel>_std maps are never shrunk); --no-shrink adds the whole residual. Checkpoints without the factor add the whole residual (default: shrink).", rich_help_panel=P_DIFF, show_default=False)] = None,
    clip_denoised: Annotated[Optional[bool], typer.Option("--clip-denoised/--no-clip-denoised", help="Clamp each step's predicted clean image into the training targets' range (recorded in the checkpoint; older checkpoints: ±the preprocessing clip) (default: clip).", rich_help_panel=P_DIFF, show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Predict the Cell Painting channels of a whole plate from brightfield.

    The checkpoint says what model it is. Staining models (unet, cwgan, linear): the
    checkpoint's own preprocessing of the raw TIFFs, overlapping tiles (256², stride 128, the
    last tiles flush with the border) predicted in batches, each pixel the median of the tiles
    covering it. Diffusion (ddpm): whole fields at the training resolution (or tiles), K samples
    with uncertainty maps, optional classifier guidance. Then the normalization is undone and one
    TIFF per channel and field is written with the input plate's naming, plus load_data.csv, so
    `cpvs profile` or CellProfiler read the result directly; or, with --format ome-zarr, one
    OME-Zarr HCS plate (napari, `cpvs profile OUT` read it). Finished fields are skipped on a
    rerun; --shard splits a plate over a job array (see examples/slurm/).
    """
    from cpvs.plate.shards import Shard
    from cpvs.predict.runner import predict_plate as run

    if checkpoint is None:
        raise CpvsError("--checkpoint is required: cpvs ships no weights", hint="pass a run folder from `cpvs train` or a checkpoint file")
    st = state(ctx)
    cfg = PredictConfig(
        plate=plate, out=out, checkpoint=checkpoint, model=value(model), channel_map=channel_map, platemap=platemap,
        plate_name=plate_name, device=st.device, precision=precision.value, dtype=dtype.value, format=out_format.value, shard=Shard.parse(shard),
        workers=workers, illum_fields=illum_fields, on_error=on_error.value, overwrite=overwrite, batch_size=batch_size,
        tile=tile, stride=stride,
        stitch=value(stitch), sampler=value(sampler), steps=steps, eta=eta, clip_denoised=clip_denoised, guidance=guidance,
        classifier=classifier, label_col=label_col, samples=samples, estimate=value(estimate), seed=seed, field_strategy=value(field_strategy),
        residual_unet=residual_unet, shrink=shrink,
    )
    with progress_bar(st.quiet) as cb:
        res = run(cfg, progress=cb)
    def human() -> None:
        rate = res.n_written / res.seconds if res.seconds else 0
        out_console.print(
            f"predicted {', '.join(res.channels)} for {res.n_fields} fields with a {res.family} model on {res.device}: "
            f"{res.n_written} written ({rate:.2f} fields/s), {res.n_resumed} already done, {len(res.skipped)} skipped -> {res.out}"
        )

    finish(st, json_out, res, human)
