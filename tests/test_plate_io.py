"""Plate I/O: wells, file-name schemes, channel maps, discovery, LoadData and platemaps."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from cpvs.errors import CpvsError
from cpvs.plate import discover_plate, discover_plates, load_channel_map, read_image, read_platemap, write_image, write_load_data
from cpvs.plate.channels import canonical_channel, order_channels
from cpvs.plate.naming import parse_cv8000, parse_phenix, phenix_name
from cpvs.plate.wells import normalize_well, well_name, well_rowcol
from conftest import JUMP_PARTIAL, PEDIATRIC_MAP


def test_well_names():
    assert normalize_well("a1") == "A01"
    assert normalize_well("P24") == "P24"
    assert normalize_well("B007") == "B07"
    assert well_name(3, 3) == "C03"
    assert well_rowcol("AF48") == (32, 48)  # 1536-well plates
    with pytest.raises(CpvsError, match="not a well name"):
        normalize_well("12")


def test_phenix_and_cv8000_names():
    n = parse_phenix("r03c03f03p01-ch1sk1fk1fl1.tiff")
    assert (n.well, n.site, n.plane, n.channel, n.timepoint) == ("C03", 3, 1, 1, 1)
    assert parse_phenix("r03c03f03p01-ch1sk1fk1fl1.tiff.bak") is None
    assert phenix_name("C03", 3, 1) == "r03c03f03p01-ch1sk1fk1fl1.tiff"
    c = parse_cv8000("BR00117006_A01_T0001F004L01A01Z02C05.tif")
    assert (c.plate, c.well, c.site, c.plane, c.channel) == ("BR00117006", "A01", 4, 2, 5)


def test_channel_map_sources(tmp_path):
    jump = load_channel_map("jump")
    assert jump.lookup(5, 1) == "DNA" and jump.lookup(8, 1) == "BF"
    inline = load_channel_map(PEDIATRIC_MAP)
    assert inline.lookup(1, 1) == "BF" and inline.lookup(6, 1) == "RNA"
    js = tmp_path / "map.json"
    js.write_text(json.dumps({"1": "brightfield", "5": "dna"}))
    assert load_channel_map(js).names == ["BF", "DNA"]
    csv = tmp_path / "map.csv"
    csv.write_text("channel,name\n# a comment\n1:1,BF_low\n1:2,BF\n1:3,BF_high\n")
    m = load_channel_map(csv)
    assert m.lookup(1, 2) == "BF" and m.lookup(1, 3) == "BF_high"
    with pytest.raises(CpvsError, match="more than one channel"):
        load_channel_map("1=DNA,2=DNA")
    with pytest.raises(CpvsError, match="not found"):
        load_channel_map(tmp_path / "missing.json")
    with pytest.raises(CpvsError, match="unknown channel map"):
        load_channel_map("nonsense")


def test_channel_names_are_canonical():
    assert canonical_channel("OrigDNA") == "DNA"
    assert canonical_channel("Brightfield") == "BF"
    assert canonical_channel("mito") == "Mito"
    assert order_channels(["BF", "Mito", "DNA", "Other", "BF_low"]) == ["DNA", "Mito", "BF_low", "BF", "Other"]


def test_discover_real_pediatric_field(pediatric):
    plate = discover_plate(pediatric, channel_map=PEDIATRIC_MAP)
    assert plate.layout == "phenix"
    assert plate.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "BF"]
    assert [(f.well, f.site) for f in plate.fields] == [("C03", 3)]
    assert plate.fields[0].files["DNA"].name == "r03c03f03p01-ch5sk1fk1fl1.tiff"


def test_lzw_compressed_real_tiff_reads(pediatric):
    path = pediatric / "r03c03f03p01-ch5sk1fk1fl1.tiff"
    with tifffile.TiffFile(path) as tf:
        assert tf.pages[0].compression == 5  # LZW
    img = read_image(path)
    assert img.shape == (1080, 1080) and img.dtype == np.uint16 and img.max() > 1000


def test_default_map_on_a_plate_with_other_numbering_names_the_problem(pediatric):
    with pytest.raises(CpvsError) as e:
        discover_plate(pediatric)
    msg = e.value.render()
    assert "preset 'jump'" in msg and "found ch1, ch2, ch3, ch4, ch5, ch6" in msg and str(pediatric) in msg


def test_channel_subset_of_partial_jump_field():
    plate = discover_plate(JUMP_PARTIAL, channels=["DNA", "RNA", "AGP"])
    assert plate.channels == ["DNA", "RNA", "AGP"]
    assert plate.fields[0].files["AGP"].name.endswith("ch2sk1fk1fl1.tiff")


def test_planes_must_be_named_when_a_channel_has_several(tmp_path):
    img = np.zeros((32, 32), np.uint16)
    for plane in (1, 2, 3):
        write_image(tmp_path / f"r01c01f01p{plane:02d}-ch1sk1fk1fl1.tiff", img)
    with pytest.raises(CpvsError, match="ch1 .* has planes"):
        discover_plate(tmp_path, channel_map="1=BF")
    plate = discover_plate(tmp_path, channel_map="1:1=BF_low,1:2=BF,1:3=BF_high")
    assert plate.fields[0].files["BF_high"].name.startswith("r01c01f01p03")


def test_cv8000_folder(tmp_path):
    img = np.ones((16, 16), np.uint16)
    for well in ("A01", "B02"):
        for ch in (1, 2):
            write_image(tmp_path / f"PLATE7_{well}_T0001F001L01A01Z01C0{ch}.tif", img * ch)
    plate = discover_plate(tmp_path, channel_map="1=DNA,2=AGP")
    assert plate.layout == "cv8000" and plate.name == "PLATE7"
    assert [f.well for f in plate.fields] == ["A01", "B02"]
    assert read_image(plate.fields[1].files["AGP"]).max() == 2


def test_load_data_roundtrip_and_other_layouts(pediatric, tmp_path):
    plate = discover_plate(pediatric, channel_map=PEDIATRIC_MAP)
    csv = write_load_data(plate, tmp_path / "load_data.csv")
    df = pd.read_csv(csv)
    assert {"FileName_OrigDNA", "PathName_OrigDNA", "Metadata_Plate", "Metadata_Well", "Metadata_Site"} <= set(df.columns)
    again = discover_plate(csv)
    assert again.layout == "loaddata"
    assert again.channels == plate.channels
    assert again.fields[0].files["RNA"].resolve() == plate.fields[0].files["RNA"].resolve()
    # Any file names work through a LoadData CSV, e.g. the JUMP brightfield crops.
    from conftest import JUMP_BF

    ld = tmp_path / "bf.csv"
    pd.DataFrame({
        "Metadata_Plate": ["BR00116991"], "Metadata_Well": ["A01"], "Metadata_Site": [1],
        "FileName_OrigBF_low": ["brightfield_under.tiff"], "PathName_OrigBF_low": [str(JUMP_BF)],
        "FileName_OrigBF": ["brightfield_focus.tiff"], "PathName_OrigBF": [str(JUMP_BF)],
        "FileName_OrigBF_high": ["brightfield_over.tiff"], "PathName_OrigBF_high": [str(JUMP_BF)],
    }).to_csv(ld, index=False)
    bf = discover_plate(ld)
    assert bf.channels == ["BF_low", "BF", "BF_high"] and bf.name == "BR00116991"
    assert read_image(bf.fields[0].files["BF"]).shape == (512, 512)


def test_platemap_join_and_synonyms(sim_plate, tmp_path):
    plate = discover_plate(sim_plate)
    t = plate.table()
    assert {"Metadata_Perturbation", "Metadata_Compound", "Metadata_Concentration", "Metadata_ControlType",
            "Metadata_MOA", "Metadata_Target", "Metadata_Batch"} <= set(t.columns)
    assert len(t) == len(plate.fields)
    assert set(t["Metadata_ControlType"]) >= {"negcon", "poscon", "trt"}
    # A JUMP-style platemap (well_position, broad_sample) also joins.
    pm = tmp_path / "pm.tsv"
    pd.DataFrame({"well_position": [f.well for f in plate.fields], "broad_sample": "BRD-X"}).drop_duplicates().to_csv(pm, sep="\t", index=False)
    t2 = discover_plate(sim_plate, platemap=pm).table()
    assert (t2["Metadata_broad_sample"] == "BRD-X").all()


def test_platemap_missing_wells_names_the_file(sim_plate):
    pm = read_platemap(sim_plate / "platemap.csv")
    pm.iloc[1:].rename(columns=lambda c: c.removeprefix("Metadata_")).to_csv(sim_plate / "platemap.csv", index=False)
    missing = pm["Metadata_Well"].iloc[0]
    with pytest.raises(CpvsError) as e:
        discover_plate(sim_plate)
    assert missing in e.value.render() and "platemap.csv" in e.value.render()
    plate = discover_plate(sim_plate, on_error="skip")
    assert missing not in {f.well for f in plate.fields}
    assert any(missing in s["reason"] for s in plate.skipped)


def test_missing_channel_file_names_the_expected_file(sim_plate):
    victim = sim_plate / "r01c02f02p01-ch4sk1fk1fl1.tiff"
    victim.unlink()
    with pytest.raises(CpvsError) as e:
        discover_plate(sim_plate)
    assert str(victim) in e.value.render() and "ER" in e.value.render()
    plate = discover_plate(sim_plate, on_error="skip")
    assert not any(f.well == "A02" and f.site == 2 for f in plate.fields)


def test_empty_folder_explains_what_is_expected(tmp_path):
    with pytest.raises(CpvsError, match="no microscope images found"):
        discover_plates(tmp_path)
    with pytest.raises(CpvsError, match="not found"):
        discover_plates(tmp_path / "nope")


def test_write_image_is_atomic_and_roundtrips(tmp_path):
    img = (np.arange(64 * 48) % 65535).astype(np.uint16).reshape(64, 48)
    write_image(tmp_path / "a.tiff", img, compression="lzw")
    assert np.array_equal(read_image(tmp_path / "a.tiff"), img)
    assert [p.name for p in tmp_path.iterdir()] == ["a.tiff"]  # no temporary left behind


def test_corrupt_and_truncated_tiffs_name_the_file(tmp_path, pediatric):
    bad = tmp_path / "garbage.tiff"
    bad.write_bytes(b"not a tiff at all" * 4)
    with pytest.raises(CpvsError, match="corrupt or truncated") as e:
        read_image(bad)
    assert str(bad) in e.value.render()
    src = (pediatric / "r03c03f03p01-ch2sk1fk1fl1.tiff").read_bytes()
    cut = tmp_path / "cut.tiff"
    cut.write_bytes(src[: len(src) // 2])
    with pytest.raises(CpvsError, match="corrupt or truncated"):
        read_image(cut)
    shutil.copy(pediatric / "r03c03f03p01-ch2sk1fk1fl1.tiff", tmp_path / "ok.tiff")
    assert read_image(tmp_path / "ok.tiff").shape == (1080, 1080)


def test_written_files_follow_the_umask_not_mkstemp(tmp_path):
    import os

    write_image(tmp_path / "b.tiff", np.zeros((4, 4), np.uint16))
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "b.tiff").stat().st_mode & 0o777 == 0o666 & ~mask
