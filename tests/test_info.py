"""`cpvs info PATH`: what cpvs sees in a plate, a store, a checkpoint or run folder, and a profile table,
as text and as JSON, checked against the real fields and BBBC021 tables and the simulated fixtures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import zarr
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.errors import CpvsError
from cpvs.info import describe, kind_of
from conftest import PEDIATRIC, PEDIATRIC_MAP, REPO, SHARED

runner = CliRunner()
BBBC021 = SHARED / "bbbc021"
RAW = BBBC021 / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"
SELECTED = BBBC021 / "BBBC021_per_well_feature_selected_mad_robustize.csv"
MITOO_MAP = "1=BF,2=ER,3=AGP,4=Mitoo,5=DNA"


def run(*args):
    return runner.invoke(app, ["info", *map(str, args)], env={"COLUMNS": "200", "NO_COLOR": "1"})


def info_json(*args) -> dict:
    r = run(*args, "--json")
    assert r.exit_code == 0, r.output
    assert r.stderr == "", r.stderr  # warnings travel in the JSON, nothing beside it
    return json.loads(r.stdout)


# ----------------------------------------------------------------------------------------- plates


def test_real_field_channels_come_from_the_file_channels_the_map_names():
    d = info_json(PEDIATRIC, "--channel-map", PEDIATRIC_MAP)
    assert d["kind"] == "plate" and d["layout"] == "phenix" and d["name"] == PEDIATRIC.name
    assert (d["fields"], d["wells"], d["well_list"], d["sites_per_well"]) == (1, 1, ["C03"], {"1": 1})
    assert {c["name"]: c["channel"] for c in d["channels"]} == {"BF": 1, "ER": 2, "AGP": 3, "Mito": 4, "DNA": 5, "RNA": 6}
    assert all(c["plane"] == 1 and c["known"] for c in d["channels"])
    assert d["unmapped_file_channels"] == [] and d["unknown_channel_names"] == [] and d["warnings"] == []
    img = d["image"]
    assert (img["height"], img["width"], img["dtype"], img["field"]) == (1080, 1080, "uint16", "C03 site 3")
    # The range is the real one of the files (Mito reaches the uint16 maximum on 638 pixels).
    import tifffile

    mito = tifffile.imread(PEDIATRIC / "r03c03f03p01-ch4sk1fk1fl1.tiff")
    assert img["range"]["Mito"] == [float(mito.min()), float(mito.max())]
    assert img["saturated_fraction"]["Mito"] == pytest.approx((mito == 65535).mean()) and img["saturated_fraction"]["DNA"] == 0
    assert d["platemap"] == {"file": None, "columns": {}}


def test_a_map_that_leaves_channel_6_out_and_misspells_mito_is_reported():
    d = info_json(PEDIATRIC, "--channel-map", MITOO_MAP)
    assert d["unmapped_file_channels"] == [{"channel": 6, "plane": 1}]
    assert d["unknown_channel_names"] == ["Mitoo"]
    mitoo = next(c for c in d["channels"] if c["name"] == "Mitoo")
    assert mitoo["known"] is False and mitoo["did_you_mean"] == "Mito" and mitoo["channel"] == 4
    # Both problems are warnings of the answer (once each), not only lines of the report.
    assert len(d["warnings"]) == 2
    assert any("ch6" in w for w in d["warnings"]) and any("Mitoo" in w for w in d["warnings"])
    r = run(PEDIATRIC, "--channel-map", MITOO_MAP)
    assert re.search(r"\?\s+<- file channel 6 plane 1: not in the channel map", r.stdout)
    assert re.search(r"Mitoo\s+<- file channel 4 plane 1 .*not a channel name cpvs knows; did you mean Mito\?", r.stdout)
    assert r.stdout.count("warning:") == 2 and "warning:" not in r.stderr


def test_load_data_csv_names_the_column_of_each_channel():
    d = info_json(REPO / "examples" / "pediatric" / "load_data.csv")
    assert d["layout"] == "loaddata" and d["fields"] == 1
    sources = {c["name"]: c["source"] for c in d["channels"]}
    assert sources["BF"] == "LoadData column FileName_OrigBrightfield" and sources["DNA"] == "LoadData column FileName_OrigDNA"
    warned = info_json(REPO / "examples" / "pediatric" / "load_data.csv", "--channel-map", "jump")["warnings"]
    assert any("--channel-map is not used for a LoadData CSV" in w for w in warned)


def test_simulated_plate_sites_and_platemap_columns(sim_plate):
    d = info_json(sim_plate)
    pm = pd.read_csv(sim_plate / "platemap.csv")
    assert d["fields"] == 12 and d["wells"] == 6 and d["sites_per_well"] == {"2": 6}
    assert d["channel_map"] == "preset 'jump'" and len(d["channels"]) == 8
    assert d["platemap"]["file"] == str(sim_plate / "platemap.csv")
    assert d["platemap"]["columns"]["Metadata_Compound"] == pm["compound"].nunique()
    assert d["platemap"]["columns"]["Metadata_MOA"] == pm["moa"].nunique()
    # A site removed from one well shows up in the sites-per-well count.
    for f in sim_plate.glob("r01c01f02p01-*"):
        f.unlink()
    assert info_json(sim_plate)["sites_per_well"] == {"1": 1, "2": 5}


def test_ome_zarr_plate_reports_axis_positions_and_unmapped_ones(sim_plate, tmp_path):
    from cpvs.plate.convert import convert

    convert(sim_plate, tmp_path / "p.zarr", validate=False)
    d = info_json(tmp_path / "p.zarr")
    assert d["layout"] == "ome-zarr" and d["fields"] == 12 and d["unmapped_file_channels"] == []
    assert {c["source"] for c in d["channels"]} == {"OME-Zarr channel axis"}
    assert d["platemap"]["columns"]["Metadata_Compound"] == pd.read_csv(sim_plate / "platemap.csv")["compound"].nunique()
    part = info_json(tmp_path / "p.zarr", "--channel-map", "1=DNA,2=ER,3=RNA")
    assert [(c["name"], c["channel"]) for c in part["channels"]] == [("DNA", 1), ("ER", 2), ("RNA", 3)]
    assert [u["channel"] for u in part["unmapped_file_channels"]] == [4, 5, 6, 7, 8]
    assert sum("OME-Zarr channel" in w and "not in the channel map" in w for w in part["warnings"]) == 5


def test_plate_info_does_not_import_torch():
    """`cpvs info` on a plate stays quick on a login node: no torch."""
    code = (f"import sys; from cpvs.info import describe; describe({str(PEDIATRIC)!r}, channel_map={PEDIATRIC_MAP!r}); "
            f"describe({str(SELECTED)!r}); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------------ store


def test_store_fields_channels_normalization_plates_and_size(sim_store):
    from cpvs.preprocess.store import Store

    store = Store(sim_store)
    d = info_json(sim_store)
    assert d["kind"] == "store" and d["fields"] == {"done": len(store), "total": len(store)} and d["complete"] is True
    assert d["channels"] == store.channels and d["field_size"] == list(store.shape) and d["dtype"] == "float16"
    assert d["normalization"]["illum_size"] == store.attrs["params"]["illum_size"]
    assert d["normalization"]["clip"] == store.attrs["params"]["clip"]
    assert d["plates"] == store.table["Metadata_Plate"].value_counts().to_dict()
    assert sum(d["plates"].values()) == len(store)
    du = sum(p.stat().st_size for p in sim_store.rglob("*") if p.is_file())
    assert d["size_on_disk"] == du
    assert d["metadata_columns"]["Metadata_Compound"] == store.table["Metadata_Compound"].nunique()
    text = run(sim_store).output
    assert f"{len(store)} of {len(store)} done" in text and "size on disk" in text


def test_unfinished_store_says_how_many_fields_are_done(sim_store, tmp_path):
    copy = tmp_path / "s.zarr"
    shutil.copytree(sim_store, copy)
    g = zarr.open_group(str(copy), mode="a")
    g["done"][:3] = False
    g.attrs["complete"] = False
    d = info_json(copy)
    total = d["fields"]["total"]
    assert d["fields"] == {"done": total - 3, "total": total} and d["complete"] is False
    assert any("not finished" in w and "rerun" in w for w in d["warnings"])


# ------------------------------------------------------------------------------------- checkpoint


def test_run_folder_and_checkpoint_file(tiny_unet, sim_store):
    from cpvs.checkpoints import load_checkpoint
    from cpvs.models import build_model, n_parameters

    ck = load_checkpoint(tiny_unet)
    d = info_json(tiny_unet)
    assert d["kind"] == "checkpoint" and d["family"] == "unet" and d["role"] == "staining"
    assert d["file"].endswith("best.pt") and d["checkpoint_files"] == ["best.pt", "last.pt"]
    assert d["inputs"] == ["BF_low", "BF", "BF_high"] and d["outputs"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    assert d["hparams"] == ck["hparams"] and d["training"]["lr"] == ck["config"]["lr"] and "out" not in d["training"]
    assert d["parameters"] == n_parameters(build_model("unet", ck["hparams"])) and d["parameters_counted"] == "trainable parameters"
    metrics = pd.read_parquet(tiny_unet / "metrics.parquet")
    assert d["epochs"]["recorded"] == len(metrics) == 2
    assert d["epochs"]["best_epoch"] == ck["train"]["best_epoch"] and d["epochs"]["select"] == "pcc"
    assert d["epochs"]["metrics"]["pcc"] == pytest.approx(metrics.set_index("epoch").loc[d["epochs"]["best_epoch"], "pcc"])
    assert "pcc_DNA" not in d["epochs"]["metrics"]  # per-channel values stay in metrics.parquet
    assert d["data"]["store"] == str(sim_store) and d["data"]["n_fields"] == d["data"]["train_fields"] + d["data"]["val_fields"]
    assert d["cpvs_version"] == ck["cpvs_version"]
    last = info_json(tiny_unet / "checkpoints" / "last.pt")
    assert last["file"].endswith("last.pt") and last["run_folder"] == str(tiny_unet) and last["epochs"]["epoch"] == 2
    text = run(tiny_unet).output
    assert "unet (staining)" in text and f"{d['parameters']:,} trainable parameters" in text and "BF_low, BF, BF_high" in text


# ------------------------------------------------------------------------------------------ tables


def test_bbbc021_raw_table_features_by_compartment_and_module():
    d = info_json(RAW)
    df = pd.read_csv(RAW)
    assert d["kind"] == "table" and d["rows"] == 632 == len(df) and d["level"] == "wells"
    assert d["metadata"] == {"Image_Metadata_Plate": df["Image_Metadata_Plate"].nunique(), "Image_Metadata_Well": df["Image_Metadata_Well"].nunique()}
    f = d["features"]
    assert f["total"] == 516 and sum(f["by_compartment"].values()) == 516
    assert f["by_compartment"] == {c: sum(col.startswith(f"{c}_") for col in df.columns) for c in ("Nuclei", "Cells", "Cytoplasm")}
    assert f["by_module"]["Nuclei"]["Texture"] == sum(c.startswith("Nuclei_Texture_") for c in df.columns)
    assert f["embedding"]["total"] == 0 and d["nan"]["fraction"] == 0


def test_bbbc021_selected_table_metadata_distinct_counts():
    d = info_json(SELECTED)
    df = pd.read_csv(SELECTED)
    assert d["features"]["total"] == 189
    assert d["metadata"]["Metadata_moa"] == df["Metadata_moa"].nunique() == 13
    assert d["metadata"]["Metadata_Compound"] == df["Metadata_Compound"].nunique()
    assert "Metadata_moa (13 distinct)" in run(SELECTED).output


def test_compartments_are_case_insensitive_and_embeddings_and_nans_are_counted(tmp_path):
    rng = np.random.default_rng(0)
    cols = ["Cells_Intensity_MeanIntensity_DNA", "cells_intensity_StdIntensity_DNA", "CELLS_AreaShape_Area",
            "Nuclei_Texture_Contrast_DNA_3_0", "Emb_DNA_0", "Emb_DNA_1", "Emb_ER_0", "Count"]
    df = pd.DataFrame(rng.normal(size=(10, len(cols))), columns=cols)
    df.loc[:4, "Emb_ER_0"] = np.nan
    df["Nuclei_Texture_Contrast_DNA_3_0"] = np.nan
    df.insert(0, "Metadata_Well", [f"A{i:02d}" for i in range(10)])
    df.insert(0, "Metadata_Compound", ["DMSO", "x"] * 5)
    df.to_parquet(tmp_path / "t.parquet")
    d = info_json(tmp_path / "t.parquet")
    f = d["features"]
    assert f["total"] == 8 and f["by_compartment"] == {"Cells": 3, "Nuclei": 1}
    assert f["by_module"]["Cells"] == {"Intensity": 2, "AreaShape": 1}
    assert f["embedding"] == {"total": 3, "by_channel": {"DNA": 2, "ER": 1}}
    assert f["other"] == {"total": 1, "examples": ["Count"]}
    assert d["metadata"] == {"Metadata_Compound": 2, "Metadata_Well": 10}
    assert d["nan"] == {"fraction": pytest.approx(15 / 80), "features_with_nan": 2, "all_nan_features": 1, "rows_with_nan": 10,
                        "all_nan_rows": 0}
    assert any("NaN in every row" in w for w in d["warnings"])


# ------------------------------------------------------------------------------------------ errors


def test_unknown_paths_get_one_error_with_a_fix(tmp_path):
    r = run(tmp_path / "missing")
    assert r.exit_code == 2 and "nothing at this path" in r.output and "fix:" in r.output and "Traceback" not in r.output
    (tmp_path / "notes.md").write_text("hi")
    r = run(tmp_path / "notes.md")
    assert r.exit_code == 2 and "cpvs does not read .md files" in r.output and "fix:" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run(empty)
    assert r.exit_code == 2 and "recognizes nothing in this folder" in r.output and "fix:" in r.output
    with pytest.raises(CpvsError, match="nothing at this path"):
        kind_of(tmp_path / "missing")


def test_a_folder_of_plates_names_what_is_inside(sim_root, sim_store, tmp_path):
    r = run(sim_root)
    assert r.exit_code == 2 and "SIM3-P01 (plate)" in r.output and "SIM3-P02 (plate)" in r.output
    (tmp_path / "proj").mkdir()
    shutil.copytree(sim_store, tmp_path / "proj" / "a.zarr")
    assert "a.zarr (store)" in run(tmp_path / "proj").output


def test_plate_options_are_refused_for_other_kinds(sim_store):
    r = run(sim_store, "--channel-map", "jump")
    assert r.exit_code == 2 and "--channel-map applies to plates" in r.output
    with pytest.raises(CpvsError, match="--platemap applies to plates"):
        describe(SELECTED, platemap=SELECTED)
