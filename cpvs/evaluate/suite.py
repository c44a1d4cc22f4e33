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

import re

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.evaluate.engine import Progress
from cpvs.evaluate.map_retrieval import ENGINES
from cpvs.tables import (
    aggregate, clean_features, derive_column, feature_columns, is_metadata, query_mask as _query, read_table, resolve_column,
)


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
    cellprofiler_names: bool = True  # --cpcor: map CellProfiler image names (CorrDNA, OrigER) to cpvs channel names
    map_engine: str = "cpvs"  # "cpvs" (block engine) or "copairs" (the reference)
    device: str = "auto"  # similarities on: auto (the GPU when there is one), cpu, cuda, cuda:N


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


def _require(df: pd.DataFrame, name: str, option: str, src) -> str:
    """The column ``name``; a table without any metadata column gets its own explanation."""
    if not _has(df, name) and not any(is_metadata(c) for c in df.columns):
        raise CpvsError(f"no column {name!r} for {option}: the table has no metadata columns at all (no Metadata_ columns)",
                        src, f"join them first: cpvs profile {src} --join META -o OUT (META: a CSV of plate, well and "
                             f"compound, MOA, ... columns), then evaluate OUT")
    return resolve_column(df, name, option, src)


def _batch_derive_hint(df: pd.DataFrame, batch_col: str) -> str:
    """Why NSCB cannot run without a batch column, and the ``--derive`` line that makes one
    from common plate names (``Week4_27481`` -> ``Week4``, ``B1-P03`` -> ``B1``)."""
    plate = next((c for c in ("Metadata_Plate", "Image_Metadata_Plate") if _has(df, c)), None)
    why = f"the table has no batch column {batch_col!r} (--batch-col)"
    generic = "--derive 'Metadata_Batch=Metadata_Plate:^(Week\\d+)' (BBBC021-style plate names), or pass --batch-col"
    if plate is None:
        return f"{why}; make one with --derive 'Metadata_Batch=SOURCE:REGEX' from a column naming the batch, or pass --batch-col"
    plate = resolve_column(df, plate, "--derive")
    values = pd.Series(df[plate].astype(str).unique())
    patterns = []
    words = values.str.extract(r"^([A-Za-z]+)\d+", expand=False)
    if words.notna().all() and words.nunique() == 1:
        patterns.append(f"^({re.escape(words.iloc[0])}\\d+)")
    patterns += [r"^([^_]+)_", r"^([^-]+)-"]
    for rx in patterns:
        batches = values.str.extract(rx, expand=False)
        if batches.notna().all() and 1 < batches.nunique() < len(values):
            return (f"{why}; derive it from the plate names, e.g. --derive '{batch_col}={plate}:{rx}' "
                    f"({values.iloc[0]} -> {batches.iloc[0]}, {batches.nunique()} batches)")
    return f"{why}; derive it from the plate names with --derive '{batch_col}={plate}:REGEX', e.g. {generic}"


def _usable_features(df: pd.DataFrame, feats: list[str], rows: np.ndarray) -> list[str]:
    """``clean_features(df[rows], feats)`` (finite everywhere, not constant) a few columns at a
    time: no copy of the whole table."""
    if not rows.any():
        return []
    keep = []
    for j in range(0, len(feats), 128):
        cols = feats[j:j + 128]
        x = df[cols].to_numpy(dtype=np.float64)[rows]
        finite = np.isfinite(x).all(axis=0)
        keep += [c for c, ok in zip(cols, finite & (np.where(finite, x, 0).std(axis=0) > 0)) if ok]
    return keep


def _aggregate(df: pd.DataFrame, rows: np.ndarray, by: list[str], features: list[str], method: str,
               keep: list[str]) -> pd.DataFrame:
    """``aggregate(df[rows], by, features, method, keep)`` a few feature columns at a time, so
    a 100k-well table is not copied whole; same groups, order, columns and values."""
    if method not in ("median", "mean"):
        return aggregate(df[rows], by, features, method, keep)  # the same error message
    meta = df.loc[rows, list(dict.fromkeys(by + [k for k in keep if k not in by]))]
    groups = meta.groupby(by, sort=True, dropna=False)
    gid = groups.ngroup().to_numpy()
    size = groups.size().rename("n_profiles")
    values = np.empty((len(size), len(features)))
    for j in range(0, len(features), 128):
        cols = features[j:j + 128]
        part = pd.DataFrame(df[cols].to_numpy(dtype=np.float64)[rows], columns=cols).groupby(gid, sort=True)
        values[:, j:j + 128] = (part.median() if method == "median" else part.mean()).to_numpy()
    extra = groups[[k for k in keep if k not in by]].first() if keep else None
    agg = pd.DataFrame(values, index=size.index, columns=features)
    parts = [size] + ([] if extra is None or extra.empty else [extra]) + [agg]
    return pd.concat(parts, axis=1).copy().reset_index()


def _same_feature_names(df: pd.DataFrame, truth: pd.DataFrame, feats: list[str], res) -> tuple:
    """Both tables with cpvs channel names in their features, so a CellProfiler table whose
    pipeline named its images CorrDNA/OrigER/... matches cpvs's DNA/ER/... (a note says how many)."""
    from cpvs.tables import cpvs_feature_names, feature_columns

    before = len(set(feats) & set(truth.columns))
    ren_pred, ren_truth = cpvs_feature_names(feats), cpvs_feature_names(feature_columns(truth))
    if not (ren_pred or ren_truth):
        return df, truth, feats
    renamed_truth = truth.rename(columns=ren_truth)
    renamed_pred = df.rename(columns=ren_pred)
    if renamed_truth.columns.duplicated().any() or renamed_pred.columns.duplicated().any():
        return df, truth, feats  # two images of one channel (e.g. Orig and Corr): names are not comparable
    new_feats = [ren_pred.get(f, f) for f in feats]
    after = len(set(new_feats) & set(renamed_truth.columns))
    if after <= before:
        return df, truth, feats
    res.notes.append(f"CPcor: CellProfiler image names mapped to cpvs channel names ({len(ren_truth) + len(ren_pred)} "
                     f"columns, e.g. {next(iter({**ren_truth, **ren_pred}.items()))[0]} -> "
                     f"{next(iter({**ren_truth, **ren_pred}.items()))[1]}): {after} shared features instead of {before}")
    return renamed_pred, renamed_truth, new_feats


def evaluate_profiles(cfg: EvalConfig, progress: Progress | None = None) -> EvalResults:
    """Run the evaluations ``cfg`` asks for; ``progress(stage, completed, total, info="")``
    hears about the long ones (similarity blocks, null distributions)."""
    if cfg.map_engine not in ENGINES:
        raise CpvsError(f"--map-engine must be one of {', '.join(ENGINES)}, got {cfg.map_engine!r}")
    df, feats = _prepare(Path(cfg.profiles), cfg)
    src = cfg.profiles
    notes: list[str] = []
    nscb = cfg.nscb
    if nscb and not _has(df, cfg.batch_col) and any(is_metadata(c) for c in df.columns):
        hint = _batch_derive_hint(df, cfg.batch_col)
        if not (cfg.nsc or cfg.target or cfg.cpcor or cfg.toxicity or cfg.active or cfg.map):
            raise CpvsError(f"NSCB needs batches: {hint}", src)
        notes.append(f"NSCB skipped: {hint}")
        nscb = False
    optional = lambda name, opt: resolve_column(df, name, opt, src) if _has(df, name) else None  # noqa: E731
    grouped = cfg.nsc or nscb or cfg.target or cfg.map or cfg.toxicity or cfg.active  # need perturbations
    cols = {
        "moa": _require(df, cfg.moa_col, "--moa-col", src) if (cfg.nsc or nscb) else optional(cfg.moa_col, "--moa-col"),
        "compound": _require(df, cfg.compound_col, "--compound-col", src) if grouped else optional(cfg.compound_col, "--compound-col"),
        "batch": _require(df, cfg.batch_col, "--batch-col", src) if nscb else optional(cfg.batch_col, "--batch-col"),
        "target": _require(df, cfg.target_col, "--target-col", src) if cfg.target else optional(cfg.target_col, "--target-col"),
        "control": optional(cfg.control_col, "--control-col"),
    }
    pert = [_require(df, c, "--perturbation-cols", src) for c in cfg.perturbation_cols] if grouped else []
    res = EvalResults(len(df), len(feats), wells=df, features=feats, columns=cols, notes=notes)
    negative = _query(df, cfg.negative_query or _negative_default(df, cols), "--negative-query", src) if grouped else None

    if cfg.nsc or nscb or cfg.target or cfg.map:
        _retrieval(df, feats, cols, pert, negative, nscb, cfg, res, progress)

    truth_df = None
    if cfg.truth is not None:
        truth_df, _ = _prepare(Path(cfg.truth), cfg)
        res.truth_wells = truth_df
    if cfg.cpcor:
        if truth_df is None:
            raise CpvsError("--cpcor needs --truth (the ground-truth profiles of the same images or wells)")
        from cpvs.evaluate.cpcor import feature_correlation

        keys = cfg.match_cols or _default_keys(df, truth_df)
        if cfg.cellprofiler_names:
            df, truth_df, feats = _same_feature_names(df, truth_df, feats, res)
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


def _retrieval(df: pd.DataFrame, feats: list[str], cols: dict, pert: list[str], negative: np.ndarray, nscb: bool,
               cfg: EvalConfig, res: EvalResults, progress: Progress | None) -> None:
    """NSC, NSCB, target matching and mAP: one pass over the treatment similarities for all
    of them (plus one over wells × controls for replicate mAP)."""
    from cpvs.evaluate.engine import resolve_device, scan
    from cpvs.evaluate.map_retrieval import annotation_map, annotation_map_of_task, annotation_task, replicate_map
    from cpvs.evaluate.retrieval import NearestNeighborTask, TargetTask, profile_matrix

    src = cfg.profiles
    use = _usable_features(df, feats, ~negative)
    if not use and (~negative).any():
        raise CpvsError(f"none of the {len(feats)} features is finite and varying over the treatments (NaN, Inf or constant)",
                        src, "check the feature columns of the table, e.g. normalize it first with "
                        "`cpvs profile TABLE --normalize mad_robustize -o OUT`")
    dropped = len(feats) - len(use)
    if dropped:
        res.notes.append(f"{dropped} feature(s) with NaN/infinite or constant values left out of distances")
    keep = [c for c in (cols["moa"], cols["compound"], cols["target"], cols["batch"]) if c and c not in pert]
    rows = ~negative
    if cols["moa"]:
        moa = df[cols["moa"]]
        rows &= (moa.notna() & (moa.astype(str) != "")).to_numpy()
    group = list(pert)
    if cols["batch"] and (df.loc[rows, pert + [cols["batch"]]].groupby(pert)[cols["batch"]].nunique() > 1).any():
        group.append(cols["batch"])  # a treatment profile must belong to one batch for NSCB
        keep = [k for k in keep if k != cols["batch"]]
        res.notes.append("some treatments span several batches: profiles aggregated per treatment and batch")
    if not rows.any():
        raise CpvsError("no treatment rows left after removing negative controls and rows without a MOA", src,
                        "check --negative-query and --moa-col")
    res.treatments = trt = _aggregate(df, rows, group, use, cfg.aggregate, keep)
    res.grouping = group
    device = resolve_device(cfg.device)
    tasks: dict[str, Any] = {}
    if cfg.nsc:
        tasks["nsc"] = NearestNeighborTask(trt, cols["moa"], cols["compound"], id_cols=group)
    if nscb:
        tasks["nscb"] = NearestNeighborTask(trt, cols["moa"], cols["compound"], cols["batch"], across_batches=True, id_cols=group)
    if cfg.target:
        tasks["target"] = TargetTask(trt, cols["target"], cols["compound"], k=cfg.k, id_cols=group)
    labels = {"moa": (cols["moa"], False), "target": (cols["target"], True)}
    labels = {k: v for k, v in labels.items() if v[0]} if cfg.map else {}
    if cfg.map_engine == "cpvs":
        for name, (col, multi) in labels.items():
            tasks[f"map_{name}"] = annotation_task(trt, col, cols["compound"], multilabel=multi)
    scan(profile_matrix(trt, use), tasks.values(), device, progress=progress, stage="treatment retrieval")
    for name in ("nsc", "nscb", "target"):
        if name in tasks:
            res.results[name] = tasks[name].result()
    if not cfg.map:
        return
    pert_col = pert[0] if len(pert) == 1 else _joined(df, pert)
    opts = dict(null_size=cfg.null_size, seed=cfg.seed)
    maps = {"replicates": replicate_map(df, use, pert_col, negative, engine=cfg.map_engine, device=device,
                                        progress=progress, **opts)}
    for name, (col, multi) in labels.items():
        if cfg.map_engine == "cpvs":
            maps[name] = annotation_map_of_task(tasks[f"map_{name}"], trt, col, cols["compound"], progress=progress, **opts)
        else:
            maps[name] = annotation_map(trt, use, col, cols["compound"], multilabel=multi, engine="copairs", **opts)
    res.results["map"] = maps


def _has(df: pd.DataFrame, name: str) -> bool:
    return name in df.columns or sum(c.lower() == name.lower() for c in df.columns) == 1


def _joined(df: pd.DataFrame, cols: list[str]) -> str:
    """Add one column identifying a perturbation by several columns (mAP groups by one)."""
    name = "Metadata_cpvs_perturbation"
    joined = df[cols[0]].astype(str)
    for c in cols[1:]:
        joined = joined + "@" + df[c].astype(str)
    df[name] = joined
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
