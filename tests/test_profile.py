"""Profiling: segmentation, cp_measure features with CellProfiler names, the plate pipeline,
normalization and feature selection (pycytominer as the reference)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.errors import CpvsError
from cpvs.plate import read_image
from cpvs.profile.features import cellprofiler_name, check_skip, measure_field
from cpvs.profile.normalize import feature_select, normalize
from cpvs.profile.pipeline import ProfileConfig, profile_plate
from cpvs.profile.segment import Masks, SegmentParams, segment_field, segment_nuclei
from conftest import PEDIATRIC, SHARED

runner = CliRunner()
FAST = ("costes", "granularity", "radial_distribution", "radial_zernikes", "zernike", "texture")


def test_cellprofiler_names():
    assert cellprofiler_name("Nuclei", "Area") == "Nuclei_AreaShape_Area"
    assert cellprofiler_name("Cells", "Intensity_MeanIntensity__DNA") == "Cells_Intensity_MeanIntensity_DNA"
    assert cellprofiler_name("Cells", "Location_CenterMassIntensity_X__ER") == "Cells_Location_CenterMassIntensity_X_ER"
    assert cellprofiler_name("Nuclei", "Contrast_3_00_256__RNA") == "Nuclei_Texture_Contrast_RNA_3_00_256"
    assert cellprofiler_name("Cells", "Granularity_3__AGP") == "Cells_Granularity_3_AGP"
    assert cellprofiler_name("Cells", "RadialDistribution_FracAtD_2of4__Mito") == "Cells_RadialDistribution_FracAtD_Mito_2of4"
    assert cellprofiler_name("Cells", "RadialDistribution_ZernikePhase_3_1__DNA") == "Cells_RadialDistribution_ZernikePhase_DNA_3_1"
    assert cellprofiler_name("Cytoplasm", "Correlation_Pearson__DNA__ER") == "Cytoplasm_Correlation_Correlation_DNA_ER"
    assert cellprofiler_name("Cells", "Correlation_RWC_2__DNA__ER") == "Cells_Correlation_RWC_ER_DNA"
    with pytest.raises(CpvsError, match="unknown module"):
        check_skip(["granularity", "colour"])


def _discs(shape, centers, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    img = np.zeros(shape)
    for cy, cx in centers:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1
    return img


def test_nuclei_segmentation_splits_touching_nuclei_and_filters_sizes():
    img = _discs((200, 200), [(60, 60), (60, 89), (150, 150)], 16) + 0.02  # two touching, one apart
    img[10:13, 180:183] = 1  # a speck below the minimum size
    labels = segment_nuclei(img, SegmentParams(min_nucleus_diameter=12))
    assert labels.max() == 3
    assert len({labels[60, 55], labels[60, 94]}) == 2 and 0 not in (labels[60, 55], labels[60, 94])
    assert labels[11, 181] == 0


def test_segmentation_matches_the_simulated_ground_truth():
    from cpvs.simulate.render import plate_optics, render_field

    imgs, nuclei_true, cells_true = render_field(np.random.default_rng(5), (384, 384), {}, 0.0,
                                                 plate_optics(np.random.default_rng(0), 0))
    images = {k: v.astype(np.float64) / 65535 for k, v in imgs.items()}
    m = segment_field(images, SegmentParams(keep_border=True))
    # Each true nucleus whose centre lies in a found nucleus: matched.
    matched, ious = 0, []
    for lab in np.unique(nuclei_true)[1:]:
        yy, xx = np.nonzero(nuclei_true == lab)
        found = m.nuclei[int(yy.mean()), int(xx.mean())]
        if found:
            matched += 1
            a, b = cells_true == lab, m.cells == found
            ious.append((a & b).sum() / (a | b).sum())
    n_true = len(np.unique(nuclei_true)) - 1
    assert matched >= 0.85 * n_true
    assert np.median(ious) > 0.7


def _pediatric_images():
    names = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}
    return {k: read_image(PEDIATRIC / f"r03c03f03p01-ch{v}sk1fk1fl1.tiff").astype(np.float64) / 65535 for k, v in names.items()}


def test_features_on_real_pediatric_field_agree_with_cellprofiler():
    """The 5 cells of CellProfiler's table of this field, matched by nucleus centroid.

    Measured here (cpvs / CellProfiler): nuclei area 797/951, 1026/1111, 613/578, 1723/1863,
    716/748 px; cell area 4084/4004, 3757/3536, 5213/4914, 15448/11275, 3960/3531 px;
    Cells_Correlation_Correlation_AGP_ER 0.73/0.72, 0.85/0.84, 0.50/0.46, 0.75/0.74, 0.67/0.68.
    """
    images = _pediatric_images()
    m = segment_field(images)
    df = measure_field(images, m, list(images), skip=FAST)
    cp = pd.read_parquet(PEDIATRIC / "BR00143976_C03_f03_cellprofiler_5cells.parquet")
    rel_nuc, rel_cell, corr = [], [], []
    for _, row in cp.iterrows():
        d = np.hypot(df["Nuclei_AreaShape_Center_X"] - row["Nuclei_Location_Center_X"],
                     df["Nuclei_AreaShape_Center_Y"] - row["Nuclei_Location_Center_Y"])
        i = d.idxmin()
        assert d[i] < 6, "every CellProfiler nucleus is found within 6 px"
        rel_nuc.append(abs(df.at[i, "Nuclei_AreaShape_Area"] / row["Nuclei_AreaShape_Area"] - 1))
        rel_cell.append(abs(df.at[i, "Cells_AreaShape_Area"] / row["Cells_AreaShape_Area"] - 1))
        corr.append(abs(df.at[i, "Cells_Correlation_Correlation_AGP_ER"] - row["Cells_Correlation_Correlation_CorrAGP_CorrER"]))
    assert np.median(rel_nuc) < 0.12 and max(rel_nuc) < 0.25
    assert np.median(rel_cell) < 0.12 and max(rel_cell) < 0.45
    assert np.median(corr) < 0.03 and max(corr) < 0.08
    assert m.n >= 25  # about 50 cells, minus those cut by the border


def test_intensity_and_area_features_match_numpy_on_known_masks():
    rng = np.random.default_rng(0)
    img = {"DNA": rng.random((80, 80)), "ER": rng.random((80, 80))}
    nuclei = np.zeros((80, 80), np.int32)
    cells = np.zeros((80, 80), np.int32)
    cells[5:35, 5:35], nuclei[12:25, 12:25] = 1, 1
    cells[40:75, 40:70], nuclei[50:60, 50:60] = 2, 2
    m = Masks(nuclei, cells, np.where(nuclei > 0, 0, cells))
    df = measure_field(img, m, ["DNA", "ER"], skip=FAST)
    assert list(df["ObjectNumber"]) == [1, 2]
    assert list(df["Cells_AreaShape_Area"]) == [900, 1050]
    assert list(df["Cytoplasm_AreaShape_Area"]) == [900 - 169, 1050 - 100]
    for lab in (1, 2):
        assert df.loc[lab - 1, "Nuclei_Intensity_MeanIntensity_ER"] == pytest.approx(img["ER"][nuclei == lab].mean())
        assert df.loc[lab - 1, "Cytoplasm_Intensity_IntegratedIntensity_DNA"] == pytest.approx(img["DNA"][m.cytoplasm == lab].sum())
    assert "Cells_Neighbors_NumberOfNeighbors_Adjacent" in df.columns


@pytest.mark.slow
def test_profile_plate_resume_shards_and_masks_from(sim_root, tmp_path):
    plate = sim_root / "SIM3-P01"
    base = dict(skip=FAST, illum_size=0, segment=SegmentParams(keep_border=True, min_nucleus_diameter=8))
    full = profile_plate(ProfileConfig(plate, tmp_path / "full", **base))
    assert full.complete and full.n_written == 12
    well = pd.read_parquet(full.tables["well"])
    assert len(well) == 6 and {"Metadata_MOA", "Metadata_ControlType", "Metadata_Count_Images", "Image_Count_Cells"} <= set(well.columns)
    image = pd.read_parquet(full.tables["image"])
    assert len(image) == 12 and image["Image_Count_Cells"].sum() == full.n_cells > 0
    for i in (1, 2):
        part = profile_plate(ProfileConfig(plate, tmp_path / "sharded", shard=(i, 2), **base))
    assert part.complete
    pd.testing.assert_frame_equal(pd.read_parquet(part.tables["well"]), well)
    again = profile_plate(ProfileConfig(plate, tmp_path / "full", **base))
    assert again.n_written == 0 and again.n_resumed == 12
    # Measuring inside other masks: the simulator's ground truth, then cpvs's own masks.
    gt = profile_plate(ProfileConfig(plate, tmp_path / "gt", masks_from=plate / "masks", **base))
    assert gt.complete and gt.n_cells > 0
    same = profile_plate(ProfileConfig(plate, tmp_path / "same", masks_from=tmp_path / "full", **base))
    pd.testing.assert_frame_equal(pd.read_parquet(same.tables["well"]), well)
    with pytest.raises(CpvsError, match="no masks for field"):
        profile_plate(ProfileConfig(plate, tmp_path / "none", masks_from=tmp_path / "gt", **base))


def _table(seed=0, n=60, d=8):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.lognormal(size=(n, d)), columns=[f"Cells_Intensity_F{i}_DNA" for i in range(d)])
    df["Metadata_Plate"] = ["P1"] * (n // 2) + ["P2"] * (n - n // 2)
    df["Metadata_ControlType"] = np.where(np.arange(n) % 4 == 0, "negcon", "trt")
    return df, [f"Cells_Intensity_F{i}_DNA" for i in range(d)]


@pytest.mark.parametrize("method", ["standardize", "robustize", "mad_robustize", "spherize"])
@pytest.mark.parametrize("samples", ["all", "Metadata_ControlType == 'negcon'"])
def test_normalization_matches_pycytominer(method, samples):
    from pycytominer import normalize as pcm_normalize

    df, feats = _table()
    ref = None if samples == "all" else (df["Metadata_ControlType"] == "negcon").to_numpy()
    ours, rep = normalize(df, feats, method, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = pcm_normalize(df, features=feats, meta_features=["Metadata_Plate", "Metadata_ControlType"],
                               samples=samples, method=method)
    np.testing.assert_allclose(ours[feats].to_numpy(), theirs[feats].to_numpy(), rtol=1e-6, atol=1e-6)
    assert rep.zero_mad_features == [] and rep.constant_features == []


def test_zero_mad_features_become_nan_instead_of_exploding():
    from pycytominer import normalize as pcm_normalize

    df, feats = _table()
    df["Cells_Children_Cytoplasm_Count"] = 1.0
    df.loc[df.index[1::10], "Cells_Children_Cytoplasm_Count"] = 2.0  # varies, but its MAD is 0
    feats = feats + ["Cells_Children_Cytoplasm_Count"]
    ours, rep = normalize(df, feats, "mad_robustize")
    assert rep.zero_mad_features == ["Cells_Children_Cytoplasm_Count"]
    assert ours["Cells_Children_Cytoplasm_Count"].isna().all()
    theirs = pcm_normalize(df, features=feats, meta_features=["Metadata_Plate", "Metadata_ControlType"], method="mad_robustize")
    assert theirs["Cells_Children_Cytoplasm_Count"].abs().max() > 1e15  # what cpvs avoids
    np.testing.assert_allclose(ours[feats[:-1]].to_numpy(), theirs[feats[:-1]].to_numpy(), rtol=1e-6)


def test_normalization_by_plate_fits_each_plate():
    df, feats = _table()
    df.loc[df["Metadata_Plate"] == "P2", feats] *= 10
    out, _ = normalize(df, feats, "standardize", by="Metadata_Plate")
    for p in ("P1", "P2"):
        sub = out.loc[out["Metadata_Plate"] == p, feats]
        np.testing.assert_allclose(sub.mean(), 0, atol=1e-9)
    with pytest.raises(CpvsError, match="no reference rows"):
        normalize(df, feats, "standardize", reference=(df["Metadata_Plate"] == "P1").to_numpy(), by="Metadata_Plate")


def test_feature_selection_matches_pycytominer_operations():
    from pycytominer import feature_select as pcm_select

    df, feats = _table(d=12)
    df["Cells_Intensity_Copy_DNA"] = df[feats[0]] * 2 + 0.001  # correlated with feature 0
    df["Cells_Intensity_Const_DNA"] = 3.0
    df.loc[:5, feats[3]] = np.nan  # 10 % NaN
    feats = feats + ["Cells_Intensity_Copy_DNA", "Cells_Intensity_Const_DNA"]
    for op in ("drop_na_columns", "variance_threshold", "correlation_threshold"):
        ours = feature_select(df, feats, [op]).kept
        theirs = [f for f in feats if f in pcm_select(df[feats], features=feats, operation=op).columns]
        assert ours == theirs, op
    sel = feature_select(df, feats, ["drop_na_columns", "variance_threshold", "correlation_threshold"])
    assert feats[3] not in sel.kept and "Cells_Intensity_Const_DNA" not in sel.kept
    assert (feats[0] in sel.kept) != ("Cells_Intensity_Copy_DNA" in sel.kept)
    df.loc[df.index[0], feats[5]] = 99.0  # an extreme control value
    out = feature_select(df, feats, ["drop_outliers"], outlier_cutoff=15, controls=(df.index == 0))
    assert out.dropped["drop_outliers"] == [feats[5]]


def test_bbbc021_raw_table_normalized_and_selected_scores_at_least_the_published_table(tmp_path):
    """cpvs profile on the raw per-well means: NSC 94/103 (published table: 94/103),
    NSCB 70/92 (published: 69/92)."""
    import json
    import runpy

    meta = tmp_path / "meta.csv"
    from conftest import REPO

    runpy.run_path(str(REPO / "examples" / "bbbc021" / "make_metadata.py"), run_name="example")["main"](SHARED / "bbbc021", meta)
    r = runner.invoke(app, ["profile", str(SHARED / "bbbc021" / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"), "--join", str(meta),
                            "--normalize", "mad_robustize", "--control-query", "Metadata_Compound == 'DMSO'", "--feature-select",
                            "-o", str(tmp_path / "norm.parquet")])
    assert r.exit_code == 0, r.output
    ev = runner.invoke(app, ["evaluate", str(tmp_path / "norm.parquet"), "--nsc", "--nscb", "--json"])
    ours = json.loads(ev.output)
    pub = json.loads(runner.invoke(app, ["evaluate", str(SHARED / "bbbc021" / "BBBC021_per_well_feature_selected_mad_robustize.csv"),
                                         "--nsc", "--nscb", "--derive", r"Metadata_Batch=Metadata_Plate:^(Week\d+)", "--json"]).output)
    assert ours["nsc"]["n_correct"] >= pub["nsc"]["n_correct"] == 94
    assert ours["nscb"]["n_correct"] >= pub["nscb"]["n_correct"] == 69


def test_profile_cli_errors(tmp_path, pediatric):
    def run(*a):
        return runner.invoke(app, ["profile", *[str(x) for x in a]], env={"COLUMNS": "200"})

    r = run(pediatric, "-o", tmp_path / "o", "--channel-map", "1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA", "--skip", "colour")
    assert r.exit_code == 2 and "unknown module" in r.output
    r = run(pediatric, "-o", tmp_path / "o", "--channel-map", "1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA", "--cell-channel", "BF_low")
    assert r.exit_code == 2 and "BF_low" in r.output
    df, _ = _table()
    df.to_csv(tmp_path / "t.csv", index=False)
    r = run(tmp_path / "t.csv", "-o", tmp_path / "n.parquet", "--normalize", "standardize", "--control-query", "Metadata_Kind == 'x'")
    assert r.exit_code == 2 and "Metadata_ControlType" in r.output
    r = run(tmp_path / "t.csv", "-o", tmp_path / "n.parquet")
    assert r.exit_code == 2 and "nothing to do" in r.output
    r = run(tmp_path / "t.csv", "-o", tmp_path / "n.parquet", "--feature-select", "--select-ops", "drop_nonsense")
    assert r.exit_code == 2 and "drop_nonsense" in r.output
    r = run(tmp_path / "t.csv", "-o", tmp_path / "n.parquet", "--features-from", tmp_path / "missing.parquet")
    assert r.exit_code == 2 and "missing.parquet" in r.output
