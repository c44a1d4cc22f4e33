"""cpvs' mAP engine against copairs 0.5 (the reference): AP per query, normalized AP, mAP,
p-values and FDR, on tables with and without tied similarities, multi-label included."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from cpvs.evaluate.average_precision import (
    ROW, _average_precision_of_ranks, benjamini_hochberg, expected_average_precision, mean_average_precision,
    null_average_precision,
)
from cpvs.evaluate.engine import scan
from cpvs.evaluate.map_retrieval import (
    REF, annotation_map, annotation_task, replicate_average_precision_table, replicate_map,
)
from cpvs.evaluate.retrieval import profile_matrix

FEATS = [f"f{i}" for i in range(6)]


def _features(rng, n, ties):
    """Continuous features, or small integers: many exactly equal cosines (and equal float32 keys)."""
    return rng.integers(-1, 2, size=(n, len(FEATS))).astype(float) if ties else rng.normal(size=(n, len(FEATS)))


def _wells(seed, ties, n_ctrl=30):
    rng = np.random.default_rng(seed)
    perts = [f"c{i}" for i in range(14) for _ in range(rng.integers(1, 6))]  # 1-5 replicates; singletons get no AP
    wells = pd.DataFrame(_features(rng, n_ctrl + len(perts), ties), columns=FEATS)
    wells["Metadata_Compound"] = ["DMSO"] * n_ctrl + perts
    control = np.arange(len(wells)) < n_ctrl
    for c in sorted(set(perts)):  # replicates share a signature (with ties: some are exact copies)
        rows = (wells["Metadata_Compound"] == c).to_numpy()
        if not ties:
            wells.loc[rows, FEATS] += rng.normal(size=len(FEATS)) * rng.uniform(0, 2)
        elif rng.random() < 0.5:
            wells.loc[rows, FEATS] = wells.loc[rows, FEATS].iloc[0].to_numpy()
    wells.loc[1, "Metadata_Compound"] = "c3"  # a control named like a treatment: neither positive nor negative
    wells["control"] = control
    wells = wells.sample(frac=1, random_state=seed)  # controls anywhere in the table
    wells = wells[(wells[FEATS] != 0).any(axis=1)].reset_index(drop=True)  # copairs divides by the norm
    return wells, wells.pop("control").to_numpy()


def _copairs_replicate_ap(wells, neg):
    from copairs.map import average_precision

    meta = wells[["Metadata_Compound"]].astype(str)
    meta[REF] = np.where(neg, np.arange(len(wells)), -1)
    ap = average_precision(meta, wells[FEATS].to_numpy(), ["Metadata_Compound", REF], [], [], ["Metadata_Compound", REF],
                           progress_bar=False)
    return ap[ap[REF] == -1].dropna(subset=["average_precision"])


def _assert_same_ap(ours: pd.DataFrame, ref: pd.DataFrame):
    assert len(ours) == len(ref) and len(ours) > 0
    for col in ("n_pos_pairs", "n_total_pairs"):
        np.testing.assert_array_equal(ours[col].to_numpy(np.int64), ref[col].to_numpy(np.int64))
    for col in ("average_precision", "normalized_average_precision"):
        np.testing.assert_allclose(ours[col].to_numpy(float), ref[col].to_numpy(float), rtol=0, atol=1e-9)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_replicate_ap_per_query_equals_copairs(seed, ties):
    wells, neg = _wells(seed, ties)
    ref = _copairs_replicate_ap(wells, neg)
    from cpvs.evaluate.average_precision import replicate_average_precision
    from cpvs.evaluate.retrieval import codes

    for block in (None, 3):
        if block is None:
            ours = replicate_average_precision_table(wells, FEATS, "Metadata_Compound", neg)
        else:
            ours = replicate_average_precision(profile_matrix(wells, FEATS), codes(wells["Metadata_Compound"]), neg, block=block)
        _assert_same_ap(ours.set_index(ROW).sort_index(), ref.sort_index())
    if ties:  # the table really has ties between positives and negatives
        x = profile_matrix(wells, FEATS)
        keys = np.float32(1) - (x @ x.T).astype(np.float32)
        assert (pd.Series(keys.ravel()).value_counts() > 1).sum() > 5


def _annotated(seed, ties, n=70):
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(8)]
    rows = []
    for c in range(n // 2):
        moa = f"m{rng.integers(0, 5)}"
        tg = "|".join(rng.choice(genes, size=rng.integers(1, 4), replace=False))
        for dose in (1, 2):
            rows.append({"Metadata_Compound": f"c{c}", "Metadata_MOA": moa, "Metadata_Target": tg})
    df = pd.DataFrame(rows)
    df[FEATS] = _features(rng, len(df), ties)
    df = df[(df[FEATS] != 0).any(axis=1)].reset_index(drop=True)
    df.loc[2, "Metadata_MOA"] = None  # unlabelled rows take no part
    df.loc[5, "Metadata_Target"] = ""
    return df


def _copairs_annotation_ap(df, label_col, multilabel):
    from copairs.map import average_precision
    from copairs.map import multilabel as ml

    keep = df[label_col].notna() & (df[label_col].astype(str).str.len() > 0)
    d = df[keep]
    meta = pd.DataFrame({label_col: d[label_col].astype(str), "Metadata_Compound": d["Metadata_Compound"].astype(str),
                         ROW: np.flatnonzero(keep)}).reset_index(drop=True)
    feats = d[FEATS].to_numpy()
    if multilabel:
        meta[label_col] = meta[label_col].map(lambda v: [t for t in v.split("|") if t])
        return ml.average_precision(meta, feats, [label_col], ["Metadata_Compound"], [], [label_col], multilabel_col=label_col,
                                    progress_bar=False)
    return average_precision(meta, feats, [label_col], ["Metadata_Compound"], [], [label_col], progress_bar=False)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("label_col,multilabel", [("Metadata_MOA", False), ("Metadata_Target", True)])
def test_annotation_ap_per_query_equals_copairs(label_col, multilabel, ties):
    df = _annotated(3, ties)
    ref = _copairs_annotation_ap(df, label_col, multilabel).dropna(subset=["average_precision"])
    ref = ref.sort_values([ROW, label_col]).reset_index(drop=True)
    for block in (4, 1000):
        task = annotation_task(df, label_col, "Metadata_Compound", multilabel=multilabel)
        scan(profile_matrix(df, FEATS), [task], "cpu", block=block)
        ours = task.frame(label_col, {"Metadata_Compound": df["Metadata_Compound"].to_numpy()})
        ours = ours.sort_values([ROW, label_col]).reset_index(drop=True)
        np.testing.assert_array_equal(ours[ROW], ref[ROW])
        np.testing.assert_array_equal(ours[label_col].astype(str), ref[label_col].astype(str))
        _assert_same_ap(ours, ref)


def _p_values_agree(ours, ref, null_size):
    """Two-sample z-test for equal proportions per group (each p-value is a Monte-Carlo
    proportion of ``null_size`` null mAPs above the observed one, from independent streams),
    two-sided, Bonferroni-corrected over the groups at a family-wise α = 0.001. The +1/null_size
    term covers the (k+1)/(n+1) smoothing when both proportions are ~0."""
    p1, p2 = ours["p_value"].to_numpy(), ref["p_value"].to_numpy(float)
    pbar = (p1 + p2) / 2
    z = stats.norm.ppf(1 - 0.001 / (2 * len(p1)))
    bound = z * np.sqrt(2 * pbar * (1 - pbar) / null_size) + 1 / null_size
    assert (np.abs(p1 - p2) <= bound).all(), np.c_[p1, p2, bound][np.abs(p1 - p2) > bound]


@pytest.mark.parametrize("ties", [False, True])
def test_replicate_map_equals_copairs(ties):
    from copairs.map import mean_average_precision as copairs_map

    wells, neg = _wells(5, ties, n_ctrl=60)
    null_size = 4000
    ours = replicate_map(wells, FEATS, "Metadata_Compound", neg, null_size=null_size, seed=3)
    ref = copairs_map(_copairs_replicate_ap(wells, neg), ["Metadata_Compound"], null_size=null_size, threshold=0.05, seed=3,
                      progress_bar=False)
    assert list(ours.columns) == list(ref.columns)
    np.testing.assert_array_equal(ours["Metadata_Compound"], ref["Metadata_Compound"])
    for col in ("mean_average_precision", "mean_normalized_average_precision"):
        np.testing.assert_allclose(ours[col], ref[col], rtol=0, atol=1e-9)
    _p_values_agree(ours, ref, null_size)
    assert 0 < ours["p_value"].min() < 0.01 and ours["p_value"].max() > 0.1  # both significant and not


@pytest.mark.parametrize("label_col,multilabel", [("Metadata_MOA", False), ("Metadata_Target", True)])
def test_annotation_map_equals_copairs(label_col, multilabel):
    df = _annotated(4, ties=False, n=120)
    null_size = 4000
    ours = annotation_map(df, FEATS, label_col, "Metadata_Compound", multilabel=multilabel, null_size=null_size, seed=2)
    ref = annotation_map(df, FEATS, label_col, "Metadata_Compound", multilabel=multilabel, null_size=null_size, seed=2,
                         engine="copairs")
    np.testing.assert_array_equal(ours[label_col].astype(str), ref[label_col].astype(str))
    np.testing.assert_allclose(ours["mean_average_precision"], ref["mean_average_precision"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(ours["mean_normalized_average_precision"], ref["mean_normalized_average_precision"], rtol=0, atol=1e-9)
    _p_values_agree(ours, ref, null_size)


def test_fdr_equals_statsmodels_given_equal_p_values():
    from copairs.map.hierarchical_fdr import apply_fdr_correction

    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(size=50) ** 6, [1 / 10001] * 20, [0.5] * 10])
    ref = apply_fdr_correction(pd.DataFrame({"p_value": p}))["corrected_p_value"].to_numpy()
    np.testing.assert_array_equal(benjamini_hochberg(p), ref)
    # and inside the mAP table: the same p-values give the same corrected ones
    ap = pd.DataFrame({"g": list("aabbccdd"), "average_precision": [1, 0.9, 0.2, 0.3, 0.5, 0.5, 1, 1],
                       "normalized_average_precision": 0.0, "n_pos_pairs": 1, "n_total_pairs": 9})
    out = mean_average_precision(ap, ["g"], null_size=500, threshold=0.05, seed=0)
    np.testing.assert_array_equal(out["corrected_p_value"],
                                  apply_fdr_correction(out[["p_value"]])["corrected_p_value"])


@pytest.mark.parametrize("m,total", [(1, 3), (2, 5), (3, 8), (4, 5), (6, 9)])
def test_null_distribution_is_that_of_a_random_ranking(m, total):
    """Chi-square goodness of fit of the sampled null APs to the exact distribution, every
    placement of m positives among ``total`` ranks equally likely (both branches: m <= total/2
    draws positives, m > total/2 draws negatives)."""
    null = null_average_precision(m, total, 20000, seed=7)
    ranks = np.array(list(itertools.combinations(range(total), m)))
    atoms, exact = np.unique(_average_precision_of_ranks(ranks.astype(np.uint16)), return_counts=True)
    observed = np.array([(null == a).sum() for a in atoms])
    assert observed.sum() == len(null)
    assert stats.chisquare(observed, exact / exact.sum() * len(null)).pvalue > 1e-4


@pytest.mark.parametrize("m,total", [(3, 1003), (60, 2000), (1500, 2000)])
def test_null_mean_is_the_expected_ap(m, total):
    null = null_average_precision(m, total, 4000, seed=1)
    mu = expected_average_precision(np.array([m]), np.array([total - m]))[0]
    assert abs(null.mean() - mu) < 5 * null.std() / math.sqrt(len(null))
    assert null.dtype == np.float32 and (null_average_precision(m, total, 4000, seed=1) == null).all()


def test_normalized_ap_equals_copairs():
    from copairs.map.normalization import normalize_ap

    rng = np.random.default_rng(0)
    m = np.concatenate([rng.integers(0, 50, 300), [1, 1, 0, 5]])
    n = np.concatenate([rng.integers(0, 500, 300), [0, 3, 4, 0]])
    ap = rng.uniform(size=len(m))
    from cpvs.evaluate.average_precision import normalized_average_precision

    np.testing.assert_array_equal(normalized_average_precision(ap, m, n), normalize_ap(ap, m, n))


def test_ranking_keys_round_like_copairs_on_every_path():
    """copairs: float32 cosines, then ``1 - sim`` in float32. The CPU path casts in numpy, the
    GPU path in torch: both must give those keys bit for bit (checked here on CPU tensors)."""
    import torch

    from cpvs.evaluate.engine import ranking_keys

    rng = np.random.default_rng(0)
    sim = np.concatenate([rng.uniform(-1, 1, 5000), 1 - rng.uniform(0, 1e-6, 500), rng.uniform(-1e-7, 1e-7, 500)])
    expected = np.float32(1) - sim.astype(np.float32)
    np.testing.assert_array_equal(ranking_keys(torch.from_numpy(sim)), expected)
    np.testing.assert_array_equal((1 - torch.from_numpy(sim).to(torch.float32)).numpy(), expected)  # the GPU formula
