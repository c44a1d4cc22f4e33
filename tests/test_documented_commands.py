"""Every `cpvs` command line in README.md and examples/ is valid for this CLI: options exist,
values parse, required options are there, and train options belong to the family. The quick
start (the first commands a new user runs) runs for real."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from cpvs.cli import app, hoist_global_options

REPO = Path(__file__).resolve().parents[1]


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _cpvs_args(line: str) -> list[str] | None:
    """The arguments after `cpvs` (or `-m cpvs`) of a shell line, variables replaced by placeholders."""
    line = line.split(" #")[0].strip()
    m = re.search(r"(?:^|\s|do\s+)(?:cpvs|-m cpvs)\s+(.*)$", line)
    if not m or line.startswith("#"):
        return None
    rest = re.sub(r"\"?\$\{[A-Za-z_][A-Za-z_0-9]*\[@\]\}\"?", "", m.group(1))  # arrays of optional arguments
    rest = re.sub(r"\[[^\]]*\]", "", rest)  # optional parts written as [--x y]
    rest = re.sub(r"\$\{[A-Za-z_][A-Za-z_0-9]*:-([^}]*)\}", r"\1", rest)  # ${VAR:-default}: the default
    rest = re.sub(r"\$\{?[A-Za-z_][A-Za-z_0-9]*\}?", "1", rest)  # other shell variables (paths or numbers)
    rest = rest.split(";")[0].split("|")[0].split("&&")[0]
    rest = rest.replace("…", "").replace("...", "")
    return shlex.split(rest)


def documented_commands() -> list[tuple[str, list[str]]]:
    sources = [REPO / "README.md", *sorted((REPO / "examples").rglob("*.sh")), *sorted((REPO / "examples").rglob("*.md"))]
    found = []
    for path in sources:
        text = path.read_text()
        if path.suffix == ".md":  # only the code blocks
            text = "\n".join(re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S))
        for line in _logical_lines(text):
            args = _cpvs_args(line)
            if args and not any(a in ("COMMAND", "--help", "-h") for a in args):
                found.append((f"{path.relative_to(REPO)}: {line.strip()[:80]}", args))
    return found


COMMANDS = documented_commands()


def test_the_docs_hold_command_lines():
    assert len(COMMANDS) > 30
    assert {a[0] for _, a in COMMANDS if not a[0].startswith("-")} & {"simulate", "preprocess", "train", "predict-plate"}


@pytest.mark.parametrize("where, args", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_line_parses(where, args):
    from cpvs.cli.train import build_config

    group = typer.main.get_command(app)
    args = hoist_global_options(args)
    i = 0
    while args[i].startswith("-"):  # global options
        assert args[i] in ("--quiet", "-q", "--device"), f"{where}: unknown global option {args[i]}"
        i += 2 if args[i] == "--device" else 1
    name, rest = args[i], args[i + 1 :]
    cmd = group.commands.get(name)
    assert cmd is not None, f"{where}: unknown command {name}"
    with cmd.make_context(name, list(rest)) as sub:
        if name == "train":
            p = sub.params
            given = {k: v for k, v in p.items() if k not in ("model", "data", "out", "json_out") and v is not None}
            build_config(p["model"].value, p["data"], p["out"], "cpu", given)


@pytest.mark.slow
def test_readme_quick_start_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [a for line in _logical_lines(block) if (a := _cpvs_args(line))]
    assert [a[0] for a in lines] == ["simulate", "preprocess", "preprocess", "profile", "info"]
    for args in lines:
        args = [a.replace("/tmp/", f"{tmp_path}/") for a in args]
        r = subprocess.run([sys.executable, "-m", "cpvs", "--quiet", *args], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, f"cpvs {' '.join(args)}\n{r.stderr}"
    assert (tmp_path / "sim.zarr" / "zarr.json").exists() and (tmp_path / "pediatric.zarr" / "zarr.json").exists()
    assert r.stdout.startswith("profile table") and "features by compartment and module" in r.stdout  # the info line
