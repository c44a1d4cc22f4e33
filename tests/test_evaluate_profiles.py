"""Profile evaluations against slow, obviously-correct references, copairs, and the real BBBC021 table.

The block engine (cpvs.evaluate.engine) must give what the brute-force n × n implementation it
replaced gives (tests/retrieval_reference.py): the same neighbours, scores and tables.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cpvs.cli import app
from cpvs.evaluate.cpcor import feature_correlation, parse_feature
from cpvs.evaluate.engine import scan, topk_first
from cpvs.evaluate.retrieval import NearestNeighborTask, TargetTask, nearest_neighbor_matching, profile_matrix, target_matching
from cpvs.evaluate.suite import EvalConfig, evaluate_profiles, results_json
from cpvs.evaluate.toxicity import active_subset, knn_toxicity, sensitivity_specificity
from conftest import SHARED
import retrieval_reference as reference

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
    # Chance: a random other perturbation shares a target with the query, averaged over queries.
    chance = np.mean([np.mean([bool(tg[i] & tg[j]) for j in range(len(rows)) if j != i]) for i in range(len(rows))])
    assert res.chance_top1 == pytest.approx(chance)
    assert res.chance_top1 != pytest.approx(1 / (len(rows) - 1))


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
    ours = replicate_map(wells, list("abcdef"), "Metadata_Compound", neg, null_size=500, seed=1, engine="copairs")
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


# --- the block engine against the brute-force reference ----------------------------------

def _engine_match(df, feats, across, block, batch_col="Metadata_Batch", label_col="Metadata_MOA", id_cols=None):
    task = NearestNeighborTask(df, label_col, "Metadata_Compound", batch_col if across else None, across, id_cols)
    scan(profile_matrix(task.df, feats), [task], "cpu", block=block)
    return task.result()


def _assert_same_match(a, b):
    assert (a.name, a.n_queries, a.n_correct, a.n_without_candidates) == (b.name, b.n_queries, b.n_correct, b.n_without_candidates)
    assert a.score == b.score or (math.isnan(a.score) and math.isnan(b.score))
    assert (a.excluded_classes, a.single_compound_classes) == (b.excluded_classes, b.single_compound_classes)
    pd.testing.assert_frame_equal(a.neighbors, b.neighbors, check_exact=False, rtol=1e-12, atol=1e-12)
    pd.testing.assert_frame_equal(a.per_class, b.per_class)
    pd.testing.assert_frame_equal(a.confusion, b.confusion)


def _with_exact_ties(df, feats, seed):
    """Half the rows become basis vectors e_k (k of 3): their cosines with anything are one
    coordinate, so rows sharing k tie exactly, and the lower row index must win."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(df), size=len(df) // 2, replace=False)
    df = df.copy()
    df.loc[rows, feats] = 0.0
    for r in rows:
        df.loc[r, feats[rng.integers(0, 3)]] = rng.uniform(0.5, 2)
    return df


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("across", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_nsc_nscb_engine_equals_the_brute_force_implementation(seed, across, ties):
    df, feats = _random_treatments(seed, n=90)
    df.loc[df["Metadata_MOA"] == "m4", "Metadata_Batch"] = "b0"  # a single-batch MOA for NSCB
    df.loc[df["Metadata_Compound"] == "c0", "Metadata_MOA"] = "solo"  # a single-compound MOA: not queried
    if ties:
        df = _with_exact_ties(df, feats, seed)
    ids = ["Metadata_Compound"]
    ref = reference.nearest_neighbor_matching(df, feats, "Metadata_MOA", "Metadata_Compound", "Metadata_Batch", across, ids)
    for block in (1, 7, 1000):
        _assert_same_match(_engine_match(df, feats, across, block, id_cols=ids), ref)


@pytest.mark.parametrize("mask_classes", [64, 1])
@pytest.mark.parametrize("shifted", [4, 1])
def test_nscb_masked_second_look_equals_the_brute_force_implementation(monkeypatch, mask_classes, shifted):
    """A strong batch effect puts every top candidate in the query's own batch, so NSCB needs
    its masked second look: by one-hot product (few batches; for the whole block when most
    rows need it) or by per-batch fills (many batches)."""
    import cpvs.evaluate.retrieval as retrieval

    monkeypatch.setattr(retrieval, "MASK_CLASSES", mask_classes)
    df, feats = _random_treatments(4, n=240)
    df["Metadata_Batch"] = [f"b{i % 4}" for i in range(len(df))]
    df["Metadata_MOA"] = [f"m{(i // 12) % 5}" for i in range(len(df))]
    rng = np.random.default_rng(4)
    offsets = np.stack([rng.normal(size=len(feats)) * 5 * (b < shifted) for b in range(4)])
    df[feats] += offsets[np.arange(len(df)) % 4]
    ref = reference.nearest_neighbor_matching(df, feats, "Metadata_MOA", "Metadata_Compound", "Metadata_Batch", True)
    looks = []
    monkeypatch.setattr(retrieval, "topk_first", lambda m, k: (looks.append(len(m)), topk_first(m, k))[1])
    _assert_same_match(_engine_match(df, feats, True, 50), ref)
    assert sum(looks) >= len(df) / 4  # rows of the shifted batches took the masked look


def test_nsc_nscb_engine_equals_the_brute_force_implementation_on_bbbc021():
    res = evaluate_profiles(EvalConfig(BBBC021, nsc=True, derive=[r"Metadata_Batch=Metadata_Plate:^(Week\d+)"]))
    trt = res.treatments
    feats = [f for f in res.features if f in trt.columns]
    for across in (False, True):
        ref = reference.nearest_neighbor_matching(trt, feats, "Metadata_moa", "Metadata_Compound", "Metadata_Batch", across, res.grouping)
        for block in (5, 64):
            ours = _engine_match(trt, feats, across, block, label_col="Metadata_moa", id_cols=res.grouping)
            _assert_same_match(ours, ref)
        assert (ref.n_correct, ref.n_queries) == ((69, 92) if across else (94, 103))


def _targets_table(seed=0, n=120, d=10, ties=False):
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(15)]
    sig = {g: rng.normal(size=d) for g in genes}
    rows = []
    for c in range(n // 2):  # two doses per compound, 1-3 targets each
        tg = list(rng.choice(genes, size=rng.integers(1, 4), replace=False))
        for dose in (1, 2):
            rows.append({"Metadata_Compound": f"c{c}", "Metadata_Target": "|".join(tg),
                         **dict(zip([f"f{i}" for i in range(d)], sum(sig[g] for g in tg) * dose / 3 + rng.normal(size=d)))})
    df = pd.DataFrame(rows)
    df.loc[[3, 50], "Metadata_Target"] = [None, ""]  # no target: not a query, not a candidate
    feats = [f"f{i}" for i in range(d)]
    return (_with_exact_ties(df, feats, seed) if ties else df), feats


def _assert_same_targets(a, b):
    assert (a.n_queries, a.top1, a.topk, a.k) == (b.n_queries, b.top1, b.topk, b.k)
    assert a.mtdist == pytest.approx(b.mtdist, rel=1e-12) and a.mean_distance_other == pytest.approx(b.mean_distance_other, rel=1e-12)
    assert a.chance_top1 == pytest.approx(b.chance_top1, rel=1e-12)
    pd.testing.assert_frame_equal(a.neighbors, b.neighbors, check_exact=False, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 5])
def test_target_engine_equals_the_brute_force_implementation(ties, k):
    df, feats = _targets_table(seed=k, ties=ties)
    ref = reference.target_matching(df, feats, "Metadata_Target", "Metadata_Compound", k=k, id_cols=["Metadata_Compound"])
    for block in (1, 13, 1000):
        task = TargetTask(df, "Metadata_Target", "Metadata_Compound", k=k, id_cols=["Metadata_Compound"])
        x = np.zeros((len(df), len(feats)))
        x[task.has] = profile_matrix(df[task.has], feats)
        scan(x, [task], "cpu", block=block)
        _assert_same_targets(task.result(), ref)
    _assert_same_targets(target_matching(df, feats, "Metadata_Target", "Metadata_Compound", k=k, id_cols=["Metadata_Compound"]), ref)


def test_target_engine_on_the_real_jump_target_annotations():
    """The 306 JUMP-Target-2 compounds with their real target lists (random profiles, two
    per compound): equal to the reference, and the chance is not 1/(n-1)."""
    meta = pd.read_csv(SHARED / "jump" / "JUMP-Target-2_compound_metadata.tsv", sep="\t")
    meta = meta[meta["target_list"].notna()]
    rng = np.random.default_rng(0)
    df = pd.concat([meta.assign(dose=1), meta.assign(dose=2)], ignore_index=True)
    feats = [f"f{i}" for i in range(16)]
    df[feats] = rng.normal(size=(len(df), len(feats)))
    ref = reference.target_matching(df, feats, "target_list", "broad_sample", k=5, id_cols=["broad_sample"])
    ours = target_matching(df, feats, "target_list", "broad_sample", k=5, id_cols=["broad_sample"])
    _assert_same_targets(ours, ref)
    assert ours.n_queries == len(df) and ours.chance_top1 > 2 / (len(df) - 1)


def test_topk_first_breaks_ties_like_a_stable_argsort():
    import torch

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(50, 30)).astype(float)
    x[rng.random(x.shape) < 0.3] = -np.inf
    x[0] = -np.inf  # a row without candidates
    for k in (1, 3, 30, 40):
        vals, cols = topk_first(torch.from_numpy(x), k)
        ref = np.argsort(-x, axis=1, kind="stable")[:, :min(k, 30)]
        np.testing.assert_array_equal(vals.numpy(), np.take_along_axis(x, ref, 1))
        finite = np.isfinite(vals.numpy())
        np.testing.assert_array_equal(cols.numpy()[finite], ref[finite])


# --- the suite: progress, JSON shape, aggregation ------------------------------------------

def test_progress_is_reported_and_the_json_keeps_its_shape():
    calls = []
    cfg = EvalConfig(BBBC021, nsc=True, nscb=True, map=True, null_size=200, derive=[r"Metadata_Batch=Metadata_Plate:^(Week\d+)"])
    res = evaluate_profiles(cfg, progress=lambda stage, done, total, info="": calls.append((stage, done, total)))
    stages = {s for s, _, _ in calls}
    assert {"treatment retrieval", "replicate retrieval", "mAP null distributions"} <= stages
    for s in stages:
        last = [c for c in calls if c[0] == s][-1]
        assert last[1] == last[2]
    out = results_json(res)
    assert set(out) == {"n_rows", "n_features", "notes", "treatment_grouping", "n_treatments", "nsc", "nscb", "map"}
    assert set(out["nsc"]) == {"score", "n_queries", "n_correct", "excluded_moas", "single_compound_moas", "per_moa", "confusion"}
    assert set(out["map"]) == {"replicates", "moa"} and set(out["map"]["moa"]) == {"mean_mAP", "fraction_significant", "n"}


def test_chunked_aggregation_equals_tables_aggregate():
    from cpvs.evaluate.suite import _aggregate
    from cpvs.tables import aggregate, feature_columns, read_table

    df = read_table(BBBC021)
    feats = feature_columns(df)
    rows = (df["Metadata_Compound"] != "DMSO").to_numpy()
    by = ["Metadata_Compound", "Metadata_Concentration"]
    for method in ("median", "mean"):
        pd.testing.assert_frame_equal(_aggregate(df, rows, by, feats, method, ["Metadata_moa"]),
                                      aggregate(df[rows], by, feats, method, ["Metadata_moa"]))


def test_unknown_map_engine_is_a_clear_error():
    from cpvs.errors import CpvsError

    with pytest.raises(CpvsError, match="map-engine"):
        evaluate_profiles(EvalConfig(BBBC021, map=True, map_engine="fast"))


# --- bugs: each test failed before its fix ---------------------------------------------------

def _image_table(rng, n=30):
    """A CellProfiler-style per-image export: only Metadata_Image to match on, upper-case compartments."""
    feats = ["NUCLEI_AreaShape_Area", "NUCLEI_Intensity_MeanIntensity_DNA", "CELLS_AreaShape_Area",
             "CELLS_Texture_Contrast_ER_3_00", "CYTOPLASM_Intensity_MeanIntensity_Mito", "ImageNumber"]
    df = pd.DataFrame(rng.normal(size=(n, len(feats))), columns=feats)
    df["ImageNumber"] = np.arange(1, n + 1)
    df.insert(0, "Metadata_Image", [f"img{i:03d}" for i in range(n)])
    return df


def test_cpcor_on_a_plain_image_table_needs_no_compound_columns(tmp_path):
    rng = np.random.default_rng(0)
    truth = _image_table(rng)
    pred = truth.copy()
    pred.iloc[:, 1:6] = truth.iloc[:, 1:6].to_numpy() + rng.normal(size=(30, 5)) * 0.5
    truth.to_csv(tmp_path / "truth.csv", index=False)
    pred.sample(frac=1, random_state=1).to_csv(tmp_path / "pred.csv", index=False)
    r = _cli(tmp_path / "pred.csv", "--cpcor", "--truth", tmp_path / "truth.csv", "--match-cols", "Metadata_Image", "--json")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.output)["cpcor"]
    assert {"Nuclei", "Cells", "Cytoplasm"} <= set(data["by_compartment"])
    assert data["by_compartment"]["Nuclei"] == pytest.approx(np.mean([
        __import__("scipy").stats.spearmanr(pred.sort_values("Metadata_Image")[f], truth[f]).statistic
        for f in ("NUCLEI_AreaShape_Area", "NUCLEI_Intensity_MeanIntensity_DNA")]))
    assert parse_feature("NUCLEI_AREASHAPE_AREA")["compartment"] == "Nuclei"
    assert parse_feature("CYTOPLASM_INTENSITY_MeanIntensity_Mito") == {"compartment": "Cytoplasm", "module": "intensity", "channels": ["Mito"]}


def test_nscb_without_a_batch_column_is_skipped_with_the_derive_line():
    r = _cli(BBBC021, "--nsc", "--nscb", "--json")
    assert r.exit_code == 0, r.output
    import json

    data = json.loads(r.output)
    assert data["nsc"]["score"] == pytest.approx(94 / 103) and "nscb" not in data
    note = " ".join(data["notes"])
    assert "NSCB skipped" in note and "--derive 'Metadata_Batch=Metadata_Plate:^(Week\\d+)'" in note
    r = _cli(BBBC021, "--nsc", "--nscb")
    assert r.exit_code == 0 and "NSCB skipped" in r.output


def test_a_table_without_metadata_columns_says_how_to_join_them(tmp_path):
    df = pd.read_csv(BBBC021)
    df.drop(columns=[c for c in df.columns if c.startswith("Metadata_")]).to_csv(tmp_path / "bare.csv", index=False)
    r = _cli(tmp_path / "bare.csv", "--nsc")
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "no metadata columns" in text and "cpvs profile" in text and "--join META -o OUT" in text
    assert "(none)" not in text


@pytest.mark.parametrize("plates,expected", [
    (["Week1_22123", "Week1_22141", "Week2_24121"], "--derive 'Metadata_Batch=Metadata_Plate:^(Week\\d+)'"),
    (["B1-P03", "B1-P04", "B2-P01"], "--derive 'Metadata_Batch=Metadata_Plate:^(B\\d+)'"),
    (["run7_A", "run7_B", "x_C"], "--derive 'Metadata_Batch=Metadata_Plate:^([^_]+)_'"),
    (["BR00117006", "BR00117007"], "--derive 'Metadata_Batch=Metadata_Plate:REGEX'"),
])
def test_the_nscb_hint_derives_batches_from_common_plate_names(plates, expected):
    from cpvs.evaluate.suite import _batch_derive_hint

    hint = _batch_derive_hint(pd.DataFrame({"Metadata_Plate": plates}), "Metadata_Batch")
    assert "no batch column 'Metadata_Batch'" in hint and expected in hint
