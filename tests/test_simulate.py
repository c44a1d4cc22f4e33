"""Simulated plates: determinism, resume, ground truth, and phenotypes that downstream steps rely on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from cpvs.errors import CpvsError
from cpvs.plate import discover_plate, read_image
from cpvs.simulate import simulate
from cpvs.simulate.design import MOAS, TOXIC, compounds, hill, platemap
from cpvs.simulate.render import plate_optics, render_field


def _tiffs(root):
    """{path below the plate folder: bytes} of every TIFF under ``root``."""
    return {p.relative_to(root).parts[1:]: p.read_bytes() for p in sorted(root.rglob("*.tiff"))}


def test_same_seed_gives_byte_identical_tiffs_serial_or_parallel(tmp_path):
    a = simulate(tmp_path / "a", plates=1, wells=4, sites=2, size=96, seed=5)
    b = simulate(tmp_path / "b", plates=1, wells=4, sites=2, size=96, seed=5, workers=2)
    c = simulate(tmp_path / "c", plates=1, wells=4, sites=2, size=96, seed=6)
    ta, tb, tc = _tiffs(a.out), _tiffs(b.out), _tiffs(c.out)
    assert len(ta) == 4 * 2 * (8 + 2)  # 8 channels + 2 masks per field
    assert ta == tb
    assert ta.keys() == tc.keys() and ta != tc


def test_rerun_resumes_and_rewrites_only_missing_fields(tmp_path):
    first = simulate(tmp_path, plates=1, wells=4, sites=1, size=96, seed=1)
    before = _tiffs(tmp_path)
    victim = first.plates[0] / "r01c02f01p01-ch5sk1fk1fl1.tiff"
    victim.unlink()
    again = simulate(tmp_path, plates=1, wells=4, sites=1, size=96, seed=1)
    assert again.n_written == 1
    assert _tiffs(tmp_path) == before


def test_plate_folder_is_readable_by_cpvs_with_the_default_map(sim_root):
    plate = discover_plate(sim_root / "SIM3-P01")
    assert plate.channels == ["DNA", "ER", "RNA", "AGP", "Mito", "BF_low", "BF", "BF_high"]
    assert len(plate.fields) == 12
    img = read_image(plate.fields[0].files["DNA"])
    assert img.dtype == np.uint16 and img.shape == (160, 160)
    ld = pd.read_csv(sim_root / "SIM3-P01" / "load_data.csv")
    assert len(ld) == 12 and "FileName_OrigBF_high" in ld.columns
    assert discover_plate(sim_root / "SIM3-P01" / "load_data.csv").channels == plate.channels


def test_platemap_design():
    rng = np.random.default_rng(0)
    pm = platemap(24, 6, rng, batch="B1")
    assert len(pm) == 24 and pm["well"].is_unique
    assert (pm["control_type"] == "negcon").sum() == 3 and (pm["control_type"] == "poscon").sum() == 1
    trt = pm[pm["control_type"] == "trt"]
    assert trt["compound"].nunique() == 12  # every compound of 6 MOAs appears
    # Compounds come in pairs that share a target, one pair per MOA.
    per_target = trt.groupby("target")["compound"].nunique()
    assert (per_target == 2).all() and len(per_target) == 6
    assert hill(0, 1) == 0 and hill(1, 1) == pytest.approx(0.5) and hill(100, 1) > 0.99
    assert len(compounds(8)) == 16


def test_masks_are_consistent_and_brightfield_sees_the_same_cells(sim_root):
    folder = sim_root / "SIM3-P01"
    cells = read_image(folder / "masks" / "A01_s1_cells.tiff").astype(int)
    nuclei = read_image(folder / "masks" / "A01_s1_nuclei.tiff").astype(int)
    assert cells.max() > 0
    inside = nuclei > 0
    assert np.all(cells[inside] == nuclei[inside])  # every nucleus lies in its own cell
    plate = discover_plate(folder)
    f = next(f for f in plate.fields if f.well == "A01" and f.site == 1)
    dna = read_image(f.files["DNA"]).astype(float)
    assert dna[inside].mean() > 3 * dna[cells == 0].mean()
    for plane in ("BF_low", "BF_high"):
        bf = read_image(f.files[plane]).astype(float)
        texture = ndimage.generic_filter(bf, np.std, size=5)
        near_cells = ndimage.binary_dilation(cells > 0, iterations=3)
        assert texture[near_cells].mean() > 1.5 * texture[~near_cells].mean(), plane


def _field(effects, strength, seed):
    rng = np.random.default_rng(seed)
    optics = plate_optics(np.random.default_rng(0), 0)
    return render_field(rng, (384, 384), effects, strength, optics)


def test_moa_phenotypes_are_distinct_and_dose_dependent():
    uncoupler = next(m for m in MOAS if m.short == "MIT")
    ctrl = [_field({}, 0.0, s) for s in range(3)]
    low = [_field(uncoupler.effects, 0.3, s) for s in range(3)]
    high = [_field(uncoupler.effects, 1.0, s) for s in range(3)]

    def mito_per_cell_pixel(fields):
        return np.mean([img["Mito"][cells > 0].mean() - 120 for img, _, cells in fields])

    c, lo, h = mito_per_cell_pixel(ctrl), mito_per_cell_pixel(low), mito_per_cell_pixel(high)
    assert h < lo < c and h < 0.6 * c

    tox = [_field(TOXIC.effects, 1.0, s) for s in range(3)]
    n_ctrl = np.mean([cells.max() for _, _, cells in ctrl])
    n_tox = np.mean([cells.max() for _, _, cells in tox])
    assert n_tox < 0.5 * n_ctrl
    # Nuclear fragmentation: DNA damage splits nuclei into several pieces.
    ddr = next(m for m in MOAS if m.short == "DDR")
    def fragmented_fraction(fields):
        pieces = [ndimage.label(nuclei == lab)[1] for _, nuclei, _ in fields for lab in np.unique(nuclei)[1:]]
        return np.mean(np.array(pieces) >= 2)

    fragmented = fragmented_fraction([_field(ddr.effects, 1.0, s) for s in range(3)])
    assert fragmented > 0.4 and fragmented > 3 * fragmented_fraction(ctrl)


def test_plates_of_different_batches_differ_in_acquisition():
    a = plate_optics(np.random.default_rng(1), 0)
    b = plate_optics(np.random.default_rng(1), 1)
    assert a.gain != b.gain and a.focus_shift != b.focus_shift and a.psf_sigma != b.psf_sigma


def test_bad_arguments_are_explained(tmp_path):
    with pytest.raises(CpvsError, match="--moas"):
        simulate(tmp_path, moas=20)
    with pytest.raises(CpvsError, match="--wells"):
        simulate(tmp_path, wells=2)
