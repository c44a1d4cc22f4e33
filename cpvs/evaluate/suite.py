"""``cpvs evaluate PROFILES --nsc --nscb --target --cpcor --toxicity --active --map``: the orchestration.

Loads a profile table (and a ground-truth table when given), resolves the
metadata columns (clear errors listing the available ones), aggregates to
treatments and runs the requested evaluations. Returns plain results; the CLI
prints them and writes JSON, Parquet and the HTML report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cpvs.errors import CpvsError
from cpvs.tables import aggregate, clean_features, derive_column, feature_columns, query_mask as _query, read_table, resolve_column


@dataclass
class EvalConfig:
    profiles: Path
    truth: Path | None = None
    nsc: bool = False
    nscb: bool = False
    target: bool = False
    cpcor: bool = False
    toxicity: bool = False
    active: bool = False
    map: bool = False
    moa_col: str = "Metadata_MOA"
    compound_col: str = "Metadata_Compound"
    batch_col: str = "Metadata_Batch"
    perturbation_cols: list[str] = field(default_factory=lambda: ["Metadata_Compound", "Metadata_Concentration"])
    target_col: str = "Metadata_Target"
    control_col: str = "Metadata_ControlType"
    derive: list[str] = field(default_factory=list)
    negative_query: str | None = None
    positive_query: str | None = None
    aggregate: str = "median"
    features: list[str] | None = None
    match_cols: list[str] | None = None
    method: str = "spearman"
    k: int = 5
    rounds: int = 100
    null_size: int = 10000
    seed: int = 0


@dataclass
class EvalResults:
    n_rows: int
    n_features: int
    treatments: pd.DataFrame | None = None
    grouping: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    wells: pd.DataFrame | None = None
    truth_wells: pd.DataFrame | None = None
    features: list[str] = field(default_factory=list)
    columns: dict[str, str | None] = field(default_factory=dict)


def _prepare(path: Path, cfg: EvalConfig) -> tuple[pd.DataFrame, list[str]]:
    df = read_table(path)
    for spec in cfg.derive:
        df, _ = derive_column(df, spec, path)
    feats = cfg.features or feature_columns(df)
    missing = [f for f in feats if f not in df.columns]
    if missing:
        raise CpvsError(f"feature column(s) {', '.join(missing[:5])} not in the table", path)
    if not feats:
        raise CpvsError("the table has no numeric feature columns besides Metadata_ ones", path,
                        "pass a profile table (features as numeric columns, metadata as Metadata_ columns)")
    return df, feats


def _negative_default(df: pd.DataFrame, cols: dict) -> str:
    if cols["control"]:
        return f"`{cols['control']}` == 'negcon'"
    if cols["moa"] and (df[cols["moa"]].astype(str) == "DMSO").any():
        return f"`{cols['moa']}` == 'DMSO'"
    return f"`{cols['compound']}` == 'DMSO'"


def evaluate_profiles(cfg: EvalConfig) -> EvalResults:
    df, feats = _prepare(Path(cfg.profiles), cfg)
    src = cfg.profiles
    optional = lambda name, opt: resolve_column(df, name, opt, src) if _has(df, name) else None  # noqa: E731
    cols = {
        "moa": resolve_column(df, cfg.moa_col, "--moa-col", src) if (cfg.nsc or cfg.nscb) else optional(cfg.moa_col, "--moa-col"),
        "compound": resolve_column(df, cfg.compound_col, "--compound-col", src),
        "batch": resolve_column(df, cfg.batch_col, "--batch-col", src) if cfg.nscb else optional(cfg.batch_col, "--batch-col"),
        "target": resolve_column(df, cfg.target_col, "--target-col", src) if cfg.target else optional(cfg.target_col, "--target-col"),
        "control": optional(cfg.control_col, "--control-col"),
    }
    pert = [resolve_column(df, c, "--perturbation-cols", src) for c in cfg.perturbation_cols]
    res = EvalResults(len(df), len(feats), wells=df, features=feats, columns=cols)
    negative = _query(df, cfg.negative_query or _negative_default(df, cols), "--negative-query", src)

    if cfg.nsc or cfg.nscb or cfg.target or cfg.map:
        use = clean_features(df[~negative], feats)
        if not use and (~negative).any():
            raise CpvsError(f"none of the {len(feats)} features is finite and varying over the treatments (NaN, Inf or constant)",
                            src, "check the feature columns of the table, e.g. normalize it first with "
                            "`cpvs profile TABLE --normalize mad_robustize -o OUT`")
        dropped = len(feats) - len(use)
        if dropped:
            res.notes.append(f"{dropped} feature(s) with NaN/infinite or constant values left out of distances")
        keep = [c for c in (cols["moa"], cols["compound"], cols["target"], cols["batch"]) if c and c not in pert]
        trt = df[~negative]
        if cols["moa"]:
            trt = trt[trt[cols["moa"]].notna() & (trt[cols["moa"]].astype(str) != "")]
        group = list(pert)
        if cols["batch"] and (trt.groupby(pert)[cols["batch"]].nunique() > 1).any():
            group.append(cols["batch"])  # a treatment profile must belong to one batch for NSCB
            keep = [k for k in keep if k != cols["batch"]]
            res.notes.append("some treatments span several batches: profiles aggregated per treatment and batch")
        if trt.empty:
            raise CpvsError("no treatment rows left after removing negative controls and rows without a MOA", src,
                            "check --negative-query and --moa-col")
        res.treatments = aggregate(trt, group, use, cfg.aggregate, keep)
        res.grouping = group
        from cpvs.evaluate.retrieval import nearest_neighbor_matching, target_matching

        if cfg.nsc:
            res.results["nsc"] = nearest_neighbor_matching(res.treatments, use, cols["moa"], cols["compound"], id_cols=group)
        if cfg.nscb:
            res.results["nscb"] = nearest_neighbor_matching(res.treatments, use, cols["moa"], cols["compound"],
                                                            cols["batch"], across_batches=True, id_cols=group)
        if cfg.target:
            res.results["target"] = target_matching(res.treatments, use, cols["target"], cols["compound"], k=cfg.k, id_cols=group)
        if cfg.map:
            from cpvs.evaluate.map_retrieval import annotation_map, replicate_map

            maps = {"replicates": replicate_map(df, use, pert[0] if len(pert) == 1 else _joined(df, pert), negative,
                                                null_size=cfg.null_size, seed=cfg.seed)}
            if cols["moa"]:
                maps["moa"] = annotation_map(res.treatments, use, cols["moa"], cols["compound"], null_size=cfg.null_size, seed=cfg.seed)
            if cols["target"]:
                maps["target"] = annotation_map(res.treatments, use, cols["target"], cols["compound"], multilabel=True,
                                                null_size=cfg.null_size, seed=cfg.seed)
            res.results["map"] = maps

    truth_df = None
    if cfg.truth is not None:
        truth_df, _ = _prepare(Path(cfg.truth), cfg)
        res.truth_wells = truth_df
    if cfg.cpcor:
        if truth_df is None:
            raise CpvsError("--cpcor needs --truth (the ground-truth profiles of the same images or wells)")
        from cpvs.evaluate.cpcor import feature_correlation

        keys = cfg.match_cols or _default_keys(df, truth_df)
        shared = [f for f in feats if f in set(truth_df.columns)]
        res.results["cpcor"] = feature_correlation(df, truth_df, keys, shared, cfg.method)
    if cfg.toxicity:
        if not cfg.positive_query:
            raise CpvsError("--toxicity needs --positive-query (e.g. \"Metadata_ControlType == 'poscon'\")")
        from cpvs.evaluate.toxicity import knn_toxicity, sensitivity_specificity

        use = clean_features(df, feats)
        positive = _query(df, cfg.positive_query, "--positive-query", src)
        tox = {"pred": knn_toxicity(df, use, positive, negative, pert, rounds=cfg.rounds, seed=cfg.seed)}
        if truth_df is not None:
            t_neg = _query(truth_df, cfg.negative_query or _negative_default(truth_df, cols), "--negative-query", cfg.truth)
            t_pos = _query(truth_df, cfg.positive_query, "--positive-query", cfg.truth)
            t_use = [f for f in clean_features(truth_df, feats)]
            tox["truth"] = knn_toxicity(truth_df, t_use, t_pos, t_neg, pert, rounds=cfg.rounds, seed=cfg.seed)
            tox["agreement"] = sensitivity_specificity(tox["pred"].calls, tox["truth"].calls, pert)
        res.results["toxicity"] = tox
    if cfg.active:
        from cpvs.evaluate.toxicity import active_subset

        res.results["active"] = active_subset(df, clean_features(df, feats), negative, pert, seed=cfg.seed)
    return res


def _has(df: pd.DataFrame, name: str) -> bool:
    return name in df.columns or sum(c.lower() == name.lower() for c in df.columns) == 1


def _joined(df: pd.DataFrame, cols: list[str]) -> str:
    """Add one column identifying a perturbation by several columns (copairs groups by one)."""
    name = "Metadata_cpvs_perturbation"
    df[name] = df[cols].astype(str).agg("@".join, axis=1)
    return name


def _default_keys(a: pd.DataFrame, b: pd.DataFrame) -> list[str]:
    for keys in (["Metadata_Plate", "Metadata_Well", "Metadata_Site"], ["Metadata_Plate", "Metadata_Well"], ["Metadata_Well", "Metadata_Site"]):
        if all(k in a.columns and k in b.columns for k in keys) and not a.duplicated(keys).any():
            return keys
    raise CpvsError("cannot tell how to match prediction and truth rows", hint="pass --match-cols (e.g. Metadata_Plate,Metadata_Well)")


def results_json(res: EvalResults) -> dict:
    """JSON-ready summary of every computed evaluation."""
    out: dict[str, Any] = {"n_rows": res.n_rows, "n_features": res.n_features, "notes": res.notes,
                           "treatment_grouping": res.grouping,
                           "n_treatments": None if res.treatments is None else len(res.treatments)}
    r = res.results
    for key in ("nsc", "nscb"):
        if key in r:
            m = r[key]
            out[key] = {"score": m.score, "n_queries": m.n_queries, "n_correct": m.n_correct,
                        "excluded_moas": m.excluded_classes, "single_compound_moas": m.single_compound_classes, "per_moa": m.per_class.to_dict("records"),
                        "confusion": m.confusion.to_dict("records")}
    if "target" in r:
        t = r["target"]
        out["target"] = {"n_queries": t.n_queries, "top1": t.top1, f"top{t.k}": t.topk, "top1_fraction": t.top1 / max(1, t.n_queries),
                         f"top{t.k}_fraction": t.topk / max(1, t.n_queries), "mtdist": t.mtdist,
                         "mean_distance_other_pairs": t.mean_distance_other, "chance_top1": t.chance_top1}
    if "cpcor" in r:
        c = r["cpcor"]
        out["cpcor"] = {**c.summary, "by_compartment": c.by_compartment.to_dict(), "by_module": c.by_module.to_dict(),
                        "by_channel": c.by_channel.to_dict()}
    if "toxicity" in r:
        t = r["toxicity"]
        out["toxicity"] = {"n_called": len(t["pred"].calls), "n_toxic": int(t["pred"].calls["toxic"].sum()),
                           "k": t["pred"].k, "rounds": t["pred"].rounds, "n_positive_controls": t["pred"].n_positive,
                           "n_negative_controls": t["pred"].n_negative}
        if "agreement" in t:
            out["toxicity"]["agreement_with_truth"] = t["agreement"]
    if "active" in r:
        a = r["active"]
        out["active"] = {"n": len(a), "n_active": int(a["active"].sum())}
    if "map" in r:
        out["map"] = {k: {"mean_mAP": float(v["mean_average_precision"].mean()),
                          "fraction_significant": float(v["below_corrected_p"].mean()), "n": len(v)} for k, v in r["map"].items()}
    return out
