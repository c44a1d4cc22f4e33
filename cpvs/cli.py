"""The ``cpvs`` command line. Thin: parse, validate, call one library function, print a summary.

Library code returns data; only this module prints. A :class:`CpvsError` becomes
one message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import errno
import functools
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
def progress_bar(quiet: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A ``(stage, completed, total)`` callback driving one rich bar per stage."""
    if quiet:
        yield lambda *_: None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=False,
    ) as prog:
        tasks: dict[str, int] = {}

        def update(stage: str, completed: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=completed, total=total)

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

    Today: simulate two plates -> preprocess them into one store -> summary.
    """
    from cpvs.demo import run_demo

    st = _state(ctx)
    with progress_bar(st.quiet) as cb:
        summary = run_demo(out, size=size, wells=wells, sites=sites, workers=workers, progress=cb)
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


# --------------------------------------------------------------------------- not built yet
_LATER = {"allow_extra_args": True, "ignore_unknown_options": True}


def _not_built(command: str, capability: str) -> None:
    err_console.print(
        f"[bold red]error:[/] `cpvs {command}` is not built yet; it arrives with the capability "
        f"\"{capability}\". Nothing was done.",
        highlight=False,
    )
    raise typer.Exit(2)


@app.command(context_settings=_LATER)
def train(ctx: typer.Context) -> None:
    """Train a model on a preprocessed store: unet | cwgan | ddpm | classifier | dino | ws-dino.

    Not available yet: arrives with "Virtual staining I" (unet, cwgan), "Virtual staining II"
    (ddpm, classifier) and "Self-supervised profiling" (dino, ws-dino).
    """
    _not_built("train", "Virtual staining I: U-Net and cWGAN-GP training")


@app.command("predict-plate", context_settings=_LATER)
def predict_plate(ctx: typer.Context) -> None:
    """Predict the Cell Painting channels of a whole plate from brightfield (tiles, overlap-median stitching).

    Not available yet: arrives with "Virtual staining I" (unet, cwgan) and "Virtual staining II" (ddpm).
    """
    _not_built("predict-plate", "Virtual staining I: whole-plate prediction with overlap-median stitching")


@app.command(context_settings=_LATER)
def embed(ctx: typer.Context) -> None:
    """Embed fields with per-channel DINO / WS-DINO ViTs into a Parquet table.

    Not available yet: arrives with "Self-supervised profiling: DINO and WS-DINO".
    """
    _not_built("embed", "Self-supervised profiling: DINO and WS-DINO training, cpvs embed")


@app.command(context_settings=_LATER)
def profile(ctx: typer.Context) -> None:
    """Segment cells and measure CellProfiler-style features; aggregate, normalize and select features.

    Not available yet: arrives with "Profiling: segmentation, CellProfiler-compatible features".
    """
    _not_built("profile", "Profiling: segmentation, CellProfiler-compatible features, cpvs profile")


@app.command(context_settings=_LATER)
def evaluate(ctx: typer.Context) -> None:
    """Evaluate images or profiles: image metrics, CPcor, NSC/NSCB, target matching, toxicity, mAP, report.

    Not available yet: arrives with "Virtual staining I" (--images) and "Evaluation suite" (the rest).
    """
    _not_built("evaluate", "Evaluation suite: NSC/NSCB, target matching, feature correlation, toxicity")


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cpvs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
