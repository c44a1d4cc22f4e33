"""``cpvs convert``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cpvs.cli.common import JsonOpt, finish, ChannelMapOpt, OnError, PlatemapOpt, PlateNameOpt, channels as parse_channels, choices, cli_errors, out_console, progress_bar, state

Format = choices("Format", "ome-zarr tiff")
NgffVersion = choices("NgffVersion", "0.5 0.4")


@cli_errors
def convert(
    ctx: typer.Context,
    plate: Annotated[Path, typer.Argument(metavar="PLATE", help="Plate folder, LoadData CSV or OME-Zarr HCS plate.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="The OME-Zarr plate to write (plate.zarr), or the folder for --format tiff; with several plates, PATH/<plate>.zarr (or PATH/<plate>/) each.")],
    out_format: Annotated[Format, typer.Option("--format", help="ome-zarr: an OME-Zarr HCS plate; tiff: TIFFs with load_data.csv (Phenix names when the source had them).")] = Format("ome-zarr"),
    ngff_version: Annotated[NgffVersion, typer.Option("--ngff-version", help="OME-Zarr version written: 0.5 (Zarr v3) or 0.4 (Zarr v2, for older viewers).")] = NgffVersion("0.5"),
    channel_map: ChannelMapOpt = None,
    channels: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Comma-separated channels to convert (default: all the channel map or the store names).")] = None,
    platemap: PlatemapOpt = None,
    plate_name: PlateNameOpt = None,
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Validate the written OME-Zarr plate with ome-zarr-models (about 17 ms per field).")] = True,
    workers: Annotated[int, typer.Option(help="Fields read and written in parallel (threads).")] = 2,
    on_error: Annotated[OnError, typer.Option(help="raise: stop at the first bad field; skip: leave it out and report it.")] = OnError("raise"),
    json_out: JsonOpt = False,
) -> None:
    """Convert a plate between TIFFs (or a LoadData CSV) and an OME-Zarr HCS plate.

    OME-Zarr: plate -> well -> field groups, one (C, H, W) array per field with named channels
    (omero labels and colours) and a pyramid of 2x2 means, validated with ome-zarr-models;
    the platemap travels inside. Back to TIFF (--format tiff): the same pixels, names, wells,
    sites, channels and platemap, so the round trip changes nothing cpvs reads. Finished
    fields are skipped on a rerun.
    """
    from cpvs.plate.convert import convert as run

    st = state(ctx)
    with progress_bar(st.quiet) as cb:
        results = run(plate, out, out_format.value, channel_map=channel_map, channels=parse_channels(channels), platemap=platemap,
                      plate_name=plate_name, version=ngff_version.value, workers=workers, on_error=on_error.value, progress=cb,
                      validate=validate)
    def human() -> None:
        for r in results:
            check = f", valid OME-Zarr {r.validated}" if r.validated else ""
            out_console.print(f"{r.plate}: {r.n_fields} fields of {', '.join(r.channels)} -> {r.format}: {r.n_written} written, "
                              f"{r.n_resumed} already there, {len(r.skipped)} skipped{check} ({r.seconds:.1f} s) -> {r.out}")
            for s in r.skipped[:10]:
                out_console.print(f"  skipped {s['field']}: {s['reason']}")

    finish(st, json_out, results, human)
