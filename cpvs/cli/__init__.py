"""The ``cpvs`` command line: one small module per verb.

Each command parses, validates, calls one library function and prints a summary.
Library code returns data; only this package prints. A :class:`CpvsError` becomes
one message on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from cpvs import __version__
from cpvs.cli import help
from cpvs.cli.common import State, out_console, print_error
from cpvs.errors import CpvsError

GLOBAL_FLAGS = ("--quiet", "-q")
GLOBAL_VALUED = ("--device",)


def hoist_global_options(args: list[str]) -> list[str]:
    """Global options given after the verb (``cpvs preprocess … --quiet``) are moved before it,
    where they belong; everything after ``--`` is left alone."""
    if "--" in args:
        cut = args.index("--")
        return hoist_global_options(args[:cut]) + args[cut:]
    head, tail, moved = [], [], []
    i = 0
    while i < len(args):  # global options before the verb, then the verb
        a = args[i]
        if a in GLOBAL_VALUED and i + 1 < len(args):
            head += [a, args[i + 1]]
            i += 2
            continue
        if not a.startswith("-"):
            break
        head.append(a)
        i += 1
    if i >= len(args):
        return args
    verb, i = args[i], i + 1
    while i < len(args):
        a = args[i]
        if a in GLOBAL_FLAGS:
            moved.append(a)
        elif a in GLOBAL_VALUED and i + 1 < len(args):
            moved += [a, args[i + 1]]
            i += 1
        elif a.startswith(tuple(f"{v}=" for v in GLOBAL_VALUED)):
            moved.append(a)
        else:
            tail.append(a)
        i += 1
    return head + moved + [verb] + tail


class CpvsGroup(TyperGroup):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, hoist_global_options(list(args)))


app = typer.Typer(
    name="cpvs",
    cls=CpvsGroup,
    help="Plate-scale virtual staining and image-based profiling of Cell Painting microscopy.\n\n"
    "Typical chain: simulate or bring a plate -> preprocess -> train -> predict-plate -> profile / embed -> evaluate.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        out_console.print(f"cpvs {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the cpvs version and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or summaries (for batch jobs); errors are still printed.")] = False,
    device: Annotated[str, typer.Option("--device", metavar="auto|cpu|cuda[:N]", help="Where models run: auto (a GPU when there is one), cpu, cuda or cuda:N.")] = "auto",
) -> None:
    from cpvs.device import check_device
    from cpvs.jobs import install_signal_handlers

    install_signal_handlers()
    try:
        check_device(device)
    except CpvsError as e:
        print_error(e.render())
        raise typer.Exit(2) from None
    ctx.obj = State(quiet=quiet, device=device)


def _register() -> None:
    from cpvs.cli.convert import convert
    from cpvs.cli.demo import demo
    from cpvs.cli.embed import embed
    from cpvs.cli.evaluate import evaluate
    from cpvs.cli.info import info
    from cpvs.cli.predict import predict_plate
    from cpvs.cli.preprocess import preprocess
    from cpvs.cli.profile import profile
    from cpvs.cli.simulate import simulate
    from cpvs.cli.train import train

    help.install()
    for name, fn in (("simulate", simulate), ("preprocess", preprocess), ("demo", demo), ("train", train),
                     ("predict-plate", predict_plate), ("embed", embed), ("profile", profile), ("evaluate", evaluate),
                     ("convert", convert), ("info", info)):
        help.unwrap_docstring(fn)
        app.command(name)(fn)


_register()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="cpvs")


def run(argv: list[str], exit: bool = False) -> int:
    """Run ``cpvs ARGV…`` in this process (for embedding and process-level tests); the exit code
    (with ``exit``, the process exits with it, e.g. as a multiprocessing target)."""
    try:
        app(list(argv), prog_name="cpvs")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if exit:
        sys.exit(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
