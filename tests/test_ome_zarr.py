"""OME-Zarr HCS plates in and out (issue #15): reading NGFF 0.4/0.5 plates as plates, convert's
round trips on the real fields and a simulated plate, predict-plate --format ome-zarr, NGFF labels
from profile, validation by ome-zarr-models and reading by ome-zarr-py (an independent reader)."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil

import numpy as np
import pandas as pd
import pytest
import zarr
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.errors import CpvsError
from cpvs.plate import discover_plate, read_image
from cpvs.plate.convert import convert
from cpvs.plate.layout import StorePlane
from cpvs.plate.omezarr_write import PlateStoreWriter, field_group, validate_store
from conftest import JUMP_BF, JUMP_PARTIAL, PEDIATRIC, PEDIATRIC_MAP

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", "NO_COLOR": "1"})


def _jump_bf_load_data(folder):
    """The JUMP brightfield planes have no microscope names: a LoadData CSV describes them."""
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"Metadata_Plate": ["BR00116991"], "Metadata_Well": ["A01"], "Metadata_Site": ["1"],
                  **{f"{k}_Orig{ch}": [v] for ch, f in (("BF_low", "under"), ("BF", "focus"), ("BF_high", "over"))
                     for k, v in (("FileName", f"brightfield_{f}.tiff"), ("PathName", str(JUMP_BF)))}}).to_csv(folder / "load_data.csv", index=False)
    return folder / "load_data.csv"


def _pixels(plate):
    return {(f.well, f.site, c): read_image(f.files[c]) for f in plate.fields for c in plate.channels}


def assert_same_plate(a, b):
    """Everything cpvs reads of a plate: name, channels, fields, metadata table, pixels (values and dtype)."""
    assert (a.name, a.channels) == (b.name, b.channels)
    assert [(f.well, f.site) for f in a.fields] == [(f.well, f.site) for f in b.fields]
    pd.testing.assert_frame_equal(a.table(), b.table())
    pa, pb = _pixels(a), _pixels(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert pa[k].dtype == pb[k].dtype and np.array_equal(pa[k], pb[k]), k


@pytest.mark.parametrize("name", ["pediatric", "jump_partial", "jump_brightfield"])
def test_real_fields_round_trip_tiff_omezarr_tiff(name, tmp_path):
    src, cmap, chans = {"pediatric": (PEDIATRIC, PEDIATRIC_MAP, None), "jump_partial": (JUMP_PARTIAL, None, ["DNA", "RNA", "AGP"]),
                        "jump_brightfield": (None, None, None)}[name]
    if src is None:
        src = _jump_bf_load_data(tmp_path / "bf")
    original = discover_plate(src, channel_map=cmap, channels=chans)
    (res,) = convert(src, tmp_path / "plate.zarr", channel_map=cmap, channels=chans)
    assert res.validated == "0.5" and res.n_written == len(original.fields)
    store = discover_plate(tmp_path / "plate.zarr")  # no channel map: the store names its channels
    assert store.layout == "ome-zarr" and isinstance(store.fields[0].files[store.channels[0]], StorePlane)
    assert_same_plate(original, store)
    (back,) = convert(tmp_path / "plate.zarr", tmp_path / "back", fmt="tiff")
    assert back.n_written == len(original.fields)
    assert_same_plate(original, discover_plate(tmp_path / "back"))
    if name != "jump_brightfield":  # a Phenix plate comes back under its own file names
        assert sorted(p.name for p in (tmp_path / "back").glob("*.tiff")) == sorted(p.name for p in src.glob("*.tiff"))
    if name == "pediatric":  # the store lists channels in the plate's numbering: the same map names them by position
        assert_same_plate(original, discover_plate(tmp_path / "plate.zarr", channel_map=PEDIATRIC_MAP))


def test_simulated_plate_round_trip_keeps_platemap_and_resumes(sim_root, tmp_path):
    src = sim_root / "SIM3-P01"
    original = discover_plate(src)
    assert "Metadata_MOA" in original.table().columns
    r = cli("convert", src, "-o", tmp_path / "p.zarr", "--workers", 2)
    assert r.exit_code == 0, r.output
    assert "12 written" in r.output and "valid OME-Zarr 0.5" in r.output
    assert_same_plate(original, discover_plate(tmp_path / "p.zarr"))
    r = cli("convert", tmp_path / "p.zarr", "-o", tmp_path / "back", "--format", "tiff")
    assert r.exit_code == 0, r.output
    assert_same_plate(original, discover_plate(tmp_path / "back"))
    assert (tmp_path / "back" / "platemap.csv").read_text() == (src / "platemap.csv").read_text()
    # A field killed half-way (arrays there, metadata not) is no field; a rerun writes only it.
    group = tmp_path / "p.zarr" / field_group("A02", 2)
    (group / "zarr.json").unlink()
    with pytest.raises(CpvsError, match="A/2/1: field image group is missing"):
        discover_plate(tmp_path / "p.zarr")
    assert len(discover_plate(tmp_path / "p.zarr", on_error="skip").fields) == 11
    (res,) = convert(src, tmp_path / "p.zarr")
    assert (res.n_written, res.n_resumed) == (1, 11)
    assert_same_plate(original, discover_plate(tmp_path / "p.zarr"))
    # NGFF 0.4 (Zarr v2) on request, for older viewers
    (res,) = convert(src, tmp_path / "p04.zarr", version="0.4")
    assert res.validated == "0.4" and (tmp_path / "p04.zarr" / ".zattrs").exists()
    assert_same_plate(original, discover_plate(tmp_path / "p04.zarr"))


def test_written_store_follows_the_spec_and_opens_in_ome_zarr_py(sim_root, tmp_path):
    """Checked against the NGFF 0.5 fields with plain zarr + JSON, then read by ome-zarr-py's reader."""
    src = sim_root / "SIM3-P01"
    original = discover_plate(src)
    convert(src, tmp_path / "p.zarr")
    root = json.loads((tmp_path / "p.zarr" / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    plate = root["attributes"]["ome"]["plate"]
    assert root["attributes"]["ome"]["version"] == "0.5" and plate["name"] == "SIM3-P01"
    assert len(plate["wells"]) == 6 and plate["field_count"] == 2
    for w in plate["wells"]:
        row, col = w["path"].split("/")
        assert plate["rows"][w["rowIndex"]]["name"] == row and plate["columns"][w["columnIndex"]]["name"] == col
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    well = g["A/1"].attrs["ome"]["well"]
    assert [im["path"] for im in well["images"]] == ["0", "1"]
    image = g["A/1/0"].attrs["ome"]
    ms = image["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][0]["type"] == "channel"
    order = ["Mito", "AGP", "RNA", "ER", "DNA", "BF_high", "BF_low", "BF"]  # the plate's (JUMP) channel numbering
    assert [c["label"] for c in image["omero"]["channels"]] == order
    assert root["attributes"]["cpvs"]["source"]["channel_map"] == {str(i + 1): c for i, c in enumerate(order)}
    shapes = [g[f"A/1/0/{d['path']}"].shape for d in ms["datasets"]]
    assert shapes[0] == (8, 160, 160) and shapes[1] == (8, 80, 80)
    assert [d["coordinateTransformations"][0]["scale"][-1] for d in ms["datasets"]] == [2.0**k for k in range(len(shapes))]
    full = g["A/1/0/0"][:]
    np.testing.assert_array_equal(full, np.stack([read_image(original.fields[0].files[c]) for c in order]))
    np.testing.assert_allclose(g["A/1/0/1"][:], full.reshape(8, 80, 2, 80, 2).mean(axis=(2, 4)), atol=0.5)

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader, Well

    reader = Reader(parse_url(str(tmp_path / "p.zarr")))
    nodes = list(reader())
    assert type(nodes[0].specs[0]).__name__ == "Plate"
    plate_montage = nodes[0].data[0]  # the plate as ome-zarr-py tiles it: 2 rows x 3 columns of wells, 2 fields each
    assert plate_montage.shape[0] == 8 and plate_montage.shape[1] % 160 == 0
    wells = [n for n in Reader(parse_url(str(tmp_path / "p.zarr" / "A" / "1")))() if any(isinstance(s, Well) for s in n.specs)]
    assert wells, "ome-zarr-py reads the well"
    image = list(Reader(parse_url(str(tmp_path / "p.zarr" / "A" / "1" / "1")))())[0]
    assert image.metadata["channel_names"] == order and len(image.metadata["contrast_limits"]) == 8
    np.testing.assert_array_equal(np.asarray(image.data[0]), np.stack([read_image(original.fields[1].files[c]) for c in order]))
    assert [np.asarray(d).shape[-1] for d in image.data] == [s[-1] for s in shapes]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # ome-zarr-py's own default argument
@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_reads_plates_written_by_ome_zarr_py_with_z_planes(version, tmp_path):
    """A plate from another writer: one brightfield channel with three z-planes; the channel map names the planes."""
    from ome_zarr.format import FormatV04, FormatV05
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    fmt = FormatV04() if version == "0.4" else FormatV05()
    files = ["brightfield_under.tiff", "brightfield_focus.tiff", "brightfield_over.tiff"]
    planes = np.stack([read_image(JUMP_BF / f) for f in files])[None]  # (c=1, z=3, y, x)
    root = zarr.open_group(str(tmp_path / "other.zarr"), mode="w", zarr_format=fmt.zarr_format)
    write_plate_metadata(root, ["A"], ["1"], ["A/1"], name="BR00116991", fmt=fmt)
    well = root.require_group("A").require_group("1")
    write_well_metadata(well, [{"path": "0"}], fmt=fmt)
    write_image(planes, well.require_group("0"), axes="czyx", fmt=fmt,
                omero={"channels": [{"label": "Brightfield", "color": "FFFFFF", "window": {"min": 0, "max": 65535, "start": 0, "end": 9000}}]})
    bf_map = "1:1=BF_low,1:2=BF,1:3=BF_high"
    plate = discover_plate(tmp_path / "other.zarr", channel_map=bf_map)
    assert plate.name == "BR00116991" and plate.channels == ["BF_low", "BF", "BF_high"]
    assert [(f.well, f.site) for f in plate.fields] == [("A01", 1)]
    for c, f in zip(plate.channels, files):
        np.testing.assert_array_equal(read_image(plate.fields[0].files[c]), read_image(JUMP_BF / f))
    with pytest.raises(CpvsError, match="3 z-planes; a channel map must name"):
        discover_plate(tmp_path / "other.zarr")
    with pytest.raises(CpvsError, match="must say which"):
        discover_plate(tmp_path / "other.zarr", channel_map="1=BF")
    low = discover_plate(tmp_path / "other.zarr", channel_map=bf_map, level=1)
    assert read_image(low.fields[0].files["BF"]).shape == (256, 256)
    # ...and preprocess reads it like any plate
    r = cli("preprocess", tmp_path / "other.zarr", "--channel-map", bf_map, "-o", tmp_path / "pre.zarr")
    assert r.exit_code == 0, r.output


def test_bad_stores_name_the_path_inside_the_store(sim_root, sim_store, tmp_path):
    from cpvs.embed.run import is_store

    convert(sim_root / "SIM3-P01", tmp_path / "p.zarr")
    assert is_store(sim_store) and not is_store(tmp_path / "p.zarr")  # embed: a training store, or a plate
    # not an HCS plate: a cpvs training store, and a field's image group
    r = cli("preprocess", sim_store, "-o", tmp_path / "x.zarr")
    assert r.exit_code == 2 and "not an OME-Zarr HCS plate" in r.output and "preprocessing store" in r.output
    r = cli("profile", tmp_path / "p.zarr" / "A" / "1" / "0", "-o", tmp_path / "prof")
    assert r.exit_code == 2 and "A/1/0" in r.output and "(an OME-Zarr image)" in r.output
    # a field of the wrong shape
    bad = tmp_path / "bad.zarr"
    shutil.copytree(tmp_path / "p.zarr", bad)
    w = PlateStoreWriter(bad, "SIM3-P01", [], [f"c{i}" for i in range(8)])
    w.write_field("A02", 2, np.zeros((8, 100, 160), np.uint16))
    r = cli("preprocess", bad, "-o", tmp_path / "y.zarr")
    assert r.exit_code == 2 and f"{bad}/A/2/1/0: image is 100x160 but the plate's fields are 160x160" in r.output, r.output
    assert "--on-error skip" in r.output
    # a missing well
    shutil.rmtree(bad / "A" / "2")
    r = cli("preprocess", bad, "-o", tmp_path / "z.zarr")
    assert r.exit_code == 2 and f"{bad}/A/2: well A02 is listed in the plate metadata but its group is missing" in r.output
    skipped = discover_plate(bad, on_error="skip")
    assert len(skipped.fields) == 10 and skipped.skipped[0]["field"] == "SIM3-P01/A02"
    # labels that do not name channels, and a damaged array
    g = tmp_path / "p.zarr" / "A" / "1" / "0"
    meta = json.loads((g / "zarr.json").read_text())
    meta["attributes"]["ome"]["omero"]["channels"][0]["label"] = "Alexa 488"
    (g / "zarr.json").write_text(json.dumps(meta))
    r = cli("profile", tmp_path / "p.zarr", "-o", tmp_path / "prof")
    assert r.exit_code == 2 and "A/1/0" in r.output and "--channel-map" in r.output
    with pytest.raises(CpvsError, match="ome-zarr writes NGFF labels into the plate's own OME-Zarr store"):
        from cpvs.profile.pipeline import ProfileConfig, profile_plate

        profile_plate(ProfileConfig(sim_root / "SIM3-P01", tmp_path / "prof", masks_format="ome-zarr"))


def _write_fields(args):
    path, fields = args
    w = PlateStoreWriter(path, "P", ALL_FIELDS, ["DNA", "AGP"])
    w.create()
    for well, site in fields:
        w.write_field(well, site, np.full((2, 96, 96), site + 10 * int(well[1:]), np.uint16))


ALL_FIELDS = [(f"{r}{c:02d}", s) for r in "ABC" for c in (1, 2, 3) for s in (1, 2)]


def test_a_field_killed_while_writing_is_not_part_of_the_plate(tmp_path, monkeypatch):
    import cpvs.plate.omezarr_write as ow

    w = PlateStoreWriter(tmp_path / "p.zarr", "P", [("A01", 1), ("A01", 2)], ["DNA"])
    w.create()
    w.write_field("A01", 1, np.ones((1, 64, 64), np.uint16))
    real = ow.write_array

    def dies_at_level_1(path, data, version, dims):
        if path.name == "1":
            raise KeyboardInterrupt  # the job is killed after the full-resolution array
        real(path, data, version, dims)

    monkeypatch.setattr(ow, "write_array", dies_at_level_1)
    for site in (2, 1):  # a new field, and a finished one being rewritten
        with pytest.raises(KeyboardInterrupt):
            w.write_field("A01", site, np.full((1, 64, 64), 7, np.uint16))
        assert (tmp_path / "p.zarr" / "A" / "1" / str(site - 1) / "0").is_dir() and not w.is_complete("A01", site)
    with pytest.raises(CpvsError, match="no readable field"):
        discover_plate(tmp_path / "p.zarr", on_error="skip")


def test_concurrent_shards_write_disjoint_fields_of_one_store(tmp_path):
    path = tmp_path / "shared.zarr"
    with mp.get_context("spawn").Pool(3) as pool:
        pool.map(_write_fields, [(path, ALL_FIELDS[i::3]) for i in range(3)])
    assert validate_store(path) == "0.5"
    plate = discover_plate(path)
    assert len(plate.fields) == len(ALL_FIELDS)
    for f in plate.fields:
        assert read_image(f.files["AGP"])[0, 0] == f.site + 10 * int(f.well[1:])


def test_field_writer_puts_uncertainty_maps_in_extra_channels(sim_root, tmp_path):
    """What a diffusion run with --samples K hands the writer: the same images as TIFFs and in the store."""
    from cpvs.predict.plan import FieldWriter, plan_outputs

    plate = discover_plate(sim_root / "SIM3-P01", channels=["BF"])
    outputs = ["DNA", "AGP"]
    channels = outputs + [f"{c}_std" for c in outputs]
    norm = {"channel_stats": {"DNA": {"mean": 300.0, "std": 50.0}, "AGP": {"mean": 200.0, "std": 20.0}}, "resize_method": "bilinear"}
    rng = np.random.default_rng(0)
    pred, spread = rng.normal(size=(2, 80, 80)).astype(np.float32), rng.random((2, 80, 80)).astype(np.float32)
    for fmt in ("tiff", "ome-zarr"):
        plan = plan_outputs(plate, tmp_path / fmt, channels, (1, 6), fmt)
        assert len(plan.todo) == 2
        for f in plan.todo:
            FieldWriter(plan, outputs, norm, "uint16").write(f, (160, 160), pred, spread)
    with pytest.raises(CpvsError, match="not written, or not finished"):  # 10 fields are not written yet
        discover_plate(tmp_path / "ome-zarr" / "SIM3-P01.zarr")
    a, b = discover_plate(tmp_path / "tiff"), discover_plate(tmp_path / "ome-zarr" / "SIM3-P01.zarr", on_error="skip")
    assert len(b.skipped) == 10
    assert b.channels == ["DNA", "AGP", "DNA_std", "AGP_std"] == a.channels
    assert [(f.well, f.site) for f in a.fields] == [(f.well, f.site) for f in b.fields] and len(b.fields) == 2
    for fa, fb in zip(a.fields, b.fields):
        for c in channels:
            np.testing.assert_array_equal(read_image(fa.files[c]), read_image(fb.files[c]))
    assert read_image(b.fields[0].files["AGP_std"]).max() > 0
    assert len(plan_outputs(plate, tmp_path / "ome-zarr", channels, (1, 6), "ome-zarr").done) == 2  # resumed


@pytest.mark.slow
def test_predict_plate_on_omezarr_equals_the_tiff_run(sim_root, tiny_unet, tmp_path):
    from cpvs.evaluate.images import evaluate_images
    from cpvs.predict.runner import PredictConfig, predict_plate

    src = sim_root / "SIM3-P02"
    convert(src, tmp_path / "in.zarr")
    base = dict(tile=64, stride=32, batch_size=6, device="cpu")
    tiff = predict_plate(PredictConfig(src, tmp_path / "tiff", tiny_unet, **base))
    z = predict_plate(PredictConfig(tmp_path / "in.zarr", tmp_path / "zarr", tiny_unet, format="ome-zarr", **base))
    assert tiff.n_written == z.n_written == 12
    store = tmp_path / "zarr" / "SIM3-P02.zarr"
    assert validate_store(store) == "0.5"
    ref = discover_plate(tmp_path / "tiff")
    assert_same_plate(ref, discover_plate(store))
    assert_same_plate(ref, discover_plate(tmp_path / "zarr"))  # the output folder reads as the plate too
    # OME-Zarr in, TIFF out: the same files
    predict_plate(PredictConfig(tmp_path / "in.zarr", tmp_path / "tiff2", tiny_unet, **base))
    assert_same_plate(ref, discover_plate(tmp_path / "tiff2"))
    files = sorted(p.name for p in (tmp_path / "tiff").iterdir() if p.suffix == ".tiff")
    assert len(files) == 60 and files == sorted(p.name for p in (tmp_path / "tiff2").iterdir() if p.suffix == ".tiff")
    assert all((tmp_path / "tiff" / n).read_bytes() == (tmp_path / "tiff2" / n).read_bytes() for n in files)
    # resume and shards (run one after the other here; test_concurrent_shards… runs them at once)
    again = predict_plate(PredictConfig(tmp_path / "in.zarr", tmp_path / "zarr", tiny_unet, format="ome-zarr", **base))
    assert (again.n_written, again.n_resumed) == (0, 12)
    for i in (1, 2, 3):  # through the CLI
        r = cli("--device", "cpu", "predict-plate", src, "--checkpoint", tiny_unet, "-o", tmp_path / "sharded", "--format", "ome-zarr",
                "--shard", f"{i}/3", "--tile", 64, "--stride", 32, "--batch-size", 6)
        assert r.exit_code == 0 and "4 written" in r.output, r.output
    assert_same_plate(ref, discover_plate(tmp_path / "sharded" / "SIM3-P02.zarr"))
    # evaluate reads both outputs alike
    a, b = evaluate_images(tmp_path / "tiff", src, workers=1), evaluate_images(store, tmp_path / "in.zarr", workers=1)
    pd.testing.assert_frame_equal(a.summary, b.summary)


@pytest.mark.slow
def test_profile_writes_ngff_labels_and_measures_inside_them(sim_root, tmp_path):
    from cpvs.profile.pipeline import ProfileConfig, profile_plate
    from cpvs.profile.segment import SegmentParams

    convert(sim_root / "SIM3-P01", tmp_path / "p.zarr")
    base = dict(skip=("costes", "granularity", "radial_distribution", "radial_zernikes", "zernike", "texture"), illum_size=0,
                segment=SegmentParams(keep_border=True, min_nucleus_diameter=8), workers=2)
    tiff = profile_plate(ProfileConfig(sim_root / "SIM3-P01", tmp_path / "tiff", **base))
    z = profile_plate(ProfileConfig(tmp_path / "p.zarr", tmp_path / "zarr", masks_format="ome-zarr", **base))
    pd.testing.assert_frame_equal(pd.read_parquet(z.tables["well"]), pd.read_parquet(tiff.tables["well"]))
    assert not (tmp_path / "zarr" / "masks").exists()
    assert validate_store(tmp_path / "p.zarr") == "0.5"  # labels included
    labels = zarr.open_group(str(tmp_path / "p.zarr" / "A" / "1" / "0" / "labels"), mode="r")
    assert labels.attrs["ome"]["labels"] == ["cells", "nuclei"]
    nuclei = labels["nuclei/0"][:]
    np.testing.assert_array_equal(nuclei, read_image(tmp_path / "tiff" / "masks" / "SIM3-P01" / "A01_s1_nuclei.tiff"))
    again = profile_plate(ProfileConfig(tmp_path / "p.zarr", tmp_path / "again", masks_from=tmp_path / "p.zarr", **base))
    pd.testing.assert_frame_equal(pd.read_parquet(again.tables["well"]), pd.read_parquet(tiff.tables["well"]))
