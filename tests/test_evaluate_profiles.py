"""Profile evaluations against slow, obviously-correct references, copairs, and the real BBBC021 table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.evaluate.cpcor import feature_correlation, parse_feature
from cpvs.evaluate.retrieval import nearest_neighbor_matching, target_matching
from cpvs.evaluate.suite import EvalConfig, evaluate_profiles
from cpvs.evaluate.toxicity import active_subset, knn_toxicity, sensitivity_specificity
from conftest import SHARED

BBBC021 = SHARED / "bbbc021" / "BBBC021_per_well_feature_selected_mad_robustize.csv"
runner = CliRunner()


def _cos(a, b):
    num = math.fsum(x * y for x, y in zip(a, b))
    return num / (math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b)))


def _random_treatments(seed=0, n=60, d=12):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, d)), columns=[f"f{i}" for i in range(d)])
    df["Metadata_Compound"] = [f"c{i // 3}" for i in range(n)]  # 3 doses per compound
    df["Metadata_MOA"] = [f"m{(i // 3) % 5}" for i in range(n)]
    df["Metadata_Batch"] = [f"b{(i // 6) % 3}" for i in range(n)]
    return df, [f"f{i}" for i in range(d)]


@pytest.mark.parametrize("across", [False, True])
def test_nsc_and_nscb_match_brute_force(across):
    df, feats = _random_treatments()
    df.loc[df["Metadata_MOA"] == "m4", "Metadata_Batch"] = "b0"  # one MOA in a single batch
    res = nearest_neighbor_matching(df, feats, "Metadata_MOA", "Metadata_Compound", "Metadata_Batch", across)
    rows = df[~(across & (df["Metadata_MOA"] == "m4"))].reset_index(drop=True)
    x = rows[feats].to_numpy().tolist()
    correct = []
    for i in range(len(rows)):
        best, best_j = -2.0, None
        for j in range(len(rows)):
            if j == i or rows.at[j, "Metadata_Compound"] == rows.at[i, "Metadata_Compound"]:
                continue
            if across and rows.at[j, "Metadata_Batch"] == rows.at[i, "Metadata_Batch"]:
                continue
            s = _cos(x[i], x[j])
            if s > best:
                best, best_j = s, j
        if best_j is not None:
            correct.append(rows.at[best_j, "Metadata_MOA"] == rows.at[i, "Metadata_MOA"])
    assert res.n_queries == len(correct)
    assert res.score == pytest.approx(np.mean(correct))
    assert res.excluded_classes == (["m4"] if across else [])
    assert res.per_class["n"].sum() == res.n_queries


def test_target_matching_matches_brute_force():
    rng = np.random.default_rng(3)
    n, d = 30, 8
    df = pd.DataFrame(rng.normal(size=(n, d)), columns=[f"f{i}" for i in range(d)])
    genes = [f"G{i}" for i in range(12)]
    df["Metadata_Target"] = ["|".join(rng.choice(genes, size=rng.integers(1, 3), replace=False)) for _ in range(n)]
    df.loc[4, "Metadata_Target"] = None  # no target: not a query
    df["Metadata_Compound"] = [f"c{i}" for i in range(n)]
    feats = [f"f{i}" for i in range(d)]
    res = target_matching(df, feats, "Metadata_Target", "Metadata_Compound", k=5)
    rows = df.drop(index=4).reset_index(drop=True)
    x = rows[feats].to_numpy().tolist()
    tg = [set(t.split("|")) for t in rows["Metadata_Target"]]
    top1 = top5 = 0
    dists = []
    for i in range(len(rows)):
        sims = sorted(((_cos(x[i], x[j]), j) for j in range(len(rows)) if j != i), key=lambda t: -t[0])
        top1 += bool(tg[i] & tg[sims[0][1]])
        top5 += any(tg[i] & tg[j] for _, j in sims[:5])
        dists += [1 - _cos(x[i], x[j]) for j in range(i + 1, len(rows)) if tg[i] & tg[j]]
    assert (res.n_queries, res.top1, res.topk) == (len(rows), top1, top5)
    assert res.mtdist == pytest.approx(np.mean(dists))
    assert res.chance_top1 == pytest.approx(1 / (len(rows) - 1))


def test_knn_toxicity_matches_a_brute_force_vote():
    rng = np.random.default_rng(1)
    n_pos, n_neg = 6, 15
    wells = pd.DataFrame(rng.normal(size=(n_pos + n_neg + 20, 5)), columns=list("abcde"))
    wells.iloc[:n_pos] += 3
    wells["Metadata_Compound"] = ["tox"] * n_pos + ["dmso"] * n_neg + [f"c{i // 2}" for i in range(20)]
    wells.iloc[n_pos + n_neg : n_pos + n_neg + 4, :5] += 3  # two compounds look toxic
    pos = (wells["Metadata_Compound"] == "tox").to_numpy()
    neg = (wells["Metadata_Compound"] == "dmso").to_numpy()
    res = knn_toxicity(wells, list("abcde"), pos, neg, ["Metadata_Compound"], k=5, rounds=25, seed=4)
    # Reference: the same procedure written out with plain loops.
    x = wells[list("abcde")].to_numpy()
    x = (x - x.mean(0)) / x.std(0)
    comps = sorted(wells.loc[~(pos | neg), "Metadata_Compound"].unique())
    q = np.array([np.median(x[(wells["Metadata_Compound"] == c).to_numpy()], axis=0) for c in comps])
    r = np.random.default_rng(4)
    votes = np.zeros(len(comps))
    for _ in range(25):
        ip, ineg = r.integers(0, n_pos, n_neg), r.integers(0, n_neg, n_neg)
        train = np.concatenate([x[pos][ip], x[neg][ineg]])
        labels = [1] * n_neg + [0] * n_neg
        for qi, qv in enumerate(q):
            d = [math.dist(qv, t) for t in train]
            nearest = sorted(range(len(d)), key=lambda i: d[i])[:5]
            votes[qi] += sum(labels[i] for i in nearest) > 2
    assert list(res.calls["Metadata_Compound"]) == comps
    assert list(res.calls["toxic"]) == list(votes > 12.5)
    assert res.calls.set_index("Metadata_Compound").loc[["c0", "c1"], "toxic"].all()
    stats = sensitivity_specificity(res.calls, res.calls.assign(toxic=[True] * len(comps)), ["Metadata_Compound"])
    assert stats["sensitivity"] == pytest.approx(res.calls["toxic"].mean())


def test_active_subset_flags_perturbations_far_from_controls():
    rng = np.random.default_rng(0)
    ctrl = rng.normal(size=(20, 6))
    near = rng.normal(size=(10, 6))
    far = rng.normal(size=(10, 6)) + np.array([8, -8, 8, 0, 0, 0])
    wells = pd.DataFrame(np.vstack([ctrl, near, far]), columns=list("abcdef"))
    wells["Metadata_Compound"] = ["DMSO"] * 20 + [f"n{i // 2}" for i in range(10)] + [f"f{i // 2}" for i in range(10)]
    out = active_subset(wells, list("abcdef"), (wells["Metadata_Compound"] == "DMSO").to_numpy(), ["Metadata_Compound"])
    assert set(out.loc[out["active"], "Metadata_Compound"]) >= {f"f{i}" for i in range(5)}
    assert not out.set_index("Metadata_Compound").loc[[f"n{i}" for i in range(5)], "active"].all()


def test_replicate_map_equals_copairs_called_directly():
    from copairs.map import average_precision, mean_average_precision

    from cpvs.evaluate.map_retrieval import REF, replicate_map

    rng = np.random.default_rng(2)
    n = 40
    wells = pd.DataFrame(rng.normal(size=(n, 6)), columns=list("abcdef"))
    wells["Metadata_Compound"] = ["DMSO"] * 10 + [f"c{i // 3}" for i in range(30)]
    for c in range(10):  # replicates share a signature
        wells.loc[wells["Metadata_Compound"] == f"c{c}", list("abcdef")] += rng.normal(size=6) * 2
    neg = (wells["Metadata_Compound"] == "DMSO").to_numpy()
    ours = replicate_map(wells, list("abcdef"), "Metadata_Compound", neg, null_size=500, seed=1)
    meta = wells[["Metadata_Compound"]].copy()
    meta[REF] = np.where(neg, np.arange(n), -1)
    ap = average_precision(meta, wells[list("abcdef")].to_numpy(), ["Metadata_Compound", REF], [], [],
                           ["Metadata_Compound", REF], progress_bar=False)
    ap = ap[ap[REF] == -1].dropna(subset=["average_precision"])
    ref = mean_average_precision(ap, ["Metadata_Compound"], null_size=500, threshold=0.05, seed=1, progress_bar=False)
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), ref.reset_index(drop=True))


def test_feature_names_are_parsed_case_insensitively():
    assert parse_feature("Cells_Intensity_MeanIntensity_OrigDNA") == {"compartment": "Cells", "module": "intensity", "channels": ["DNA"]}
    assert parse_feature("Nuclei_Texture_Contrast_rescaleintensitymito_3_00_256")["channels"] == ["Mito"]
    assert parse_feature("Cytoplasm_Correlation_Correlation_DNA_ER")["channels"] == ["DNA", "ER"]
    assert parse_feature("Cells_AreaShape_Area") == {"compartment": "Cells", "module": "area/shape", "channels": []}
    assert parse_feature("Nuclei_Granularity_3_CorrAGP")["module"] == "granularity"


def test_cpcor_matches_scipy_per_feature():
    from scipy import stats

    rng = np.random.default_rng(0)
    truth = pd.DataFrame(rng.normal(size=(40, 4)), columns=["Cells_Intensity_MeanIntensity_DNA", "Nuclei_AreaShape_Area",
                                                            "Cells_Texture_Contrast_ER_3_00", "Cytoplasm_Correlation_K_DNA_ER"])
    truth["Metadata_Well"] = [f"A{i:02d}" for i in range(40)]
    pred = truth.copy()
    pred.iloc[:, :4] = truth.iloc[:, :4] * 0.9 + rng.normal(size=(40, 4)) * [0.1, 1, 3, 0.5]
    pred = pred.sample(frac=1, random_state=0)  # order must not matter
    res = feature_correlation(pred, truth, ["Metadata_Well"])
    m = pred.merge(truth, on="Metadata_Well")
    for f in truth.columns[:4]:
        r = res.per_feature.set_index("feature").at[f, "r"]
        assert r == pytest.approx(stats.spearmanr(m[f + "_x"], m[f + "_y"]).statistic)
    assert res.summary["n_features"] == 4 and res.by_channel["DNA"] == pytest.approx(
        res.per_feature[res.per_feature["channel"].str.contains("DNA")]["r"].mean())
    assert res.summary["n_above_0.8"] == int((res.per_feature["r"] > 0.8).sum())


def test_bbbc021_nsc_and_nscb_on_the_real_table():
    cfg = EvalConfig(BBBC021, nsc=True, nscb=True, derive=[r"Metadata_Batch=Metadata_Plate:^(Week\d+)"])
    res = evaluate_profiles(cfg)
    nsc, nscb = res.results["nsc"], res.results["nscb"]
    assert nsc.n_queries == 103 and nscb.n_queries == 92  # 103 treatments; 2 single-batch MOAs left out
    assert nsc.score == pytest.approx(94 / 103) and nscb.score == pytest.approx(69 / 92)
    assert set(nscb.excluded_classes) == {"Cholesterol-lowering", "Kinase inhibitors"}


def _cli(*args):
    return runner.invoke(app, ["evaluate", *[str(a) for a in args]], env={"COLUMNS": "200"})


def test_bad_columns_and_empty_groups_are_clear_errors(tmp_path):
    r = _cli(BBBC021, "--nsc", "--moa-col", "Metadata_Mechanism")
    assert r.exit_code == 2 and "no column 'Metadata_Mechanism'" in r.output and "Metadata_moa" in r.output
    r = _cli(BBBC021, "--nscb")
    assert r.exit_code == 2 and "--batch-col" in r.output and "Metadata_Plate" in r.output
    r = _cli(BBBC021, "--nsc", "--derive", "Metadata_Batch=Metadata_Plate:^(Month\\d+)")
    assert r.exit_code == 2 and "does not match" in r.output
    r = _cli(BBBC021, "--toxicity", "--positive-query", "Metadata_Compound == 'nothing'")
    assert r.exit_code == 2 and "positive and negative control wells (found 0" in r.output
    r = _cli(BBBC021, "--active", "--negative-query", "Metadata_Colour == 'red'")
    assert r.exit_code == 2 and "--negative-query" in r.output and "Metadata_Plate" in r.output
    r = _cli(BBBC021, "--nsc", "--negative-query", "Metadata_Compound == Metadata_Compound")
    assert r.exit_code == 2 and "no treatment rows left" in r.output
    r = _cli(tmp_path / "missing.csv", "--nsc")
    assert r.exit_code == 2 and "missing.csv" in r.output
    r = _cli(BBBC021, "--cpcor")
    assert r.exit_code == 2 and "--truth" in r.output
    r = _cli(BBBC021)
    assert r.exit_code == 2 and "nothing to evaluate" in r.output
    assert "Traceback" not in r.output


def test_cli_json_output_and_files(tmp_path):
    r = _cli(BBBC021, "--nsc", "--json", "-o", tmp_path / "ev")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.output)
    assert data["nsc"]["score"] == pytest.approx(94 / 103)
    assert (tmp_path / "ev" / "nsc_neighbors.parquet").exists() and (tmp_path / "ev" / "results.json").exists()
