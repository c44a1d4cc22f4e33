"""``cpvs demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cpvs.cli.common import JsonOpt, finish, cli_errors, one_out, out_console, progress_bar, state


@cli_errors
def demo(
    ctx: typer.Context,
    out_arg: Annotated[Optional[Path], typer.Argument(metavar="OUT", help="Folder for the demo's plates, store and results (default: cpvs-demo); or -o.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Same as OUT.")] = None,
    size: Annotated[int, typer.Option(help="Field side in pixels (small keeps the demo quick).")] = 512,
    wells: Annotated[int, typer.Option(help="Wells per plate.")] = 16,
    sites: Annotated[int, typer.Option(help="Fields per well.")] = 2,
    workers: Annotated[int, typer.Option(help="Parallel workers.")] = 2,
    json_out: JsonOpt = False,
) -> None:
    """Run the whole chain built so far on a built-in simulated example.

    Simulate two plates -> preprocess plate 1 -> train a small U-Net and the per-pixel linear
    baseline -> predict plate 2 (another batch; the U-Net also as an OME-Zarr plate) -> image
    metrics against its real stains ->
    profile the real and predicted plate 2 in the same cells -> NSC, target matching and
    feature correlation -> an HTML report.
    """
    from cpvs.demo import run_demo

    st = state(ctx)
    with progress_bar(st.quiet) as cb:
        summary = run_demo(one_out(out_arg, out, Path("cpvs-demo")), size=size, wells=wells, sites=sites, workers=workers,
                           device=st.device, progress=cb)

    def human() -> None:
        t = Table(title="cpvs demo", title_justify="left")
        t.add_column("step")
        t.add_column("result")
        t.add_column("seconds", justify="right")
        for step in summary.steps:
            t.add_row(step.name, step.result, f"{step.seconds:.1f}")
        out_console.print(t)
        out_console.print(f"outputs in {summary.out}")

    finish(st, json_out, summary, human)
