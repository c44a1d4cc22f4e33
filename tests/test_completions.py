"""The shipped completion scripts match the app, and bash completion works."""

from __future__ import annotations

import subprocess

import pytest

from cpvs.cli.completion import SCRIPTS
from conftest import REPO


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_completion_scripts_are_in_sync_with_the_app(name):
    shipped = (REPO / "completions" / name).read_text()
    assert shipped == SCRIPTS[name](), f"completions/{name} is stale: run `python -m cpvs.cli.completion completions/`"


def _bash_complete(words: list[str]) -> list[str]:
    script = (REPO / "completions" / "cpvs.bash").read_text()
    line = " ".join(words)
    prog = (
        f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _cpvs; printf '%s\\n' \"${{COMPREPLY[@]}}\""
    )
    out = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completion_completes_commands_options_and_choices():
    assert _bash_complete(["cpvs", "pre"]) == ["preprocess", "predict-plate"]
    assert _bash_complete(["cpvs", "prep"]) == ["preprocess"]
    assert _bash_complete(["cpvs", "--device", "cpu", "preprocess", "--resize"]) == ["--resize-method"]
    assert _bash_complete(["cpvs", "preprocess", "--on-error", "s"]) == ["skip"]
    assert set(_bash_complete(["cpvs", "simulate", "--compression", "''"])) == {"none", "lzw", "zlib"}
