"""What a new user tripped on in their first hour (issue #14), each through the CLI as they ran it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cpvs.cli import app

runner = CliRunner()
BBBC021 = "../shared/data/bbbc021/BBBC021_per_well_feature_selected_mad_robustize.csv"


def cli(*args, **kw):
    return runner.invoke(app, [str(a) for a in args], **kw)


def test_a_channel_map_that_drops_or_misnames_a_channel_warns(pediatric, tmp_path):
    r = cli("preprocess", pediatric, "--channel-map", "1=BF,2=ER,3=AGP,4=Mitoo,5=DNA", "-o", tmp_path / "s.zarr", "--illum-size", "0")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "warning:" in text and "ch6" in text and "does not name" in text
    assert "Mitoo" in text and "not the names cpvs models use" in text


def test_illumination_from_one_field_warns(pediatric, tmp_path):
    r = cli("preprocess", pediatric, "--channel-map", "1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA", "-o", tmp_path / "s.zarr")
    assert r.exit_code == 0 and "estimated from 1 field(s)" in " ".join(r.output.split()), r.output
    r = cli("preprocess", pediatric, "--channel-map", "1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA", "-o", tmp_path / "t.zarr",
            "--illum-size", "0")
    assert "warning" not in r.output


def test_skip_on_a_plate_whose_only_field_is_bad_leaves_a_list_not_a_half_store(pediatric_copy, tmp_path):
    for p in pediatric_copy.glob("*ch2*.tiff"):
        p.write_bytes(b"not a tiff")
    out = tmp_path / "s.zarr"
    r = cli("preprocess", pediatric_copy, "--channel-map", "1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA", "-o", out, "--on-error", "skip")
    assert r.exit_code == 2 and "no readable field" in r.output and "fix:" in r.output, r.output
    assert (out / "skipped.csv").exists() and "corrupt" in (out / "skipped.csv").read_text()
    assert not (out / "zarr.json").exists(), "a partial store was left behind"


def test_outside_a_terminal_messages_are_not_wrapped(tmp_path):
    r = cli("preprocess", tmp_path / ("a-long-folder-name-" * 4), "-o", tmp_path / "o.zarr")
    first = r.output.strip().splitlines()[0]
    assert r.exit_code == 2 and len(first) > 100 and first.endswith("not found")


def test_progress_shows_from_the_start(sim_root, tmp_path):
    from cpvs.simulate import simulate

    calls = []
    simulate(tmp_path / "s", plates=1, wells=4, sites=1, size=64, progress=lambda *a, **k: calls.append(a))
    assert calls[0] == ("fields", 0, 4)


def test_quiet_evaluate_still_prints_the_result_when_it_writes_nothing(tmp_path):
    r = cli("-q", "evaluate", BBBC021, "--nsc", "--moa-col", "Metadata_moa")
    assert r.exit_code == 0 and "NSC 91.3% (94/103" in r.output
    r = cli("-q", "evaluate", BBBC021, "--nsc", "--moa-col", "Metadata_moa", "-o", tmp_path / "e")
    assert r.output == "" and (tmp_path / "e" / "results.json").exists()


def test_every_command_that_ends_with_a_summary_takes_json(tmp_path):
    import typer

    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        assert "--json" in [o for p in cmd.params for o in p.opts], f"{name} has no --json"
    r = cli("simulate", "-o", tmp_path / "s", "--plates", "1", "--wells", "4", "--sites", "1", "--size", "64", "--json")
    doc = json.loads(r.stdout)
    assert doc["n_fields"] == 4 and doc["plates"] == [str(tmp_path / "s" / "SIM0-P01")]
    r = cli("preprocess", tmp_path / "s" / "SIM0-P01", "-o", tmp_path / "p.zarr", "--json")
    doc = json.loads(r.stdout)
    assert doc["n_fields"] == 4 and set(doc["channel_stats"]) >= {"DNA", "BF"}


def test_help_shows_metavars_a_person_reads():
    r = cli("preprocess", "--help", env={"COLUMNS": "200"})
    assert "Usage: cpvs preprocess [OPTIONS] PLATE..." in r.output
    for python_type in ("<list[Path]>", "<bool>", "<int>", "{PLATE"):
        assert python_type not in r.output
    assert "INT" in r.output and "bilinear|bicubic" in r.output
    r = cli("evaluate", "--help", env={"COLUMNS": "200"})
    assert "--top-k" in r.output


def test_predict_plate_offers_only_the_families_it_can_run_and_train_lists_all():
    r = cli("predict-plate", "p", "-o", "o", "--checkpoint", "c", "--model", "dino")
    assert r.exit_code == 2 and "dino" in r.output
    r = cli("train", "--help", env={"COLUMNS": "250"})
    for family in ("unet", "cwgan", "linear", "ddpm", "classifier", "dino", "ws-dino"):
        assert family in r.output


def test_report_names_prediction_and_truth_and_skips_empty_panels(tmp_path):
    from cpvs.evaluate.figures import category_colour
    from cpvs.evaluate.report import build_report
    from cpvs.evaluate.suite import EvalConfig, evaluate_profiles

    df = pd.read_csv(BBBC021)
    for d in ("profiles-truth", "profiles-unet"):
        (tmp_path / d).mkdir()
        df.assign(Metadata_Batch="one batch").to_parquet(tmp_path / d / "well.parquet")
    cfg = EvalConfig(tmp_path / "profiles-unet" / "well.parquet", truth=tmp_path / "profiles-truth" / "well.parquet", nsc=True,
                     cpcor=True, moa_col="Metadata_moa", match_cols=["Metadata_Plate", "Metadata_Well"])
    page = build_report(tmp_path / "r" / "report.html", evaluate_profiles(cfg), cfg).read_text()
    assert "prediction profiles-unet/well.parquet against ground truth profiles-truth/well.parquet" in page
    colours = [category_colour(i, 6) for i in range(6)]
    assert min(np.abs(np.subtract(a, b)).sum() for i, a in enumerate(colours) for b in colours[i + 1:]) > 0.3


def test_text_checkpoint_is_named_without_unsafe_advice(sim_root, tmp_path):
    ck = tmp_path / "model.txt"
    ck.write_text("these are not weights\n")
    r = cli("predict-plate", sim_root / "SIM3-P01", "--checkpoint", ck, "-o", tmp_path / "o")
    assert r.exit_code == 2 and "not a cpvs checkpoint" in r.output and "weights_only" not in r.output


@pytest.mark.slow
def test_demo_writes_a_report_with_image_grids(tmp_path):
    r = cli("--device", "cpu", "demo", "-o", tmp_path / "d", "--size", "256", "--wells", "8", "--sites", "2", "--json")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "d" / "report" / "report.html").read_text()
    assert "Images: brightfield, ground truth, prediction" in page and "prediction profiles-unet/" in page
    shutil.rmtree(tmp_path / "d")


def test_cpcor_against_a_cellprofiler_table_matches_features_named_by_its_pipeline(pediatric, tmp_path):
    """CellProfiler names features after the pipeline's images (…_CorrDNA, …_OrigBrightfield);
    cpvs writes …_DNA, …_BF. Matching maps one onto the other."""
    from cpvs.tables import cpvs_feature_names, feature_columns

    cp = pd.read_parquet(pediatric / "BR00143976_C03_f03_cellprofiler_5cells.parquet")
    cp = cp.rename(columns={"Metadata_ObjectNumber": "Metadata_Object"}) if "Metadata_ObjectNumber" in cp else cp
    cp["Metadata_Object"] = range(len(cp))
    feats = feature_columns(cp)
    renamed = cpvs_feature_names(feats)
    assert renamed["Cells_Intensity_MeanIntensity_CorrDNA"] == "Cells_Intensity_MeanIntensity_DNA"
    assert renamed["Cytoplasm_Correlation_Costes_CorrRNA_CorrAGP"] == "Cytoplasm_Correlation_Costes_RNA_AGP"
    pred = cp[["Metadata_Object"] + feats].rename(columns=renamed)  # what cpvs writes for the same cells
    rng = np.random.default_rng(0)
    pred[list(renamed.values())] = pred[list(renamed.values())] * rng.uniform(0.9, 1.1, (len(pred), len(renamed)))
    cp.to_parquet(tmp_path / "cellprofiler.parquet")
    pred.to_parquet(tmp_path / "cpvs.parquet")
    r = cli("evaluate", tmp_path / "cpvs.parquet", "--cpcor", "--truth", tmp_path / "cellprofiler.parquet",
            "--match-cols", "Metadata_Object", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["cpcor"]["n_features"] >= len(renamed) > 2500
    assert any("CellProfiler image names mapped" in n for n in doc["notes"])
