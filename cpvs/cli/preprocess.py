"""``cpvs preprocess``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cpvs.cli.common import JsonOpt, finish, ResizeMethod, StoreDtype, ChannelMapOpt, PlatemapOpt, PlateNameOpt, OnError, channels as parse_channels, cli_errors, out_console, progress_bar, state


@cli_errors
def preprocess(
    ctx: typer.Context,
    plates: Annotated[list[Path], typer.Argument(metavar="PLATE...", help="Plate folder(s) (Phenix or CV8000 file names, or holding load_data.csv) or LoadData CSV file(s).")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="STORE", help="Store to write (a zarr folder, e.g. plate.zarr). Rerunning into it resumes.")],
    channel_map: ChannelMapOpt = None,
    channels: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Comma-separated channels to keep, in this order (default: all the map names).")] = None,
    platemap: PlatemapOpt = None,
    plate_name: PlateNameOpt = None,
    illum_size: Annotated[int, typer.Option(help="Median filter size of the illumination function, in pixels of the raw image (0 disables correction).")] = 249,
    size: Annotated[Optional[str], typer.Option(metavar="N|HxW", help="Resize fields to N or HxW pixels (default: keep the native size).")] = None,
    resize_method: Annotated[ResizeMethod, typer.Option(help="Interpolation used by --size.")] = ResizeMethod("bilinear"),
    clip: Annotated[float, typer.Option(help="Clip z-scored values to +/- this many standard deviations (0 disables).")] = 15.0,
    dtype: Annotated[StoreDtype, typer.Option(help="Storage precision of the normalized images.")] = StoreDtype("float16"),
    chunk: Annotated[int, typer.Option(help="Chunk side in pixels inside the store (random crops read whole chunks).")] = 256,
    workers: Annotated[int, typer.Option(help="Threads reading and processing fields.")] = 2,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and list it in skipped.csv.")] = OnError("raise"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing store made with other inputs or parameters.")] = False,
    json_out: JsonOpt = False,
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

    st = state(ctx)
    found = [p for path in plates for p in discover_plates(path, channel_map=channel_map, channels=parse_channels(channels),
                                                            plate_name=plate_name, platemap=platemap, on_error=on_error.value)]
    with progress_bar(st.quiet) as cb:
        res = preprocess_plates(
            found, out, illum_size=illum_size, size=parse_size(size), resize_method=resize_method.value, clip_z=clip,
            dtype=dtype.value, chunk=chunk, workers=workers, on_error=on_error.value, overwrite=overwrite, progress=cb,
        )

    def human() -> None:
        t = Table(title=f"store {res.store}", title_justify="left")
        t.add_column("channel")
        t.add_column("median raw mean", justify="right")
        t.add_column("median raw std", justify="right")
        for c, s in res.channel_stats.items():
            t.add_row(c, f"{s['mean']:.1f}", f"{s['std']:.1f}")
        out_console.print(t)
        out_console.print(f"{len(found)} plate(s), {res.n_fields} fields of {res.shape[0]}x{res.shape[1]} px: "
                          f"{res.n_written} written, {res.n_resumed} resumed, {len(res.skipped)} skipped, {res.seconds:.1f} s")
        if res.skipped:
            out_console.print(f"[yellow]skipped fields are listed in {res.store / 'skipped.csv'}[/]")

    finish(st, json_out, res, human)
