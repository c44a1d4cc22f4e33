"""The ``cpvs`` command line. Thin: parse, validate, call one library function, print a summary.

Library code returns data; only this module prints. A :class:`CpvsError` becomes
one message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cpvs import __version__
from cpvs.errors import CpvsError

out_console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="cpvs",
    help="Plate-scale virtual staining and image-based profiling of Cell Painting microscopy.\n\n"
    "Typical chain: simulate or bring a plate -> preprocess -> train -> predict-plate -> profile / embed -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


@dataclass
class State:
    quiet: bool = False
    device: str = "auto"


def _state(ctx: typer.Context) -> State:
    return ctx.obj if isinstance(ctx.obj, State) else State()


def _version(value: bool) -> None:
    if value:
        out_console.print(f"cpvs {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the cpvs version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries (for batch jobs); errors are still printed.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where models run: auto (a GPU when there is one), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    from cpvs.device import check_device

    try:
        check_device(device)
    except CpvsError as e:
        err_console.print(f"[bold red]error:[/] {e.render()}", highlight=False)
        raise typer.Exit(2) from None
    ctx.obj = State(quiet=quiet, device=device)


def cli_errors(fn: Callable) -> Callable:
    """Turn user errors into one message and exit code 2; interruptions into a resume hint."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CpvsError as e:
            err_console.print(f"[bold red]error:[/] {e.render()}", highlight=False)
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                err_console.print(
                    f"[bold red]error:[/] disk full while writing {e.filename or 'output'}.\n"
                    "  fix: free space and rerun the same command; finished work is kept and resumed.",
                    highlight=False,
                )
                raise typer.Exit(2) from None
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted:[/] rerun the same command to resume; finished work is kept.")
            raise typer.Exit(130) from None

    return wrapper


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Callable[..., None]]:
    """A ``(stage, completed, total, info="")`` callback driving one rich bar per stage.

    Under torchrun only rank 0 shows progress.
    """
    if quiet or os.environ.get("RANK", "0") != "0":
        yield lambda *a, **k: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=err_console, transient=False,
    ) as prog:
        tasks: dict[str, int] = {}

        def update(stage: str, completed: int, total: int, info: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total, info=info)
            prog.update(tasks[stage], completed=completed, total=total, info=info)

        yield update


class OnError(str, Enum):
    raise_ = "raise"
    skip = "skip"


class ResizeMethod(str, Enum):
    bilinear = "bilinear"
    bicubic = "bicubic"


class StoreDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


class Compression(str, Enum):
    none = "none"
    lzw = "lzw"
    zlib = "zlib"


def _channels(text: Optional[str]) -> Optional[list[str]]:
    from cpvs.plate.channels import canonical_channel

    if not text:
        return None
    return [canonical_channel(c) for c in text.split(",") if c.strip()]


# --------------------------------------------------------------------------- simulate
@app.command()
@cli_errors
def simulate(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder to write the plates into (one sub-folder per plate).")],
    plates: Annotated[int, typer.Option(help="Number of plates.")] = 2,
    wells: Annotated[int, typer.Option(help="Wells per plate (filled row by row from A01; 4 to 384).")] = 24,
    sites: Annotated[int, typer.Option(help="Fields (sites) per well.")] = 4,
    size: Annotated[int, typer.Option(help="Field side in pixels (998 = a 2x2-binned 20x field).")] = 998,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical TIFFs.")] = 0,
    moas: Annotated[int, typer.Option(help="Number of MOA classes (2 compounds each, sharing a target), 1 to 8.")] = 6,
    batches: Annotated[Optional[int], typer.Option(help="Number of batches the plates are spread over (default: one per plate).")] = None,
    workers: Annotated[int, typer.Option(help="Processes rendering fields in parallel.")] = 1,
    compression: Annotated[Compression, typer.Option(help="TIFF compression of the images (Phenix exports use lzw).")] = Compression.none,
    masks: Annotated[bool, typer.Option("--masks/--no-masks", help="Also write ground-truth nuclei and cell label images under masks/.")] = True,
) -> None:
    """Write synthetic Cell Painting plates with known ground truth.

    Cells with nuclei, nucleoli, ER, mitochondria, actin and membrane are rendered
    into the 5 fluorescence channels, and the 3 brightfield planes are computed from
    the same cells (optical path seen at three defocus distances). Compounds belong
    to MOA classes with dose-dependent phenotypes; DMSO wells are negative controls,
    a toxic compound the positive control; plates and batches differ in intensity,
    illumination and focus. Output: Phenix-named 16-bit TIFFs (JUMP channel numbers),
    platemap.csv and load_data.csv per plate. Rerunning into the same folder skips
    finished fields.
    """
    from cpvs.simulate import simulate as run

    st = _state(ctx)
    with progress_bar(st.quiet) as cb:
        res = run(out, plates=plates, wells=wells, sites=sites, size=size, seed=seed, moas=moas, batches=batches,
                  workers=workers, compression=None if compression == Compression.none else compression.value,
                  masks=masks, progress=cb)
    if not st.quiet:
        out_console.print(
            f"simulated {len(res.plates)} plate(s), {res.n_fields} fields ({res.n_written} written, "
            f"{res.n_fields - res.n_written} already there) in {res.seconds:.1f} s -> {res.out}"
        )
        for p in res.plates:
            out_console.print(f"  {p}")


# --------------------------------------------------------------------------- preprocess
@app.command()
@cli_errors
def preprocess(
    ctx: typer.Context,
    plates: Annotated[list[Path], typer.Argument(metavar="PLATE", help="Plate folder(s) (Phenix or CV8000 file names, or holding load_data.csv) or LoadData CSV file(s).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Store to write (a zarr folder, e.g. plate.zarr). Rerunning into it resumes.")],
    channel_map: Annotated[Optional[str], typer.Option(help="Channel numbers -> names: a preset (jump), a .json/.csv/.tsv file, or inline '1=BF,2=ER,...' (default: jump).")] = None,
    channels: Annotated[Optional[str], typer.Option(help="Comma-separated channels to keep, in this order (default: all the map names).")] = None,
    platemap: Annotated[Optional[Path], typer.Option(help="Platemap CSV/TSV (well -> perturbation, compound, MOA, ...) (default: platemap.csv in the plate folder, if any).")] = None,
    plate_name: Annotated[Optional[str], typer.Option(help="Plate name (default: from the LoadData CSV, CV8000 file names, or the folder name).")] = None,
    illum_size: Annotated[int, typer.Option(help="Median filter size of the illumination function, in pixels of the raw image (0 disables correction).")] = 249,
    size: Annotated[Optional[str], typer.Option(help="Resize fields to N or HxW pixels (default: keep the native size).")] = None,
    resize_method: Annotated[ResizeMethod, typer.Option(help="Interpolation used by --size.")] = ResizeMethod.bilinear,
    clip: Annotated[float, typer.Option(help="Clip z-scored values to +/- this many standard deviations (0 disables).")] = 15.0,
    dtype: Annotated[StoreDtype, typer.Option(help="Storage precision of the normalized images.")] = StoreDtype.float16,
    chunk: Annotated[int, typer.Option(help="Chunk side in pixels inside the store (random crops read whole chunks).")] = 256,
    workers: Annotated[int, typer.Option(help="Threads reading and processing fields.")] = 2,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and list it in skipped.csv.")] = OnError.raise_,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store made with other inputs or parameters.")] = False,
) -> None:
    """Illumination-correct, resize, z-score and clip plates into a chunked store for training.

    Per plate and channel, the mean image smoothed by a median filter is the
    illumination function every image is divided by; then optional resize, then
    each image and channel is z-scored and clipped. The zarr store holds the
    images, channel names, field keys and metadata (fields.parquet), per-field
    statistics and the illumination functions; training reads random crops from
    it without touching the TIFFs.
    """
    from cpvs.plate.discover import discover_plates
    from cpvs.preprocess.normalize import parse_size
    from cpvs.preprocess.pipeline import preprocess_plates

    st = _state(ctx)
    chans = _channels(channels)
    found = []
    for p in plates:
        found += discover_plates(p, channel_map=channel_map, channels=chans, plate_name=plate_name,
                                 platemap=platemap, on_error=on_error.value)
    with progress_bar(st.quiet) as cb:
        res = preprocess_plates(
            found, out, illum_size=illum_size, size=parse_size(size), resize_method=resize_method.value, clip_z=clip,
            dtype=dtype.value, chunk=chunk, workers=workers, on_error=on_error.value, overwrite=overwrite, progress=cb,
        )
    if st.quiet:
        return
    t = Table(title=f"store {res.store}", title_justify="left")
    t.add_column("channel")
    t.add_column("median raw mean", justify="right")
    t.add_column("median raw std", justify="right")
    for c, s in res.channel_stats.items():
        t.add_row(c, f"{s['mean']:.1f}", f"{s['std']:.1f}")
    out_console.print(t)
    out_console.print(
        f"{len(found)} plate(s), {res.n_fields} fields of {res.shape[0]}x{res.shape[1]} px: "
        f"{res.n_written} written, {res.n_resumed} resumed, {len(res.skipped)} skipped, {res.seconds:.1f} s"
    )
    if res.skipped:
        out_console.print(f"[yellow]skipped fields are listed in {res.store / 'skipped.csv'}[/]")


# --------------------------------------------------------------------------- demo
@app.command()
@cli_errors
def demo(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for the demo's plates, store and results.")] = Path("cpvs-demo"),
    size: Annotated[int, typer.Option(help="Field side in pixels (small keeps the demo quick).")] = 512,
    wells: Annotated[int, typer.Option(help="Wells per plate.")] = 16,
    sites: Annotated[int, typer.Option(help="Fields per well.")] = 2,
    workers: Annotated[int, typer.Option(help="Parallel workers.")] = 2,
) -> None:
    """Run the whole chain built so far on a built-in simulated example.

    Simulate two plates -> preprocess plate 1 -> train a small U-Net and the per-pixel linear
    baseline -> predict plate 2 (another batch) -> image metrics against its real stains ->
    profile the real and predicted plate 2 in the same cells -> NSC, target matching and
    feature correlation -> an HTML report.
    """
    from cpvs.demo import run_demo

    st = _state(ctx)
    with progress_bar(st.quiet) as cb:
        summary = run_demo(out, size=size, wells=wells, sites=sites, workers=workers, device=st.device, progress=cb)
    if st.quiet:
        return
    t = Table(title="cpvs demo", title_justify="left")
    t.add_column("step")
    t.add_column("result")
    t.add_column("seconds", justify="right")
    for step in summary.steps:
        t.add_row(step.name, step.result, f"{step.seconds:.1f}")
    out_console.print(t)
    out_console.print(f"outputs in {summary.out}")


# --------------------------------------------------------------------------- train, predict-plate
class Model(str, Enum):
    unet = "unet"
    cwgan = "cwgan"
    linear = "linear"
    ddpm = "ddpm"
    classifier = "classifier"
    dino = "dino"
    ws_dino = "ws-dino"


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Average(str, Enum):
    """Per-pixel stitching of overlapping tiles, and aggregation of profiles."""

    median = "median"
    mean = "mean"


class CorrMethod(str, Enum):
    spearman = "spearman"
    pearson = "pearson"


class OutDtype(str, Enum):
    uint16 = "uint16"
    float32 = "float32"


class Sampler(str, Enum):
    ddpm = "ddpm"
    ddim = "ddim"
    dpmpp = "dpmpp"


class FieldStrategy(str, Enum):
    resize = "resize"
    tiles = "tiles"


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CpvsError(f"{option} must be comma-separated integers, got {text!r}") from None


def _pair(text: str, option: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise CpvsError(f"{option} must be two numbers like 0.1,0.2, got {text!r}") from None
    if not 0 < a <= b <= 1:
        raise CpvsError(f"{option} must satisfy 0 < low <= high <= 1, got {text!r}")
    return a, b


@app.command()
@cli_errors
def train(
    ctx: typer.Context,
    model: Annotated[Model, typer.Option(help="Model family: unet (L1), cwgan (cWGAN-GP from a U-Net), linear (per-pixel least-squares baseline).")],
    data: Annotated[Path, typer.Option(help="Store written by `cpvs preprocess`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints/, metrics.parquet, cpvs-run.json.")],
    inputs: Annotated[Optional[str], typer.Option(help="Comma-separated input channels (default: the store's brightfield planes).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated output channels (default: the store's Cell Painting stains).")] = None,
    crop: Annotated[Optional[int], typer.Option(help="Side of the random training crops, px of the store (default: 256; ddpm/classifier 512, i.e. whole fields of a 512² store).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Crops (images for dino) per step (default: 10 unet, 4 cwgan, 16 dino, as published).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs, with validation and checkpoints after each (default: 50; 400 for dino).")] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(help="Optimizer steps per epoch (default: 300; dino: fields / batch size). cwgan: generator steps.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default: 2e-4 Adam; 4e-6 AdamW peak for dino).")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay of the U-Net / generator / ViT (default: 2e-4; 0 for dino).")] = None,
    depth: Annotated[int, typer.Option(help="U-Net levels (6 = published; crops must be multiples of 2^(depth-1) px).")] = 6,
    width: Annotated[Optional[int], typer.Option(help="Filters of the first level, doubled per level (default: 32 for unet, ~31 M parameters; 64 for ddpm, ~63 M).")] = None,
    val_fraction: Annotated[float, typer.Option(help="Fraction of fields held out for validation (a band of rows per field when there are fewer than 10 fields).")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of weights, crops and split; the same seed reproduces a CPU run.")] = 0,
    precision: Annotated[Precision, typer.Option(help="Autocast precision on GPU (the CPU always computes in fp32).")] = Precision.bf16,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished epoch.")] = False,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after the epoch during which this many minutes have passed (resume later with --resume).")] = None,
    select: Annotated[str, typer.Option(help="Validation metric choosing checkpoints/best.pt: pcc, ssim, psnr, mae, mse or val_l1.")] = "pcc",
    workers: Annotated[int, typer.Option(help="Threads reading crops from the store.")] = 2,
    init: Annotated[Optional[Path], typer.Option(help="cwgan: U-Net run folder or checkpoint the generator starts from.")] = None,
    critic_steps: Annotated[int, typer.Option(help="cwgan: critic updates per generator update.")] = 5,
    lambda_l1: Annotated[float, typer.Option(help="cwgan: weight of the L1 term of the generator loss.")] = 100.0,
    lambda_gp: Annotated[float, typer.Option(help="cwgan: weight of the gradient penalty of the critic loss.")] = 10.0,
    critic_lr: Annotated[float, typer.Option(help="cwgan: critic Adam learning rate.")] = 2e-4,
    critic_weight_decay: Annotated[float, typer.Option(help="cwgan: critic Adam weight decay.")] = 1e-3,
    pixels: Annotated[int, typer.Option(help="linear: training pixels sampled for the least-squares fit.")] = 2_000_000,
    channels: Annotated[Optional[str], typer.Option(help="dino: channels, one ViT each (default: the store's stains).")] = None,
    weak_label: Annotated[str, typer.Option(help="ws-dino: metadata column whose equal values pair images (compound is best).")] = "Metadata_Compound",
    arch: Annotated[str, typer.Option(help="dino: timm ViT name.")] = "vit_small_patch8_224",
    init_weights: Annotated[Optional[Path], typer.Option(help="dino: local DINO/timm ViT weights to start from (RGB weights are adapted to one channel).")] = None,
    out_dim: Annotated[int, typer.Option(help="dino: projection head output dimension.")] = 65536,
    hidden_dim: Annotated[int, typer.Option(help="dino: projection head hidden width.")] = 2048,
    bottleneck_dim: Annotated[int, typer.Option(help="dino: projection head bottleneck (L2-normalized).")] = 256,
    n_global: Annotated[int, typer.Option(help="dino: global crops per image.")] = 2,
    global_size: Annotated[int, typer.Option(help="dino: global crop side after resizing, px.")] = 224,
    global_scale: Annotated[str, typer.Option(help="dino: global crop area as a fraction of the field, low,high.")] = "0.1,0.2",
    n_local: Annotated[int, typer.Option(help="dino: local crops per image.")] = 8,
    local_size: Annotated[int, typer.Option(help="dino: local crop side after resizing, px.")] = 96,
    local_scale: Annotated[str, typer.Option(help="dino: local crop area as a fraction of the field, low,high.")] = "0.04,0.08",
    min_lr: Annotated[float, typer.Option(help="dino: learning rate at the end of the cosine decay.")] = 3e-6,
    warmup_epochs: Annotated[int, typer.Option(help="dino: epochs of linear learning-rate warm-up.")] = 10,
    teacher_momentum: Annotated[float, typer.Option(help="dino: EMA momentum of the teacher.")] = 0.99,
    teacher_temp: Annotated[float, typer.Option(help="dino: teacher softmax temperature (sharpening).")] = 0.04,
    student_temp: Annotated[float, typer.Option(help="dino: student softmax temperature.")] = 0.1,
    eval_every: Annotated[int, typer.Option(help="dino: every N epochs, record NSC/NSCB of teacher embeddings when the store has MOAs (0: never).")] = 0,
    label: Annotated[Optional[str], typer.Option(help="ddpm: class column the model is conditioned on (e.g. Metadata_Perturbation; 'none' for none); classifier: the classes.")] = None,
    label_dropout: Annotated[float, typer.Option(help="ddpm: fraction of labels replaced by the null class during training.")] = 0.1,
    ema: Annotated[float, typer.Option(help="ddpm: EMA decay of the sampling weights (with warm-up).")] = 0.9999,
    channel_mult: Annotated[str, typer.Option(help="ddpm: width multipliers per level.")] = "1,2,4,8",
    num_res_blocks: Annotated[int, typer.Option(help="ddpm: residual blocks per level.")] = 2,
    attention_downsample: Annotated[str, typer.Option(help="ddpm: down-sampling factors with self-attention.")] = "16",
    head_channels: Annotated[int, typer.Option(help="ddpm: channels per attention head.")] = 32,
    dropout: Annotated[float, typer.Option(help="ddpm: dropout in residual blocks.")] = 0.2,
    schedule: Annotated[str, typer.Option(help="ddpm: noise schedule, linear or cosine.")] = "linear",
    timesteps: Annotated[int, typer.Option(help="ddpm: diffusion steps T.")] = 2000,
    beta_start: Annotated[float, typer.Option(help="ddpm: first beta of the linear schedule.")] = 1e-6,
    beta_end: Annotated[float, typer.Option(help="ddpm: last beta of the linear schedule.")] = 0.01,
) -> None:
    """Train a model on a preprocessed store.

    unet: L1 U-Net from brightfield planes to Cell Painting stains (Adam 2e-4, weight decay 2e-4,
    random 256² crops, batch 10). cwgan: conditional Wasserstein GAN with gradient penalty, the
    generator initialised from a U-Net (--init); lambda_e = 1/epoch. linear: the per-pixel
    least-squares baseline. Each epoch ends with validation image metrics in metrics.parquet,
    checkpoints/last.pt and (when the --select metric improved) checkpoints/best.pt.
    Under torchrun, every process trains on its own crops (DDP) and rank 0 writes.
    """
    st = _state(ctx)
    if model.value in ("ddpm", "classifier"):
        from cpvs.train.diffusion import DiffusionConfig, train_diffusion

        if schedule not in ("linear", "cosine"):
            raise CpvsError(f"--schedule must be linear or cosine, got {schedule!r}")
        spec = {"kind": schedule, "T": timesteps}
        if schedule == "linear":
            spec.update(start=beta_start, end=beta_end)
        dcfg = DiffusionConfig(
            model=model.value, data=data, out=out, inputs=_channels(inputs), targets=_channels(targets),
            label=None if label in (None, "none") else label, label_dropout=label_dropout, crop=crop or 512,
            batch_size=batch_size or 2, epochs=epochs or 250, steps_per_epoch=steps_per_epoch or 1000,
            lr=lr if lr is not None else 8e-5, ema=ema, width=width or 64,
            channel_mult=_ints(channel_mult, "--channel-mult"), num_res_blocks=num_res_blocks,
            attention_downsample=_ints(attention_downsample, "--attention-downsample"), head_channels=head_channels,
            dropout=dropout, schedule=spec, val_fraction=val_fraction, seed=seed, precision=precision.value,
            device=st.device, resume=resume, max_minutes=max_minutes, workers=workers,
        )
        with progress_bar(st.quiet) as cb:
            res = train_diffusion(dcfg, progress=cb)
        if not st.quiet and os.environ.get("RANK", "0") == "0":
            t = Table(title=f"{res.family} ({res.n_parameters / 1e6:.1f} M parameters, EMA) on {res.device}: {res.run}", title_justify="left")
            for c in ("epoch", "loss", "val_loss"):
                t.add_column(c, justify="right")
            for _, row in res.metrics.iterrows():
                t.add_row(str(int(row["epoch"])), f"{row['loss']:.4g}", f"{row['val_loss']:.4g}")
            out_console.print(t)
            if res.stopped_early:
                out_console.print(f"[yellow]stopped after {res.epochs_done} epochs (--max-minutes); continue with --resume[/]")
        return
    if model.value in ("dino", "ws-dino"):
        from cpvs.train.dino import DinoConfig, train_dino
        from cpvs.train.multicrop import CropSpec

        dcfg = DinoConfig(
            model=model.value, data=data, out=out, channels=_channels(channels), weak_label=weak_label, arch=arch,
            out_dim=out_dim, hidden=hidden_dim, bottleneck=bottleneck_dim, init_weights=init_weights,
            crops=CropSpec(n_global, global_size, _pair(global_scale, "--global-scale"), n_local, local_size,
                           _pair(local_scale, "--local-scale")),
            batch_size=batch_size or 16, epochs=epochs or 400, steps_per_epoch=steps_per_epoch, lr=lr if lr is not None else 4e-6,
            min_lr=min_lr, warmup_epochs=warmup_epochs, weight_decay=weight_decay or 0.0, teacher_momentum=teacher_momentum,
            teacher_temp=teacher_temp, student_temp=student_temp, seed=seed, precision=precision.value, device=st.device,
            resume=resume, max_minutes=max_minutes, eval_every=eval_every,
        )
        with progress_bar(st.quiet) as cb:
            res = train_dino(dcfg, progress=cb)
        if not st.quiet and os.environ.get("RANK", "0") == "0":
            cols = [c for c in ("epoch", "loss", "lr", "nsc", "nscb") if c in res.metrics]
            t = Table(title=f"{res.family} ({res.n_parameters / 1e6:.1f} M parameters, teacher) on {res.device}: {res.run}", title_justify="left")
            for c in cols:
                t.add_column(c, justify="right")
            for _, row in res.metrics.iterrows():
                t.add_row(*[str(int(row[c])) if c == "epoch" else f"{row[c]:.4g}" for c in cols])
            out_console.print(t)
            if res.stopped_early:
                out_console.print(f"[yellow]stopped after {res.epochs_done} epochs (--max-minutes); continue with --resume[/]")
        return
    from cpvs.train.staining import StainingConfig, train_staining

    cfg = StainingConfig(
        model=model.value, data=data, out=out, inputs=_channels(inputs), targets=_channels(targets), crop=crop or 256,
        batch_size=batch_size, epochs=epochs or 50, steps_per_epoch=steps_per_epoch or 300, lr=lr if lr is not None else 2e-4,
        weight_decay=weight_decay if weight_decay is not None else 2e-4,
        depth=depth, width=width or 32, val_fraction=val_fraction, seed=seed, precision=precision.value, device=st.device,
        resume=resume, max_minutes=max_minutes, select=select, workers=workers, init=init, critic_steps=critic_steps,
        lambda_l1=lambda_l1, lambda_gp=lambda_gp, critic_lr=critic_lr, critic_weight_decay=critic_weight_decay, pixels=pixels,
    )
    with progress_bar(st.quiet) as cb:
        res = train_staining(cfg, progress=cb)
    if st.quiet or os.environ.get("RANK", "0") != "0":
        return
    t = Table(title=f"{res.family} ({res.n_parameters / 1e6:.2f} M parameters) on {res.device}: {res.run}", title_justify="left")
    cols = [c for c in ("epoch", "train_l1", "loss_critic", "loss_generator", "val_l1", "mae", "ssim", "psnr", "pcc") if c in res.metrics]
    for c in cols:
        t.add_column(c, justify="right")
    for _, row in res.metrics.iterrows():
        t.add_row(*[f"{row[c]:.4g}" if c != "epoch" else str(int(row[c])) for c in cols])
    out_console.print(t)
    if res.best_epoch is not None:
        out_console.print(f"best epoch {res.best_epoch} by {select}: " + ", ".join(
            f"{m} {res.best[m]:.3f}" for m in ("pcc", "ssim") if m in res.best) + f" -> {res.run / 'checkpoints' / 'best.pt'}")
    if res.stopped_early:
        out_console.print(f"[yellow]stopped after {res.epochs_done} epochs (--max-minutes); continue with --resume[/]")


@app.command("predict-plate")
@cli_errors
def predict_plate(
    ctx: typer.Context,
    plate: Annotated[Path, typer.Argument(metavar="PLATE", help="Plate folder or LoadData CSV with the brightfield input planes.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the predicted plate (TIFFs, load_data.csv, channel_map.csv).")],
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint file or run folder (its checkpoints/best.pt).")] = None,
    model: Annotated[Optional[Model], typer.Option(help="Model family the checkpoint must be (a check; the checkpoint says what it is).")] = None,
    channel_map: Annotated[Optional[str], typer.Option(help="Channel map of the input plate: preset, file or inline (default: the plate's channel_map.csv, else jump).")] = None,
    platemap: Annotated[Optional[Path], typer.Option(help="Platemap joined into load_data.csv (default: platemap.csv in the plate folder).")] = None,
    plate_name: Annotated[Optional[str], typer.Option(help="Plate name (default: from the files or the folder).")] = None,
    tile: Annotated[int, typer.Option(help="Tile side in pixels of the model's input resolution.")] = 256,
    stride: Annotated[int, typer.Option(help="Tile step in pixels (128 = half a tile: interior pixels are covered by 4 tiles).")] = 128,
    stitch: Annotated[Average, typer.Option(help="How overlapping tiles are combined per pixel.")] = Average.median,
    batch_size: Annotated[Optional[int], typer.Option(help="Tiles per model call, tiles of several fields sharing a batch (default 16); ddpm: fields per call times --samples (default 4).")] = None,
    precision: Annotated[Precision, typer.Option(help="Autocast precision on GPU (the CPU always computes in fp32).")] = Precision.bf16,
    dtype: Annotated[OutDtype, typer.Option(help="Output TIFF type: uint16 intensities (clipped to 0..65535) or float32.")] = OutDtype.uint16,
    shard: Annotated[Optional[str], typer.Option(help="Process shard I of N (e.g. 2/3): every N-th field from the I-th; for job arrays.")] = None,
    workers: Annotated[int, typer.Option(help="Reader and writer threads each.")] = 2,
    illum_fields: Annotated[int, typer.Option(help="Fields (evenly spaced over the plate) averaged for the input illumination correction.")] = 256,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and report it.")] = OnError.raise_,
    sampler: Annotated[Sampler, typer.Option(help="ddpm: sampler (ddpm = ancestral, on a respaced sub-sequence below T steps; ddim; dpmpp = DPM-Solver++ 2M).")] = Sampler.ddpm,
    steps: Annotated[int, typer.Option(help="ddpm: denoising steps, evenly spaced over the schedule (the published sampler: all 2000).")] = 50,
    eta: Annotated[float, typer.Option(help="ddpm: DDIM eta (0 deterministic, 1 = the DDPM posterior).")] = 0.0,
    guidance: Annotated[float, typer.Option(help="ddpm: classifier guidance scale s (0 disables).")] = 0.0,
    classifier: Annotated[Optional[Path], typer.Option(help="ddpm: run folder or checkpoint of `cpvs train --model classifier`, for --guidance.")] = None,
    label_col: Annotated[Optional[str], typer.Option(help="ddpm: metadata column with each field's class (default: the model's own; 'none' samples without).")] = None,
    samples: Annotated[int, typer.Option(help="ddpm: samples per field; K > 1 also writes per-pixel std maps (<channel>_std).")] = 1,
    seed: Annotated[int, typer.Option(help="ddpm: seed; a field's samples depend only on it and the field.")] = 0,
    field_strategy: Annotated[FieldStrategy, typer.Option(help="ddpm: resize fields to the training resolution and back, or sample tiles (shared noise, median stitch).")] = FieldStrategy.resize,
    clip_denoised: Annotated[bool, typer.Option(help="ddpm: clamp each step's predicted clean image into the training targets' range (recorded in the checkpoint; older checkpoints: ±the preprocessing clip).")] = True,
) -> None:
    """Predict the Cell Painting channels of a whole plate from brightfield.

    Applies the checkpoint's own preprocessing to the raw TIFFs, tiles each field (256² tiles,
    stride 128, the last tiles flush with the border), predicts batches of tiles on the device,
    stitches each pixel as the median of the tiles covering it, undoes the normalization and
    writes one TIFF per channel and field with the input plate's naming, plus load_data.csv,
    so `cpvs profile` or CellProfiler read the result directly. Finished fields are skipped on
    a rerun; --shard splits a plate over a job array (see examples/slurm/).
    """
    if checkpoint is None:
        raise CpvsError("--checkpoint is required: cpvs ships no weights", hint="pass a run folder from `cpvs train` or a checkpoint file")
    from cpvs.predict.runner import PredictConfig, parse_shard, predict_plate as run

    st = _state(ctx)
    if model is not None and model.value == "ddpm":
        from cpvs.predict.diffusion_runner import DiffusionPredictConfig, predict_plate_diffusion

        dcfg = DiffusionPredictConfig(
            plate=plate, out=out, checkpoint=checkpoint, sampler=sampler.value,
            steps=steps, eta=eta, guidance=guidance, classifier=classifier,
            label_col=label_col, samples=samples, seed=seed, field_strategy=field_strategy.value, tile=tile, stride=stride,
            batch_size=batch_size or 4, channel_map=channel_map, platemap=platemap, plate_name=plate_name,
            device=st.device, precision=precision.value, dtype=dtype.value, shard=parse_shard(shard), workers=workers,
            illum_fields=illum_fields, clip_denoised=clip_denoised,
        )
        with progress_bar(st.quiet) as cb:
            res = predict_plate_diffusion(dcfg, progress=cb)
        if not st.quiet:
            out_console.print(f"sampled {', '.join(res.channels)} for {res.n_fields} fields on {res.device} "
                              f"({sampler.value}, {res.n_written} written in {res.seconds:.1f} s, {res.n_resumed} already done) -> {res.out}")
        return
    cfg = PredictConfig(
        plate=plate, out=out, checkpoint=checkpoint, model=model.value if model else None, channel_map=channel_map,
        platemap=platemap, plate_name=plate_name, tile=tile, stride=stride, stitch=stitch.value, batch_size=batch_size or 16,
        device=st.device, precision=precision.value, dtype=dtype.value, shard=parse_shard(shard), workers=workers,
        illum_fields=illum_fields, on_error=on_error.value,
    )
    with progress_bar(st.quiet) as cb:
        res = run(cfg, progress=cb)
    if not st.quiet:
        rate = res.n_written / res.seconds if res.seconds else 0
        out_console.print(
            f"predicted {', '.join(res.channels)} for {res.n_fields} fields on {res.device}: {res.n_written} written "
            f"({rate:.2f} fields/s), {res.n_resumed} already done, {len(res.skipped)} skipped -> {res.out}"
        )


@app.command()
@cli_errors
def embed(
    ctx: typer.Context,
    source: Annotated[Path, typer.Argument(metavar="PLATE|STORE", help="A plate folder / LoadData CSV (normalized with the checkpoint's preprocessing) or a store from `cpvs preprocess`.")],
    checkpoint: Annotated[Path, typer.Option(help="DINO / WS-DINO run folder or checkpoint (the teacher networks are used).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Field-level table EMB.parquet; EMB_well.parquet and EMB_perturbation.parquet are written beside it.")],
    channels: Annotated[Optional[str], typer.Option(help="Channels to embed (default: all the checkpoint's channels), e.g. BF alone.")] = None,
    channel_map: Annotated[Optional[str], typer.Option(help="Channel map of the plate (default: its channel_map.csv, else jump).")] = None,
    platemap: Annotated[Optional[Path], typer.Option(help="Platemap of the plate (default: platemap.csv in its folder).")] = None,
    aggregate: Annotated[Average, typer.Option(help="How fields are aggregated to wells and wells to perturbations.")] = Average.median,
    tvn_control_query: Annotated[Optional[str], typer.Option(help="Typical variation normalization fitted on these rows, e.g. \"Metadata_ControlType == 'negcon'\".")] = None,
    attention_maps: Annotated[Optional[Path], typer.Option(help="Folder for PNGs of the last block's CLS attention per head.")] = None,
    n: Annotated[int, typer.Option("--n", help="Fields (evenly spaced) drawn as attention maps.")] = 16,
    precision: Annotated[Precision, typer.Option(help="Autocast precision on GPU (the CPU always computes in fp32).")] = Precision.bf16,
    illum_fields: Annotated[int, typer.Option(help="Plates: fields averaged for the illumination correction.")] = 256,
) -> None:
    """Embed fields with per-channel DINO / WS-DINO ViTs into Parquet tables.

    Per field and channel: CLS embeddings of the four 224² crops tiling the central 448² square,
    median over the crops; channels concatenated (Emb_<Channel>_<i>) and L2-normalized; then
    aggregated to wells and perturbations, optionally after TVN (PCA whitening on controls).
    Works on real and predicted plates and on brightfield channels alone.
    """
    import numpy as np

    from cpvs.device import resolve_device
    from cpvs.embed.embedding import embed_plate, embed_store, models_from_checkpoint, save_tables, tvn
    from cpvs.train.checkpoint import load_checkpoint

    st = _state(ctx)
    ck = load_checkpoint(checkpoint, prefer="last")
    if ck["family"] not in ("dino", "ws-dino"):
        raise CpvsError(f"cpvs embed needs a dino or ws-dino checkpoint, this is a {ck['family']} model", ck["path"])
    device = resolve_device(st.device)
    models = models_from_checkpoint(ck, device)
    chans = _channels(channels) or ck["hparams"]["channels"]
    missing = [c for c in chans if c not in ck["hparams"]["channels"]]
    if missing:
        raise CpvsError(f"the checkpoint has no model for {', '.join(missing)} (it has {', '.join(ck['hparams']['channels'])})", ck["path"])
    is_store = source.is_dir() and (source / "zarr.json").exists()
    with progress_bar(st.quiet) as cb:
        if is_store:
            from cpvs.preprocess.store import Store

            store = Store(source)
            emb = embed_store(store, models, chans, device, precision.value, progress=cb)
            images = lambda i: store.read_field(i, chans)  # noqa: E731
            keys = np.flatnonzero(store.done_mask()).tolist()
        else:
            from cpvs.plate.discover import discover_plate
            from cpvs.preprocess.apply import FieldNormalizer

            plate = discover_plate(source, channel_map=channel_map, channels=chans, platemap=platemap)
            normalizer = FieldNormalizer.for_plate(plate, chans, ck["normalization"], illum_fields)
            emb = embed_plate(plate, normalizer, models, chans, device, precision.value, progress=cb)
            images = lambda i: normalizer.read(plate.fields[i])[0]  # noqa: E731
            keys = list(range(len(plate.fields)))
    table, feats = emb.fields, [c for c in emb.fields.columns if c.startswith("Emb_")]
    if tvn_control_query:
        from cpvs.tables import query_mask

        table, feats = tvn(table, feats, query_mask(table, tvn_control_query, "--tvn-control-query"))
    paths = save_tables(table, feats, out, aggregate.value)
    if attention_maps is not None:
        from cpvs.embed.attention import attention_maps as maps_of, save_attention_png

        picks = keys[:: max(1, len(keys) // max(1, n))][:n]
        for i in picks:
            meta = emb.fields.iloc[keys.index(i)]
            name = f"{meta['Metadata_Plate']}_{meta['Metadata_Well']}_s{meta['Metadata_Site']}"
            save_attention_png(attention_maps / f"{name}.png", maps_of(models, images(i), chans, device),
                               f"{name}: CLS attention of the last block")
    if not st.quiet:
        out_console.print(f"embedded {len(emb.fields)} fields x {len(chans)} channel(s) ({emb.dim} dims each) on {device}"
                          + (f", TVN to {len(feats)} components" if tvn_control_query else "")
                          + ": " + ", ".join(str(p) for p in paths.values()))
        if attention_maps is not None:
            out_console.print(f"attention maps in {attention_maps}")


class Threshold(str, Enum):
    li = "li"
    otsu = "otsu"


class NormMethod(str, Enum):
    standardize = "standardize"
    robustize = "robustize"
    mad_robustize = "mad_robustize"
    spherize = "spherize"


def _write_table(df, path: Path) -> Path:
    from cpvs.runinfo import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
            df.to_csv(tmp, index=False, compression="gzip" if path.name.lower().endswith(".gz") else None)
        else:
            df.to_parquet(tmp, index=False)
    return path


@app.command()
@cli_errors
def profile(
    ctx: typer.Context,
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT", help="Plate folder(s) or LoadData CSV(s) to segment and measure, or one profile table (CSV/Parquet) to normalize and feature-select.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (plates), or output table / folder (table mode).")],
    channel_map: Annotated[Optional[str], typer.Option(help="Channel map of the plate (default: its channel_map.csv, else jump).")] = None,
    channels: Annotated[Optional[str], typer.Option(help="Comma-separated channels to measure (default: every stain, no brightfield).")] = None,
    platemap: Annotated[Optional[Path], typer.Option(help="Platemap joined into the tables (default: platemap.csv in the plate folder).")] = None,
    plate_name: Annotated[Optional[str], typer.Option(help="Plate name (default: from the files or the folder).")] = None,
    nuclei_channel: Annotated[str, typer.Option(help="Channel segmented into nuclei.")] = "DNA",
    cell_channel: Annotated[str, typer.Option(help="Cytoplasmic channel the cells are grown on (AGP or ER).")] = "AGP",
    threshold: Annotated[Threshold, typer.Option(help="Global threshold: li (minimum cross-entropy) or otsu.")] = Threshold.li,
    threshold_correction: Annotated[float, typer.Option(help="Factor on the nuclei threshold.")] = 1.0,
    cell_threshold_correction: Annotated[float, typer.Option(help="Factor on the cytoplasm threshold (below 1 keeps dim cytoplasm).")] = 0.7,
    smoothing: Annotated[float, typer.Option(help="Gaussian sigma before thresholding, px.")] = 1.5,
    min_nucleus_diameter: Annotated[float, typer.Option(help="Smallest nucleus kept, px (equivalent diameter).")] = 12.0,
    max_nucleus_diameter: Annotated[float, typer.Option(help="Largest nucleus kept, px.")] = 90.0,
    declump_distance: Annotated[float, typer.Option(help="Minimum distance between seeds splitting touching nuclei, px.")] = 7.0,
    max_cell_distance: Annotated[float, typer.Option(help="How far a cell may extend from its nucleus, px.")] = 120.0,
    keep_border: Annotated[bool, typer.Option("--keep-border", help="Keep objects touching the field border.")] = False,
    masks_from: Annotated[Optional[Path], typer.Option(help="Reuse masks instead of segmenting: a `cpvs profile` output folder (or a folder of WELL_sSITE_nuclei/cells.tiff).")] = None,
    skip: Annotated[Optional[str], typer.Option(help="Comma-separated modules to skip: intensity, sizeshape, zernike, feret, texture, granularity, radial_distribution, radial_zernikes, correlation, costes, neighbors.")] = None,
    illum_size: Annotated[int, typer.Option(help="Illumination correction median filter size, px (0 disables).")] = 249,
    illum_fields: Annotated[int, typer.Option(help="Fields (evenly spaced) averaged for the illumination function.")] = 256,
    workers: Annotated[int, typer.Option(help="Processes measuring fields in parallel.")] = 1,
    shard: Annotated[Optional[str], typer.Option(help="Process shard I of N (e.g. 2/3); the tables are written by the shard that finishes the plate.")] = None,
    single_cells: Annotated[bool, typer.Option("--single-cells", help="Also write the single-cell table.")] = False,
    aggregate: Annotated[Average, typer.Option(help="Images -> wells -> perturbations (single cells -> image is always the median).")] = Average.median,
    overlays: Annotated[int, typer.Option(help="Save mask overlay PNGs for the first N fields.")] = 0,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and report it.")] = OnError.raise_,
    join: Annotated[Optional[list[Path]], typer.Option(help="Table mode: metadata table(s) joined on their shared Metadata_ columns (e.g. plate, well -> compound, MOA).")] = None,
    normalize: Annotated[Optional[NormMethod], typer.Option(help="Normalize features (pycytominer methods).")] = None,
    control_query: Annotated[Optional[str], typer.Option(help="Rows the normalization is fitted on, e.g. \"Metadata_ControlType == 'negcon'\" (default: all rows).")] = None,
    by_plate: Annotated[bool, typer.Option("--by-plate", help="Fit the normalization separately per Metadata_Plate.")] = False,
    feature_select: Annotated[bool, typer.Option("--feature-select", help="Select features with --select-ops.")] = False,
    select_ops: Annotated[str, typer.Option(help="Feature-selection operations, in order.")] = "drop_na_columns,variance_threshold,blocklist,correlation_threshold,drop_outliers",
    features_from: Annotated[Optional[Path], typer.Option(help="Keep the features of this table (e.g. selected on the ground truth, applied to predictions).")] = None,
    na_cutoff: Annotated[float, typer.Option(help="drop_na_columns: largest allowed fraction of NaN.")] = 0.05,
    corr_threshold: Annotated[float, typer.Option(help="correlation_threshold: drop one of each pair correlated above this.")] = 0.9,
    freq_cut: Annotated[float, typer.Option(help="variance_threshold: second-most-common / most-common value ratio below which a feature is near-constant.")] = 0.05,
    unique_cut: Annotated[float, typer.Option(help="variance_threshold: fraction of unique values below which a feature is near-constant.")] = 0.01,
    outlier_cutoff: Annotated[float, typer.Option(help="drop_outliers: drop features reaching this many SDs in the control rows (all rows without --control-query).")] = 15.0,
) -> None:
    """Profile plates (segment, measure, aggregate) or normalize and select an existing table.

    Plates: nuclei from the DNA channel (threshold, distance watershed, size filters), cells grown
    on a cytoplasmic stain, cytoplasm = cell - nucleus; cp_measure features per compartment and
    channel named like CellProfiler (Cells_Intensity_MeanIntensity_DNA); medians per image, then
    wells and perturbations as Parquet with the platemap's Metadata_ columns. Real and predicted
    plates are profiled identically; --masks-from measures a predicted plate inside the real cells.
    Tables (CellProfiler/CytoTable/pycytominer CSV or Parquet): --normalize and --feature-select.
    """
    from cpvs.profile.normalize import OPERATIONS
    from cpvs.profile.postprocess import PostprocessConfig, postprocess

    st = _state(ctx)
    post = PostprocessConfig(
        normalize=normalize.value if normalize else None, control_query=control_query, by_plate=by_plate,
        select=feature_select, operations=[o.strip() for o in select_ops.split(",") if o.strip()], features_from=features_from,
        na_cutoff=na_cutoff, corr_threshold=corr_threshold, freq_cut=freq_cut, unique_cut=unique_cut, outlier_cutoff=outlier_cutoff,
    )
    bad = [o for o in post.operations if o not in OPERATIONS]
    if bad:
        raise CpvsError(f"unknown --select-ops {', '.join(bad)}; use {', '.join(OPERATIONS)}")
    if len(inputs) == 1 and inputs[0].is_file() and _is_table(inputs[0]):
        from cpvs.tables import canonical_metadata, join_metadata, read_table

        if not post.active:
            raise CpvsError("nothing to do with a table", hint="pass --normalize and/or --feature-select (or --features-from)")
        df = canonical_metadata(read_table(inputs[0]))
        for j in join or []:
            df = join_metadata(df, j)
        result, rep = postprocess(df, post, inputs[0])
        stem = inputs[0].name.split(".")[0]
        target = out if out.suffix.lower() in (".parquet", ".csv", ".gz") else out / f"{stem}_{post.suffix()}.parquet"
        _write_table(result, target)
        if not st.quiet:
            out_console.print(f"{rep.n_rows} rows: {rep.n_features_in} -> {rep.n_features_out} features -> {target}")
            _print_postprocess(rep)
        return
    from cpvs.predict.runner import parse_shard
    from cpvs.profile.pipeline import ProfileConfig, perturbation_columns, profile_plate
    from cpvs.profile.segment import SegmentParams

    seg = SegmentParams(nuclei_channel=nuclei_channel, cell_channel=cell_channel, smoothing=smoothing, threshold=threshold.value,
                        threshold_correction=threshold_correction, cell_threshold_correction=cell_threshold_correction,
                        min_nucleus_diameter=min_nucleus_diameter, max_nucleus_diameter=max_nucleus_diameter,
                        declump_min_distance=declump_distance, max_cell_distance=max_cell_distance, keep_border=keep_border)
    results = []
    for plate in inputs:
        cfg = ProfileConfig(plate=plate, out=out, channel_map=channel_map, channels=_channels(channels), platemap=platemap,
                            plate_name=plate_name, segment=seg, masks_from=masks_from,
                            skip=tuple(x.strip() for x in (skip or "").split(",") if x.strip()), illum_size=illum_size,
                            illum_fields=illum_fields, workers=workers, shard=parse_shard(shard), single_cells=single_cells,
                            aggregate=aggregate.value, overlays=overlays, on_error=on_error.value)
        with progress_bar(st.quiet) as cb:
            res = profile_plate(cfg, progress=cb)
        results.append(res)
        if not st.quiet:
            state = f"{res.n_cells} cells; tables: {', '.join(p.name for p in res.tables.values())}" if res.complete else "plate not finished yet (other shards)"
            out_console.print(f"{res.plate}: {res.n_written} fields measured, {res.n_resumed} already done, "
                              f"{len(res.skipped)} skipped in {res.seconds:.1f} s; {state}")
    if post.active and all(r.complete for r in results):
        import pandas as pd

        from cpvs.tables import aggregate as agg_table, feature_columns

        wells = pd.concat([pd.read_parquet(r.tables["well"]) for r in results], ignore_index=True)
        result, rep = postprocess(wells, post, out)
        suffix = post.suffix()
        _write_table(result, out / f"well_{suffix}.parquet")
        keys = perturbation_columns(result)
        keep = [c for c in result.columns if c.startswith("Metadata_") and c not in keys + ["Metadata_Well", "Metadata_Plate"]]
        pert = agg_table(result, keys, feature_columns(result), aggregate.value, keep)
        _write_table(pert, out / f"perturbation_{suffix}.parquet")
        if not st.quiet:
            out_console.print(f"wells: {rep.n_features_in} -> {rep.n_features_out} features -> {out / f'well_{suffix}.parquet'}, "
                              f"{out / f'perturbation_{suffix}.parquet'}")
            _print_postprocess(rep)


def _print_postprocess(rep) -> None:
    n = rep.normalization
    if n:
        out_console.print(f"  normalized ({n['method']}) on {n['reference_rows']} reference rows"
                          + (", per plate" if n["by_plate"] else "")
                          + (f"; zero-MAD features set to NaN: {len(n['zero_mad_features_set_to_nan'])}" if n["zero_mad_features_set_to_nan"] else "")
                          + (f"; constant features set to NaN: {len(n['constant_features_set_to_nan'])}" if n["constant_features_set_to_nan"] else ""))
    if rep.selection.get("dropped"):
        out_console.print("  dropped by " + ", ".join(f"{k} {v}" for k, v in rep.selection["dropped"].items()))


def _is_table(path: Path) -> bool:
    name = path.name.lower()
    if path.is_dir():
        return False
    from cpvs.plate.loaddata import is_load_data

    return name.endswith((".parquet", ".pq", ".tsv", ".tsv.gz", ".csv.gz")) or (name.endswith(".csv") and not is_load_data(path))


@app.command()
@cli_errors
def evaluate(
    ctx: typer.Context,
    profiles: Annotated[Optional[Path], typer.Argument(metavar="PROFILES", help="Profile table (CSV/TSV/Parquet with Metadata_ columns): cpvs profile/embed output or any CellProfiler/pycytominer table.")] = None,
    nsc: Annotated[bool, typer.Option("--nsc", help="MOA matching: nearest neighbour (cosine) among treatments of other compounds.")] = False,
    nscb: Annotated[bool, typer.Option("--nscb", help="MOA matching among treatments of other compounds and other batches.")] = False,
    target: Annotated[bool, typer.Option("--target", help="Target matching: top-1 and top-k neighbours sharing a target, and MTdist.")] = False,
    cpcor: Annotated[bool, typer.Option("--cpcor", help="Per-feature correlation of PROFILES with --truth profiles of the same images/wells.")] = False,
    toxicity: Annotated[bool, typer.Option("--toxicity", help="k-NN toxicity calls trained on controls (needs --positive-query).")] = False,
    active: Annotated[bool, typer.Option("--active", help="Active subset: PCA, distance to negative controls, 1-D k-means (k = 3).")] = False,
    map_: Annotated[bool, typer.Option("--map", help="Mean average precision (copairs) of replicate, MOA and target retrieval, with p-values.")] = False,
    images: Annotated[bool, typer.Option("--images", help="Image metrics (MAE, MSE, SSIM, PSNR, PCC per channel) of --pred against the truth plate.")] = False,
    fid: Annotated[bool, typer.Option("--fid", help="Fréchet distance per channel of --pred images against the truth plate (needs --fid-network).")] = False,
    truth: Annotated[Optional[Path], typer.Option(help="Ground truth: a profile table (for --cpcor, --toxicity) or a plate (for --images, --fid).")] = None,
    truth_plate: Annotated[Optional[Path], typer.Option(help="Ground-truth plate when --truth is a profile table.")] = None,
    pred: Annotated[Optional[Path], typer.Option(help="Predicted plate folder (from predict-plate) for --images, --fid and the report's image grids.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for results.json and Parquet tables of every evaluation.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="Folder for a self-contained HTML report (report.html).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout instead of tables.")] = False,
    moa_col: Annotated[str, typer.Option(help="MOA column (matched case-insensitively).")] = "Metadata_MOA",
    compound_col: Annotated[str, typer.Option(help="Compound column: same-compound neighbours are excluded.")] = "Metadata_Compound",
    batch_col: Annotated[str, typer.Option(help="Batch column for NSCB (see --derive to make one).")] = "Metadata_Batch",
    perturbation_cols: Annotated[str, typer.Option(help="Comma-separated columns defining a treatment/perturbation.")] = "Metadata_Compound,Metadata_Concentration",
    target_col: Annotated[str, typer.Option(help="Target column; several targets separated by |.")] = "Metadata_Target",
    control_col: Annotated[str, typer.Option(help="Control-type column (negcon / poscon / trt), used for the default --negative-query.")] = "Metadata_ControlType",
    derive: Annotated[Optional[list[str]], typer.Option(help="Add a column from a regex group of another: NEW=SOURCE:REGEX, e.g. 'Metadata_Batch=Metadata_Plate:^(Week\\d+)'. Repeatable.")] = None,
    negative_query: Annotated[Optional[str], typer.Option(help="Rows that are negative controls (default: control column == 'negcon', else MOA or compound == 'DMSO').")] = None,
    positive_query: Annotated[Optional[str], typer.Option(help="Rows that are positive (toxic) controls, e.g. \"Metadata_ControlType == 'poscon'\".")] = None,
    aggregate: Annotated[Average, typer.Option(help="How wells are aggregated to treatments.")] = Average.median,
    match_cols: Annotated[Optional[str], typer.Option(help="--cpcor: comma-separated columns matching prediction and truth rows (default: plate, well, site).")] = None,
    method: Annotated[CorrMethod, typer.Option(help="--cpcor correlation.")] = CorrMethod.spearman,
    k: Annotated[int, typer.Option(help="--target: neighbours counted for the top-k match.")] = 5,
    rounds: Annotated[int, typer.Option(help="--toxicity: resampling rounds of the majority vote.")] = 100,
    null_size: Annotated[int, typer.Option(help="--map: size of copairs' null distribution for p-values.")] = 10000,
    seed: Annotated[int, typer.Option(help="Seed of resampling, null distributions and embeddings.")] = 0,
    fid_network: Annotated[Optional[Path], typer.Option(help="--fid: local Inception-v3 weights (torchvision layout) or a cpvs embed checkpoint; never downloaded.")] = None,
    channels: Annotated[Optional[str], typer.Option(help="--images/--fid: channels to compare (default: the predicted stains).")] = None,
    truth_channel_map: Annotated[Optional[str], typer.Option(help="Channel map of the truth plate (default: its channel_map.csv, else jump).")] = None,
    truth_illum_size: Annotated[int, typer.Option(help="Illumination-correct the truth images per plate and channel with this median filter size in px (0: raw).")] = 249,
    workers: Annotated[int, typer.Option(help="Threads reading images.")] = 2,
) -> None:
    """Evaluate profiles and predicted images the way the field does.

    Profiles (PROFILES): NSC / NSCB MOA matching, target matching with MTdist, CPcor against
    ground-truth profiles, k-NN toxicity calls (with sensitivity and specificity against the truth),
    the active subset, and copairs mAP. Images (--pred against --truth): MAE, MSE, SSIM, PSNR and PCC
    per channel, and FID. --report writes one self-contained HTML page with every computed metric.
    """
    import json

    st = _state(ctx)
    profile_evals = nsc or nscb or target or cpcor or toxicity or active or map_
    if not (profile_evals or images or fid):
        raise CpvsError("nothing to evaluate", hint="pass --nsc, --nscb, --target, --cpcor, --toxicity, --active, --map, --images or --fid")
    if profile_evals and profiles is None:
        raise CpvsError("profile evaluations need a PROFILES table", hint="cpvs evaluate PROFILES --nsc ...")
    truth_table = truth if truth is not None and _is_table(truth) else None
    plate_truth = truth_plate or (truth if truth is not None and truth_table is None else None)
    summary: dict = {}
    extras: dict = {}
    res = cfg = None
    if profile_evals:
        from cpvs.evaluate.suite import EvalConfig, evaluate_profiles, results_json

        cfg = EvalConfig(
            profiles=profiles, truth=truth_table, nsc=nsc, nscb=nscb, target=target, cpcor=cpcor, toxicity=toxicity,
            active=active, map=map_, moa_col=moa_col, compound_col=compound_col, batch_col=batch_col,
            perturbation_cols=[c.strip() for c in perturbation_cols.split(",") if c.strip()], target_col=target_col,
            control_col=control_col, derive=derive or [], negative_query=negative_query, positive_query=positive_query,
            aggregate=aggregate.value, match_cols=[c.strip() for c in match_cols.split(",")] if match_cols else None,
            method=method.value, k=k, rounds=rounds, null_size=null_size, seed=seed,
        )
        if (cpcor or toxicity) and truth is not None and truth_table is None and cpcor:
            raise CpvsError("--cpcor needs --truth to be a profile table (CSV/TSV/Parquet)", truth)
        res = evaluate_profiles(cfg)
        summary.update(results_json(res))
    if images or fid:
        if pred is None or plate_truth is None:
            raise CpvsError("--images and --fid need --pred (a predicted plate) and --truth or --truth-plate (the real plate)")
        from cpvs.evaluate.images import evaluate_images

        if images:
            with progress_bar(st.quiet or json_out) as cb:
                ev = evaluate_images(pred, plate_truth, channels=_channels(channels), truth_channel_map=truth_channel_map,
                                     truth_illum_size=truth_illum_size, workers=workers, progress=cb)
            summary["images"] = {"n_fields": ev.n_fields, "channels": ev.channels,
                                 "summary": json.loads(ev.summary.to_json(orient="records"))}
            extras["image_metrics"] = ev.summary
            extras["image_metrics_per_field"] = ev.per_field
        if fid:
            if fid_network is None:
                raise CpvsError("--fid needs --fid-network FILE (local weights; cpvs never downloads any)")
            from cpvs.evaluate.images import fid_of_plates

            extras["fid"] = fid_of_plates(pred, plate_truth, fid_network, channels=_channels(channels),
                                          truth_channel_map=truth_channel_map, device=st.device)
            summary["fid"] = extras["fid"]
    if report is not None and pred is not None and plate_truth is not None:
        from cpvs.evaluate.images import image_grids

        extras["grids"] = image_grids(pred, plate_truth, channels=_channels(channels), truth_channel_map=truth_channel_map)
    _write_evaluation(out, report, summary, res, cfg, extras, profiles, truth, pred)
    if json_out:
        print(json.dumps(summary, indent=2, default=float))
    elif not st.quiet:
        _print_evaluation(summary, res, extras)
        for where in (out, report):
            if where is not None:
                out_console.print(f"written to {where}")


def _write_evaluation(out, report, summary, res, cfg, extras, profiles, truth, pred) -> None:
    from cpvs.runinfo import atomic_path, write_json_atomic, write_run_record

    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "results.json", summary)
        tables = {"image_metrics_per_field": extras.get("image_metrics_per_field")}
        if res is not None:
            r = res.results
            tables.update({"treatments": res.treatments})
            for key in ("nsc", "nscb"):
                if key in r:
                    tables[f"{key}_neighbors"] = r[key].neighbors
                    tables[f"{key}_per_moa"] = r[key].per_class
            if "target" in r:
                tables["target_neighbors"] = r["target"].neighbors
            if "cpcor" in r:
                tables["cpcor_per_feature"] = r["cpcor"].per_feature
            if "toxicity" in r:
                tables["toxicity_calls"] = r["toxicity"]["pred"].calls
                if "truth" in r["toxicity"]:
                    tables["toxicity_calls_truth"] = r["toxicity"]["truth"].calls
            if "active" in r:
                tables["active"] = r["active"]
            for name, m in r.get("map", {}).items():
                tables[f"map_{name}"] = m
        for name, df in tables.items():
            if df is not None and len(df):
                with atomic_path(out / f"{name}.parquet") as tmp:
                    df.to_parquet(tmp, index=False)
        write_run_record(out, "evaluate", {"profiles": str(profiles), "truth": str(truth), "pred": str(pred)})
    if report is not None:
        from cpvs.evaluate.report import build_report

        build_report(report / "report.html", res, cfg, extras)


def _print_evaluation(summary: dict, res, extras: dict) -> None:
    for note in summary.get("notes", []):
        out_console.print(f"[yellow]note:[/] {note}")
    for key in ("nsc", "nscb"):
        if key in summary:
            m = summary[key]
            out_console.print(f"[bold]{key.upper()}[/] {m['score']:.1%} ({m['n_correct']}/{m['n_queries']} treatments)"
                              + (f"; left out (single batch): {', '.join(m['excluded_moas'])}" if m["excluded_moas"] else "")
                              + (f"; not queried (one compound): {', '.join(m['single_compound_moas'])}" if m["single_compound_moas"] else ""))
    for key in ("nsc", "nscb"):
        if key in summary:
            t = Table(title=f"{key.upper()} per MOA", title_justify="left")
            for c in ("MOA", "n", "correct", "accuracy"):
                t.add_column(c, justify="left" if c == "MOA" else "right")
            for row in summary[key]["per_moa"]:
                t.add_row(str(row["label"]), str(row["n"]), str(row["correct"]), f"{row['accuracy']:.0%}")
            out_console.print(t)
            if summary[key]["confusion"]:
                pairs = "; ".join(f"{c['label']} -> {c['neighbor_label']} ({c['count']})" for c in summary[key]["confusion"][:8])
                out_console.print(f"  confusion pairs: {pairs}")
    if "target" in summary:
        t = summary["target"]
        kk = [k for k in t if k.startswith("top") and not k.endswith("fraction") and k != "top1"][0]
        out_console.print(f"[bold]target matching[/] top-1 {t['top1']}/{t['n_queries']} ({t['top1_fraction']:.1%}, chance "
                          f"{t['chance_top1']:.2%}), {kk} {t[kk]}/{t['n_queries']}; MTdist {t['mtdist']:.3f} "
                          f"(other pairs {t['mean_distance_other_pairs']:.3f})")
    if "cpcor" in summary:
        c = summary["cpcor"]
        out_console.print(f"[bold]CPcor[/] ({c['method']}) mean {c['mean']:.3f} over {c['n_valid']} features, "
                          f"{c['n_above_0.8']} above 0.8, top 10 % {c['top10_mean']:.3f}, top 50 % {c['top50_mean']:.3f}")
        out_console.print("  by compartment: " + ", ".join(f"{k} {v:.2f}" for k, v in c["by_compartment"].items()))
        out_console.print("  by module: " + ", ".join(f"{k} {v:.2f}" for k, v in c["by_module"].items()))
        out_console.print("  by channel: " + ", ".join(f"{k} {v:.2f}" for k, v in c["by_channel"].items()))
    if "toxicity" in summary:
        t = summary["toxicity"]
        line = f"[bold]toxicity[/] {t['n_toxic']}/{t['n_called']} perturbations called toxic (k={t['k']}, {t['rounds']} rounds)"
        if "agreement_with_truth" in t:
            a = t["agreement_with_truth"]
            line += f"; vs truth: sensitivity {a['sensitivity']:.1%}, specificity {a['specificity']:.1%}"
        out_console.print(line)
    if "active" in summary:
        out_console.print(f"[bold]active subset[/] {summary['active']['n_active']}/{summary['active']['n']} perturbations")
    if "map" in summary:
        for name, m in summary["map"].items():
            out_console.print(f"[bold]mAP {name}[/] {m['mean_mAP']:.3f} ({m['fraction_significant']:.0%} of {m['n']} significant after FDR)")
    if "image_metrics" in extras:
        ev = extras["image_metrics"]
        t = Table(title=f"image metrics over {summary['images']['n_fields']} fields (mean ± std)", title_justify="left")
        t.add_column("channel")
        for m in ("mae", "mse", "ssim", "psnr", "pcc"):
            t.add_column(m.upper() if m != "pcc" else "PCC", justify="right")
        for _, r in ev.iterrows():
            t.add_row(r["channel"], *[f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" for m in ("mae", "mse", "ssim", "psnr", "pcc")])
        out_console.print(t)
    if "fid" in extras:
        out_console.print("[bold]FID[/] " + ", ".join(f"{k} {v:.2f}" for k, v in extras["fid"].items()))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cpvs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
