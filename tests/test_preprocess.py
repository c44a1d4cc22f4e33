"""Preprocessing: illumination correction, normalization, the store, resume and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from scipy import ndimage

from cpvs.errors import CpvsError
from cpvs.plate import discover_plate, discover_plates, read_image, write_image
from cpvs.preprocess.illumination import illumination_function, large_scale_variation
from cpvs.preprocess.normalize import parse_size, resize_image, zscore
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.preprocess.store import Store
from conftest import PEDIATRIC_MAP


def test_fast_illumination_matches_full_size_median_filter(pediatric):
    # Reference: scipy's median filter at full size (slow), on a 4x-binned real image.
    img = read_image(pediatric / "r03c03f03p01-ch1sk1fk1fl1.tiff").astype(float)
    small = img.reshape(270, 4, 270, 4).mean(axis=(1, 3))
    ref = ndimage.median_filter(small, size=63, mode="reflect")
    ref /= ref.mean()
    fast = illumination_function(small, size=63)
    assert fast.dtype == np.float32 and fast.shape == small.shape
    assert abs(fast.mean() - 1) < 1e-5
    assert np.abs(fast - ref).max() < 0.01


@pytest.mark.parametrize("channel", [1, 2, 3, 4, 5, 6])
def test_illumination_correction_reduces_large_scale_variation_of_real_channels(pediatric, channel):
    img = read_image(pediatric / f"r03c03f03p01-ch{channel}sk1fk1fl1.tiff").astype(float)
    corrected = img / illumination_function(img, 249)
    before, after = large_scale_variation(img), large_scale_variation(corrected)
    assert after < 0.8 * before, (before, after)


def test_zscore_resize_and_size_parsing():
    rng = np.random.default_rng(0)
    img = rng.normal(100, 7, (64, 80)).astype(np.float32)
    z, m, s = zscore(img)
    assert abs(z.mean()) < 1e-5 and abs(z.std() - 1) < 1e-4 and abs(m - 100) < 0.5 and abs(s - 7) < 0.3
    assert resize_image(img, (32, 40)).shape == (32, 40)
    assert resize_image(img, (128, 160), "bicubic").shape == (128, 160)
    assert parse_size("512") == (512, 512) and parse_size("512x640") == (512, 640) and parse_size(None) is None
    with pytest.raises(CpvsError):
        parse_size("big")


def test_store_of_real_field_with_resize(pediatric, tmp_path):
    plate = discover_plate(pediatric, channel_map=PEDIATRIC_MAP)
    res = preprocess_plates([plate], tmp_path / "s.zarr", size=(540, 540), clip_z=15)
    store = Store(res.store)
    assert store.complete and len(store) == 1
    assert store.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "BF"]
    field = store.read_field(0)
    assert field.shape == (6, 540, 540)
    # z-scored per image and channel, clipped at 15
    assert np.allclose(field.mean(axis=(1, 2)), 0, atol=0.02)
    assert np.allclose(field.std(axis=(1, 2)), 1, atol=0.02) or field.max() == 15
    assert field.max() <= 15 and field.min() >= -15
    crop = store.read_crop(0, 100, 200, 128, channels=["BF", "DNA"])
    assert crop.shape == (2, 128, 128)
    assert np.array_equal(crop[1], field[0, 100:228, 200:328])
    with pytest.raises(ValueError):
        store.read_crop(0, 500, 0, 128)
    with pytest.raises(CpvsError, match="not in the store"):
        store.read_crop(0, 0, 0, 64, channels=["BF_low"])
    assert store.illumination(plate.name).shape == (6, 1080, 1080)
    assert (res.store / "cpvs-run.json").exists()
    stats = store.stats()
    assert stats.shape == (1, 6, 2) and np.all(stats[..., 1] > 0)


def test_store_holds_metadata_of_simulated_plates(sim_root, tmp_path):
    plates = [p for d in sorted(sim_root.glob("SIM3-P*")) for p in discover_plates(d)]
    res = preprocess_plates(plates, tmp_path / "s.zarr", workers=2)
    store = Store(res.store)
    assert len(store) == 24
    assert list(store.table["Metadata_Plate"].unique()) == ["SIM3-P01", "SIM3-P02"]
    assert {"Metadata_MOA", "Metadata_Compound", "Metadata_ControlType"} <= set(store.table.columns)
    assert store.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "BF_low", "BF", "BF_high"]
    # One illumination function per plate.
    assert not np.allclose(store.illumination("SIM3-P01"), store.illumination("SIM3-P02"))


def test_interrupted_run_resumes_to_identical_store(sim_plate, tmp_path):
    plate = discover_plate(sim_plate)
    full = preprocess_plates([plate], tmp_path / "full.zarr", workers=1)

    class Killed(Exception):
        pass

    def kill_after_5(stage, done, total):
        if stage == "fields" and done == 5:
            raise Killed

    with pytest.raises(Killed):
        preprocess_plates([plate], tmp_path / "part.zarr", workers=1, progress=kill_after_5)
    part = zarr.open_group(str(tmp_path / "part.zarr"), mode="a")
    done = np.asarray(part["done"][:])
    assert 5 <= done.sum() < len(plate.fields)
    assert not dict(part.attrs).get("complete")
    # A field killed half-way has data on disk but no done marker: it is rewritten.
    half = int(np.flatnonzero(~done)[0])
    part["images"][half, :2] = 7.0
    resumed = preprocess_plates([plate], tmp_path / "part.zarr", workers=1)
    assert resumed.n_resumed == done.sum() and resumed.n_written == len(plate.fields) - done.sum()
    a, b = Store(full.store), Store(resumed.store)
    assert b.complete
    assert np.array_equal(a.images[:], b.images[:])
    assert np.array_equal(a.stats(), b.stats())
    assert np.array_equal(a.illumination(plate.name), b.illumination(plate.name))


def test_rerun_with_other_parameters_is_refused(sim_plate, tmp_path):
    plate = discover_plate(sim_plate)
    preprocess_plates([plate], tmp_path / "s.zarr", workers=1)
    with pytest.raises(CpvsError, match="differs in: clip"):
        preprocess_plates([plate], tmp_path / "s.zarr", clip_z=5)
    res = preprocess_plates([plate], tmp_path / "s.zarr", clip_z=5, overwrite=True)
    assert res.n_written == len(plate.fields)


def test_corrupt_field_stops_or_is_skipped(sim_plate, tmp_path):
    victim = sim_plate / "r01c03f01p01-ch5sk1fk1fl1.tiff"
    victim.write_bytes(victim.read_bytes()[:300])
    plate = discover_plate(sim_plate)
    with pytest.raises(CpvsError, match="corrupt or truncated") as e:
        preprocess_plates([plate], tmp_path / "a.zarr")
    assert str(victim) in e.value.render()
    res = preprocess_plates([plate], tmp_path / "b.zarr", on_error="skip")
    assert res.n_fields == len(plate.fields) - 1
    assert [s["field"] for s in res.skipped] == [f"{plate.name}/A03/1"]
    assert (tmp_path / "b.zarr" / "skipped.csv").exists()
    assert "A03" not in set(Store(res.store).table.query("Metadata_Site == 1")["Metadata_Well"])


def test_field_of_wrong_shape_names_the_file(sim_plate, tmp_path):
    victim = sim_plate / "r01c02f01p01-ch2sk1fk1fl1.tiff"
    write_image(victim, np.zeros((100, 100), np.uint16))
    plate = discover_plate(sim_plate)
    with pytest.raises(CpvsError, match="100x100 but the plate's fields are 160x160") as e:
        preprocess_plates([plate], tmp_path / "a.zarr")
    assert str(victim) in e.value.render()
