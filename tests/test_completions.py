"""The shipped completion scripts match the app, and complete in the real shells.

Each script is driven in its own shell: bash (bash-completion loaded when installed, the
function ``complete -p cpvs`` names called with COMP_LINE/COMP_WORDS split the way
readline splits them, COMPREPLY read back), zsh (an interactive ``zsh -f`` in a zpty with
compinit, TAB pressed, every ``compadd`` captured with its description) and fish
(``complete -C``). The shells come from Debian (``.ci/run`` installs them); a missing
shell skips its tests and says how to install it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import textwrap
from enum import Enum

import pytest
import typer

from cpvs.cli.completion import SCRIPTS, first_sentence
from conftest import REPO

COMPLETIONS = REPO / "completions"
BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"


def need(shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed (Debian: apt-get install -y {shell}; .ci/run installs zsh, fish and bash-completion where apt-get works)")


@pytest.fixture
def files(tmp_path):
    """A working directory with known files, for path completion."""
    work = tmp_path / "work"
    (work / "plate_a").mkdir(parents=True)
    (work / "run.pt").write_text("")
    (work / "table.csv").write_text("")
    return work


# ------------------------------------------------------------------------------ drivers

_BASH_DRIVER = r"""
[[ -f {bash_completion} ]] && source {bash_completion}
source "$1"
COMP_LINE=$2; COMP_POINT=${{#COMP_LINE}}
# COMP_WORDS as readline makes them: blanks separate words, and = and : are words of their own
read -ra COMP_WORDS <<< "$(sed -E 's/([=:])/ \1 /g' <<< "$COMP_LINE")"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
fn=$(complete -p cpvs | sed -E 's/.*-F ([^ ]+).*/\1/')
"$fn" cpvs "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}"
"""


def bash(line: str, cwd, folder=COMPLETIONS) -> list[str]:
    need("bash")
    prog = _BASH_DRIVER.format(bash_completion=BASH_COMPLETION)
    out = subprocess.run(["bash", "-c", prog, "driver", str(folder / "cpvs.bash"), line], cwd=cwd,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return sorted(w for w in out.stdout.split("\n") if w)


# The zsh driver runs an interactive zsh in a pseudo-terminal (zsh/zpty), types the line and
# TAB; compadd is wrapped to print every candidate that matched with its display string
# (the technique of zsh-capture-completion), and the shell exits after the first completion.
_ZSH_SETUP = r"""
PROMPT= RPROMPT= PS2=
stty columns 1000 2>/dev/null; COLUMNS=1000
unsetopt prompt_sp prompt_cr
fpath=({completions} $fpath)
autoload -Uz compinit && compinit -u -D
bindkey '^M' undefined
bindkey '^J' undefined
bindkey '^I' complete-word
zstyle ':completion:*' list-grouped false
zstyle ':completion:*' insert-tab false
comppostfuncs=( exit )
compadd() {{
  if [[ ${{@[1,(i)(-|--)]}} == *-(O|A|D)\ * ]]; then builtin compadd "$@"; return $?; fi
  local -a __hits __dscr
  if (( $@[(I)-d] )); then
    local __d=${{@[$[${{@[(i)-d]}}+1]]}}
    if [[ $__d == \(* ]]; then eval "__dscr=$__d"; else __dscr=( "${{(@P)__d}}" ); fi
  fi
  if (( $#__dscr )); then builtin compadd -A __hits -D __dscr "$@"; else builtin compadd -A __hits "$@"; fi
  local i
  # a newline first: the first hit would otherwise follow the echo of the typed line
  for i in {{1..$#__hits}}; do print -r -- $'\n'"<<HIT>>$__hits[$i]<<D>>$__dscr[$i]"; done
}}
print -r -- '<<READY>>'
"""

_ZSH_DRIVER = r"""
zmodload zsh/zpty || exit 3
zpty z zsh -f -i
zpty -w z "source ${(q)1}"
local out all=''
repeat 50; do zpty -r z out; [[ $out == *'<<READY>>'* ]] && break; done
zpty -w -n z "$2"$'\t'
while zpty -r z out; do all+=$out; done
print -r -- $all
"""


def zsh(line: str, cwd, folder=COMPLETIONS) -> dict[str, str]:
    """Candidate -> its description (empty when it has none)."""
    need("zsh")
    setup = cwd.parent / "zsh-setup"
    setup.write_text(_ZSH_SETUP.format(completions=folder))
    out = subprocess.run(["zsh", "-f", "-c", _ZSH_DRIVER, "driver", str(setup), line], cwd=cwd,
                         capture_output=True, text=True, timeout=60, env={**os.environ, "TERM": "dumb"})
    setup.unlink()
    assert out.returncode == 0, out.stderr
    found = {}
    for row in out.stdout.replace("\r", "").split("\n"):
        if row.startswith("<<HIT>>") and "<<D>>" in row:
            word, display = row[len("<<HIT>>"):].split("<<D>>", 1)
            if word:  # zsh shows descriptions as "word  -- description"
                found[word] = display.split(" -- ", 1)[1].strip() if " -- " in display else ""
    return found


def fish(line: str, cwd, folder=COMPLETIONS) -> dict[str, str]:
    need("fish")
    prog = f"source {_fish_quote(str(folder / 'cpvs.fish'))}; complete -C {_fish_quote(line)}"
    out = subprocess.run(["fish", "--no-config", "-c", prog], cwd=cwd, capture_output=True, text=True, timeout=30,
                         env={**os.environ, "HOME": str(cwd.parent)})  # fish may write its state under HOME
    assert out.returncode == 0, out.stderr
    return dict((row.split("\t", 1) + [""])[:2] for row in out.stdout.split("\n") if row)


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---------------------------------------------------------------------------- expected


def _app():
    from cpvs.cli import app

    group = typer.main.get_command(app)
    return group, typer.Context(group)


def commands() -> list[str]:
    group, ctx = _app()
    return group.list_commands(ctx)


def help_of(command: str | None, option: str) -> str:
    group, ctx = _app()
    cmd = group if command is None else group.get_command(ctx, command)
    return next(p.help for p in cmd.params if option in getattr(p, "opts", []))


def command_help(command: str) -> str:
    group, ctx = _app()
    return group.get_command(ctx, command).help


SAMPLERS = {"ddpm", "ddim", "dpmpp"}
DEVICES = {"auto", "cpu", "cuda"}
PREDICT_OPTIONS = {"--checkpoint", "--sampler", "--out", "-o", "--shard", "--on-error", "--format"}


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_completion_scripts_are_in_sync_with_the_app(name):
    shipped = (COMPLETIONS / name).read_text()
    assert shipped == SCRIPTS[name](), f"completions/{name} is stale: run `python -m cpvs.cli.completion completions/`"


def test_first_sentence_keeps_parentheses_abbreviations_and_colons():
    assert first_sentence("Checkpoint file or run folder (its best.pt, else last.pt). It says what it is.") == \
        "Checkpoint file or run folder (its best.pt, else last.pt)"
    assert first_sentence("Class column (e.g. Metadata_Perturbation; 'none'). More.") == "Class column (e.g. Metadata_Perturbation; 'none')"
    assert first_sentence("raise: stop;\n  skip: go on.  Second sentence.") == "raise: stop; skip: go on"
    assert first_sentence(None) == ""


def test_bash_completes_commands_global_values_options_and_choices(files):
    assert bash("cpvs ", files) == sorted(commands())
    assert bash("cpvs pre", files) == ["predict-plate", "preprocess"]
    assert bash("cpvs --device ", files) == sorted(DEVICES)
    assert bash("cpvs --device cu", files) == ["cuda"]
    assert bash("cpvs --device=c", files) == ["cpu", "cuda"]
    assert bash("cpvs --device cuda:0 pre", files) == ["predict-plate", "preprocess"]  # readline splits cuda:0
    assert bash("cpvs -q --device cpu predict-plate --sampler ", files) == sorted(SAMPLERS)
    assert bash("cpvs predict-plate --sampler=dd", files) == ["ddim", "ddpm"]
    opts = bash("cpvs predict-plate --", files)
    assert PREDICT_OPTIONS - {"-o"} <= set(opts) and not set(opts) & set(commands())
    assert bash("cpvs predict-plate --checkpoint ", files) == ["plate_a", "run.pt", "table.csv"]
    assert bash("cpvs predict-plate --steps ", files) == []  # a number: nothing to offer, not files or commands
    assert bash("cpvs preprocess --device ", files) == sorted(DEVICES)  # global options also after the verb
    assert bash("cpvs preprocess --channel-map ", files) == ["jump", "plate_a", "run.pt", "table.csv"]
    assert bash("cpvs preprocess --on-error s", files) == ["skip"]
    assert bash("cpvs simulate --compression ", files) == ["lzw", "none", "zlib"]
    assert bash("cpvs --device cpu preprocess --resize", files) == ["--resize-method"]
    assert bash("cpvs evaluate t", files) == ["table.csv"]  # positional arguments are paths


def test_zsh_completes_commands_global_values_options_and_choices(files):
    found = zsh("cpvs ", files)
    assert set(found) == set(commands())
    assert found["evaluate"] == first_sentence(command_help("evaluate"))
    assert set(zsh("cpvs --device ", files)) == DEVICES
    assert set(zsh("cpvs --device=c", files)) == {"cpu", "cuda"}
    assert set(zsh("cpvs --device cuda:0 pre", files)) == {"predict-plate", "preprocess"}
    assert set(zsh("cpvs predict-plate --sampler ", files)) == SAMPLERS
    opts = zsh("cpvs predict-plate --", files)
    assert PREDICT_OPTIONS - {"-o"} <= set(opts) and not set(opts) & set(commands())
    assert set(zsh("cpvs predict-plate --checkpoint ", files)) >= {"plate_a", "run.pt", "table.csv"}
    assert set(zsh("cpvs preprocess --channel-map ", files)) >= {"jump", "plate_a", "table.csv"}


def test_fish_completes_commands_global_values_options_and_choices(files):
    found = fish("cpvs ", files)
    assert set(found) == set(commands())
    assert found["evaluate"] == first_sentence(command_help("evaluate"))
    assert set(fish("cpvs --device ", files)) == DEVICES
    assert set(fish("cpvs --device cpu pre", files)) == {"predict-plate", "preprocess"}
    assert set(fish("cpvs predict-plate --sampler ", files)) == SAMPLERS
    opts = fish("cpvs predict-plate --", files)
    assert PREDICT_OPTIONS - {"-o"} <= set(opts) and not set(opts) & set(commands())
    assert set(fish("cpvs predict-plate --checkpoint ", files)) >= {"plate_a/", "run.pt", "table.csv"}
    assert set(fish("cpvs preprocess --channel-map ", files)) >= {"jump", "plate_a/", "table.csv"}
    assert fish("cpvs predict-plate --steps ", files) == {}


def _colon_options(command: str) -> dict[str, str]:
    """Options of ``command`` whose description (the help's first sentence) has a colon."""
    group, ctx = _app()
    cmd = group.get_command(ctx, command)
    out = {}
    for p in cmd.params:
        long = [o for o in getattr(p, "opts", []) if o.startswith("--")]
        if long and ":" in first_sentence(p.help):
            out[long[0]] = first_sentence(p.help)
    return out


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_descriptions_are_the_first_sentence_with_its_colons(shell, files):
    complete = {"zsh": zsh, "fish": fish}[shell]
    device = complete("cpvs --dev", files)
    assert device == {"--device": first_sentence(help_of(None, "--device"))}
    assert ":" in device["--device"]  # "cuda:N", not "cudaN"
    with_colons = _colon_options("predict-plate")
    assert {"--on-error", "--sampler"} <= set(with_colons)  # "raise: stop …", "(default: ddpm)"
    shown = complete("cpvs predict-plate --", files)
    for option, sentence in with_colons.items():
        assert shown[option] == sentence, option
    simulate = complete("cpvs sim", files)["simulate"]
    assert simulate == first_sentence(command_help("simulate")) and "\n" not in simulate
    assert len(re.findall(r"\. [A-Z]", simulate)) == 0  # one sentence, not the paragraph


NASTY = "Mode: fast [default] or 'slow' \"x\" `cmd` $HOME a\\b; 50% & done: {a,b} *. Second sentence."


Speed = Enum("Speed", {"fast": "fast", "slow": "slow"}, type=str)


def _nasty_app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main(device: str = typer.Option("auto", help=NASTY)):
        """Top."""

    @app.command()
    def run(speed: Speed = typer.Option("fast", help=NASTY)):
        """Run: the [first] 'one'. Not this."""

    return app


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_descriptions_survive_the_shells_quoting(shell, files, tmp_path):
    """Colons, brackets, quotes, backquotes, $, backslashes and % in help texts are shown as written."""
    from cpvs.cli.completion import write_all

    folder = tmp_path / "nasty"
    write_all(folder, _nasty_app())
    complete = {"zsh": zsh, "fish": fish}[shell]
    assert complete("cpvs ", files, folder) == {"run": "Run: the [first] 'one'"}
    expected = first_sentence(NASTY)
    assert expected.startswith("Mode: fast [default]") and expected.endswith("{a,b} *")
    assert complete("cpvs run --", files, folder)["--speed"] == expected
    assert set(complete("cpvs run --speed ", files, folder)) == {"fast", "slow"}
    assert complete("cpvs --dev", files, folder) == {"--device": expected}


def test_ci_installs_the_shells():
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"apt-get install[^\n]*zsh[^\n]*fish[^\n]*bash-completion", ci), textwrap.shorten(ci, 200)
