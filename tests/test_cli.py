"""The cpvs command line as a user meets it: help, exit codes and one-line errors."""

from __future__ import annotations

import re

import numpy as np
import pytest
from typer.testing import CliRunner

from cpvs import __version__
from cpvs.cli import app
from cpvs.plate import write_image
from conftest import PEDIATRIC_MAP

runner = CliRunner()
SUBCOMMANDS = ["preprocess", "train", "predict-plate", "embed", "profile", "evaluate", "simulate", "demo", "convert"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


def test_help_lists_every_subcommand_and_global_options():
    r = run("--help")
    assert r.exit_code == 0
    for cmd in SUBCOMMANDS:
        assert re.search(rf"\b{cmd}\b", r.output), cmd
    for opt in ("--version", "--quiet", "--device"):
        assert opt in r.output


@pytest.mark.parametrize("command", ["preprocess", "simulate", "demo", "convert"])
def test_every_option_is_documented(command):
    import typer

    group = typer.main.get_command(app)
    cmd = group.get_command(typer.Context(group), command)
    r = run(command, "--help")
    assert r.exit_code == 0
    for p in cmd.params:
        assert p.help and len(p.help) > 10, f"{command} {p.name} has no help"
        if getattr(p, "param_type_name", "") == "option":
            assert p.opts[0] in r.output


def test_preprocess_help_shows_defaults_with_units():
    out = run("preprocess", "--help").output
    assert "249" in out and "pixels" in out and "15.0" in out and "float16" in out


def test_version_and_bad_device():
    r = run("--version")
    assert r.exit_code == 0 and __version__ in r.output
    r = run("--device", "tpu", "simulate", "--help")
    assert r.exit_code == 2 and "--device" in r.output


def test_simulate_then_preprocess_end_to_end(tmp_path):
    r = run("--quiet", "simulate", tmp_path / "sim", "--plates", 1, "--wells", 4, "--sites", 1, "--size", 128)
    assert r.exit_code == 0, r.output
    r = run("preprocess", tmp_path / "sim" / "SIM0-P01", "-o", tmp_path / "s.zarr", "--size", 96)
    assert r.exit_code == 0, r.output
    assert "4 fields of 96x96 px" in r.output
    r = run("preprocess", tmp_path / "sim" / "SIM0-P01", "-o", tmp_path / "s.zarr", "--size", 96)
    assert r.exit_code == 0 and "0 written, 4 resumed" in r.output


def test_preprocess_real_field_with_channel_map_file(pediatric, tmp_path):
    cmap = tmp_path / "pediatric.csv"
    cmap.write_text("\n".join(f"{k},{v}" for k, v in (p.split("=") for p in PEDIATRIC_MAP.split(","))))
    r = run("preprocess", pediatric, "-o", tmp_path / "p.zarr", "--channel-map", cmap)
    assert r.exit_code == 0, r.output
    assert "1 fields of 1080x1080 px" in r.output


# Each bad input: exit code 2, one message naming the file, no traceback.
def _assert_clean_error(r, *needles):
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    flat = " ".join(r.output.split())
    for n in needles:
        assert str(n) in flat, (n, r.output)


def test_error_corrupt_tiff(sim_plate, tmp_path):
    victim = sim_plate / "r01c01f01p01-ch3sk1fk1fl1.tiff"
    victim.write_bytes(b"II*\x00garbage")
    _assert_clean_error(run("preprocess", sim_plate, "-o", tmp_path / "s.zarr"), "corrupt or truncated", victim.name)


def test_error_truncated_tiff(sim_plate, tmp_path):
    victim = sim_plate / "r01c01f02p01-ch8sk1fk1fl1.tiff"
    victim.write_bytes(victim.read_bytes()[:5000])
    _assert_clean_error(run("preprocess", sim_plate, "-o", tmp_path / "s.zarr"), "corrupt or truncated", victim.name)


def test_error_missing_channel_file(sim_plate, tmp_path):
    victim = sim_plate / "r01c02f01p01-ch1sk1fk1fl1.tiff"
    victim.unlink()
    _assert_clean_error(run("preprocess", sim_plate, "-o", tmp_path / "s.zarr"), "no file for channel(s) Mito", victim.name)
    r = run("preprocess", sim_plate, "-o", tmp_path / "s.zarr", "--on-error", "skip")
    assert r.exit_code == 0 and "1 skipped" in r.output


def test_error_field_of_wrong_shape(sim_plate, tmp_path):
    victim = sim_plate / "r01c03f02p01-ch2sk1fk1fl1.tiff"
    write_image(victim, np.zeros((64, 80), np.uint16))
    _assert_clean_error(run("preprocess", sim_plate, "-o", tmp_path / "s.zarr"), "64x80", victim.name)


def test_error_channel_map_names_absent_channel(pediatric, tmp_path):
    _assert_clean_error(
        run("preprocess", pediatric, "-o", tmp_path / "s.zarr", "--channel-map", "1=BF,2=ER,9=DNA"),
        "names DNA = ch9", str(pediatric),
    )


def test_error_platemap_missing_wells(sim_plate, tmp_path):
    pm = sim_plate / "platemap.csv"
    lines = pm.read_text().splitlines()
    pm.write_text("\n".join(lines[:-1]) + "\n")
    missing = lines[-1].split(",")[0]
    _assert_clean_error(run("preprocess", sim_plate, "-o", tmp_path / "s.zarr"), "no row for well(s)", missing, "platemap.csv")


def test_error_missing_plate_folder(tmp_path):
    _assert_clean_error(run("preprocess", tmp_path / "nope", "-o", tmp_path / "s.zarr"), "not found", "nope")


@pytest.mark.parametrize("args, message", [
    (["--model", "unet", "--critic-steps", "3"], "--critic-steps is a cwgan option; --model unet does not use it"),
    (["--model", "cwgan", "--init", "x", "--depth", "3"], "--depth is a unet option; --model cwgan does not use it (the generator keeps"),
    (["--model", "linear", "--epochs", "2"], "--epochs is an option of unet, cwgan, ddpm, classifier, dino, ws-dino; --model linear"),
    (["--model", "dino", "--label", "Metadata_Perturbation"], "--label is an option of ddpm, classifier; --model dino"),
    (["--model", "ddpm", "--weak-label", "Metadata_Compound"], "--weak-label is a ws-dino option"),
])
def test_train_refuses_options_of_other_families(tmp_path, args, message):
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "none.zarr"), "-o", str(tmp_path / "run"), *args])
    assert r.exit_code == 2 and message in " ".join(r.output.split()), r.output
    assert not (tmp_path / "run").exists()


def test_train_help_groups_options_by_family_with_config_defaults():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"})
    assert r.exit_code == 0
    for panel in ("All families", "cWGAN-GP (cwgan)", "Diffusion (ddpm, classifier)", "DINO (dino, ws-dino)"):
        assert panel in r.output
    text = " ".join(r.output.split())
    assert "256 unet/cwgan/linear; 512 ddpm/classifier" in text  # --crop, from the configs
    assert "10 unet; 4 cwgan; 2 ddpm/classifier; 16 dino/ws-dino" in text  # --batch-size


def test_global_options_after_the_verb_and_out_option(tmp_path):
    r = runner.invoke(app, ["simulate", "-o", str(tmp_path / "s"), "--plates", "1", "--wells", "4", "--sites", "1", "--size", "64",
                            "--quiet", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.output == "" and (tmp_path / "s" / "SIM0-P01").is_dir()
    r = runner.invoke(app, ["simulate", str(tmp_path / "a"), "-o", str(tmp_path / "b")])
    assert r.exit_code == 2 and "two output folders" in r.output
