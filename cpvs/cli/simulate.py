"""``cpvs simulate``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cpvs.cli.common import JsonOpt, finish, choices, cli_errors, one_out, out_console, progress_bar, state


Compression = choices("Compression", "none lzw zlib")


@cli_errors
def simulate(
    ctx: typer.Context,
    out_arg: Annotated[Optional[Path], typer.Argument(metavar="OUT", help="Folder to write the plates into (one sub-folder per plate); or -o.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Same as OUT.")] = None,
    plates: Annotated[int, typer.Option(help="Number of plates.")] = 2,
    wells: Annotated[int, typer.Option(help="Wells per plate (filled row by row from A01; 4 to 384).")] = 24,
    sites: Annotated[int, typer.Option(help="Fields (sites) per well.")] = 4,
    size: Annotated[int, typer.Option(help="Field side in pixels (998 = a 2x2-binned 20x field).")] = 998,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives byte-identical TIFFs.")] = 0,
    moas: Annotated[int, typer.Option(help="Number of MOA classes (2 compounds each, sharing a target), 1 to 8.")] = 6,
    batches: Annotated[Optional[int], typer.Option(help="Number of batches the plates are spread over (default: one per plate).")] = None,
    workers: Annotated[int, typer.Option(help="Processes rendering fields in parallel.")] = 1,
    compression: Annotated[Compression, typer.Option(help="TIFF compression of the images (Phenix exports use lzw).")] = Compression("none"),
    masks: Annotated[bool, typer.Option("--masks/--no-masks", help="Also write ground-truth nuclei and cell label images under masks/.")] = True,
    json_out: JsonOpt = False,
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

    st = state(ctx)
    with progress_bar(st.quiet) as cb:
        res = run(one_out(out_arg, out), plates=plates, wells=wells, sites=sites, size=size, seed=seed, moas=moas, batches=batches,
                  workers=workers, compression=None if compression == Compression("none") else compression.value,
                  masks=masks, progress=cb)
    def human() -> None:
        out_console.print(f"simulated {len(res.plates)} plate(s), {res.n_fields} fields ({res.n_written} written, "
                          f"{res.n_fields - res.n_written} already there) in {res.seconds:.1f} s -> {res.out}")
        for p in res.plates:
            out_console.print(f"  {p}")

    finish(st, json_out, res, human)
