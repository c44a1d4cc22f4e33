"""What every verb shares: the global state, consoles, error handling, progress bars,
choice enums and small parsers. Verbs parse, call one library function and print."""

from __future__ import annotations

import errno
import functools
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cpvs.errors import CpvsError, CpvsWarning
from cpvs.jobs import Interrupted


def _console(stderr: bool) -> Console:
    # Outside a terminal (logs, `| tee`) rich would wrap at 80 columns and cut messages mid-sentence.
    stream = sys.stderr if stderr else sys.stdout
    tty = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if tty else 400, soft_wrap=not tty)


out_console = _console(stderr=False)
err_console = _console(stderr=True)


@dataclass
class State:
    quiet: bool = False
    device: str = "auto"


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    return root.obj if isinstance(root.obj, State) else State()


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    if issubclass(category, CpvsWarning):
        err_console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)
    else:  # other libraries' warnings keep their usual form
        warnings._showwarning_orig(message, category, filename, lineno, file, line)  # type: ignore[attr-defined]


def cli_errors(fn: Callable) -> Callable:
    """Turn user errors into one message and exit code 2; interruptions into a resume hint."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", CpvsWarning)
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except CpvsError as e:
            print_error(escape(e.render()))
            raise typer.Exit(2) from None
        except OSError as e:
            if e.errno == errno.ENOSPC:
                print_error(f"disk full while writing {e.filename or 'output'}.\n"
                            "  fix: free space and rerun the same command; finished work is kept and resumed.")
                raise typer.Exit(2) from None
            raise
        except KeyboardInterrupt as e:
            code = e.exit_code if isinstance(e, Interrupted) else 130
            what = "terminated" if code == 143 else "interrupted"
            # A zarr read in flight keeps running in zarr's own event-loop thread; at exit its tasks are
            # abandoned and asyncio logs them with tracebacks. Nothing was being written: silence that.
            logging.getLogger("asyncio").disabled = True
            err_console.print(f"[yellow]{what}:[/] rerun the same command to resume; finished work is kept.")
            raise typer.Exit(code) from None

    return wrapper


def is_main_rank() -> bool:
    """Under torchrun only rank 0 prints."""
    return os.environ.get("RANK", "0") == "0"


@contextmanager
def progress_bar(quiet: bool) -> Iterator[Callable[..., None]]:
    """A ``(stage, completed, total, info="")`` callback driving one rich bar per stage."""
    if quiet or not is_main_rank():
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



def choices(name: str, values: str) -> type[Enum]:
    """A str Enum for a choice option: one member per space-separated value, named like it."""
    return Enum(name, {v: v for v in values.split()}, type=str)


OnError = choices("OnError", "raise skip")
Average = choices("Average", "median mean")
Precision = choices("Precision", "fp32 bf16 fp16")
ResizeMethod = choices("ResizeMethod", "bilinear bicubic")
StoreDtype = choices("StoreDtype", "float16 float32")
Threshold = choices("Threshold", "li otsu")
NormMethod = choices("NormMethod", "standardize robustize mad_robustize spherize")


def value(choice: Optional[Enum]):
    return None if choice is None else choice.value


def channels(text: Optional[str]) -> Optional[list[str]]:
    from cpvs.plate.channels import canonical_channel

    if not text:
        return None
    return [canonical_channel(c) for c in text.split(",") if c.strip()]


def ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CpvsError(f"{option} must be comma-separated integers, got {text!r}") from None


def pair(text: str, option: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(","))
    except ValueError:
        raise CpvsError(f"{option} must be two numbers like 0.1,0.2, got {text!r}") from None
    if not 0 < a <= b <= 1:
        raise CpvsError(f"{option} must satisfy 0 < low <= high <= 1, got {text!r}")
    return a, b


def csv_list(text: Optional[str]) -> list[str]:
    return [c.strip() for c in (text or "").split(",") if c.strip()]


def flag(name: str) -> str:
    """The command-line spelling of a parameter name."""
    return "--" + name.replace("_", "-")


def default_of(config: type, name: str):
    """A config dataclass's default for ``name``: defaults are written once, there."""
    for f in fields(config):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            return f.default_factory() if f.default_factory is not MISSING else None
    raise KeyError(name)


def one_out(positional: Optional[Path], option: Optional[Path], default: Optional[Path] = None) -> Path:
    """``OUT`` given as a positional argument or as ``-o``/``--out`` (not both, unless equal)."""
    if positional is not None and option is not None and positional != option:
        raise CpvsError(f"two output folders given: {positional} and -o {option}", hint="pass one of them")
    out = option or positional or default
    if out is None:
        raise CpvsError("no output folder given", hint="pass -o OUT")
    return out


def is_table(path: Path) -> bool:
    """A profile table (CSV/TSV/Parquet), as opposed to a plate folder or a LoadData CSV."""
    if path.is_dir():
        return False
    from cpvs.plate.loaddata import is_load_data

    name = path.name.lower()
    return name.endswith((".parquet", ".pq", ".tsv", ".tsv.gz", ".csv.gz")) or (name.endswith(".csv") and not is_load_data(path))


# Options that mean the same in every verb that reads plates.
ChannelMapOpt = Annotated[Optional[str], typer.Option(
    "--channel-map", metavar="MAP", help="Channel numbers -> names: a preset (jump), a .json/.csv/.tsv file, or inline "
    "'1=BF,2=ER,...' (default: the plate's channel_map.csv, else jump; an OME-Zarr plate: its channel labels, a map "
    "numbering its channel axis from 1).")]
PlatemapOpt = Annotated[Optional[Path], typer.Option(
    "--platemap", metavar="FILE", help="Platemap CSV/TSV (well -> perturbation, compound, MOA, ...) joined into the outputs "
    "(default: platemap.csv in the plate folder, if any).")]
PlateNameOpt = Annotated[Optional[str], typer.Option(
    "--plate-name", metavar="NAME", help="Plate name (default: from the LoadData CSV, CV8000 file names, OME-Zarr plate metadata, or the folder name).")]


JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout (for shell pipelines); progress and messages stay on stderr.")]


def as_json(value) -> str:
    """A result (dataclasses, paths, tables, numpy values) as one JSON document."""
    import json

    import numpy as np
    import pandas as pd

    from cpvs.runinfo import plain

    def default(o):
        if isinstance(o, pd.DataFrame):
            return json.loads(o.to_json(orient="records"))
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    return json.dumps(plain(value), indent=2, default=default)


def finish(st: State, json_out: bool, result, human: Callable[[], None]) -> None:
    """The end of a command: the JSON summary on stdout, or the human one unless --quiet."""
    if json_out:
        print(as_json(result))
    elif not st.quiet:
        human()
