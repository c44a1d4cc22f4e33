"""Mean average precision of retrieval, with p-values and FDR correction.

* **Replicates** (phenotypic activity): each well retrieves the other wells of its
  perturbation against the negative-control wells.
* **MOA / target** (consistency): each perturbation profile retrieves the
  perturbations sharing its annotation (of a different compound) against the
  others; multi-target lists use copairs' multilabel definition (one AP per target).

Two engines give the same table: ``"cpvs"`` (default; :mod:`cpvs.evaluate.average_precision`
on the block engine: equal APs, p-values within Monte-Carlo error of copairs') and
``"copairs"`` (the reference, copairs 0.5 called directly).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.evaluate.engine import Progress, resolve_device, scan
from cpvs.evaluate.retrieval import codes, parse_targets, profile_matrix

REF = "Metadata_cpvs_reference_index"
ENGINES = ("cpvs", "copairs")


def _copairs():
    from copairs.map import average_precision, mean_average_precision

    return average_precision, mean_average_precision


def _check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise CpvsError(f"mAP engine must be one of {', '.join(ENGINES)}, got {engine!r}")


def replicate_average_precision_table(wells: pd.DataFrame, features: list[str], pert_col: str, negative: np.ndarray,
                                      device: str = "cpu", progress: Progress | None = None) -> pd.DataFrame:
    """Per-well AP of replicate retrieval (cpvs engine): ``pert_col`` (as text), n_pos_pairs,
    n_total_pairs, average_precision, normalized_average_precision, and the well's row."""
    from cpvs.evaluate.average_precision import ROW, replicate_average_precision

    ap = replicate_average_precision(profile_matrix(wells, features), codes(wells[pert_col]), negative,
                                     resolve_device(device), progress)
    ap.insert(1, pert_col, wells[pert_col].astype(str).to_numpy()[ap[ROW].to_numpy()])
    return ap


def replicate_map(wells: pd.DataFrame, features: list[str], pert_col: str, negative: np.ndarray,
                  null_size: int = 10000, threshold: float = 0.05, seed: int = 0, batch_size: int = 20000,
                  engine: str = "cpvs", device: str = "cpu", progress: Progress | None = None) -> pd.DataFrame:
    """Per-perturbation mAP of replicate retrieval against negative controls, with p-values."""
    _check_engine(engine)
    negative = np.asarray(negative, bool)
    if negative.sum() == 0:
        raise CpvsError("replicate mAP needs negative-control wells", hint="check --negative-query")
    if engine == "cpvs":
        from cpvs.evaluate.average_precision import mean_average_precision

        ap = replicate_average_precision_table(wells, features, pert_col, negative, device, progress)
        if ap.empty:
            raise CpvsError("no perturbation has two or more replicate wells: replicate mAP is undefined")
        return mean_average_precision(ap, [pert_col], null_size, threshold, seed, progress)
    average_precision, mean_average_precision = _copairs()
    meta = wells[[pert_col]].reset_index(drop=True).astype(str)
    meta[REF] = np.where(negative, np.arange(len(meta)), -1)
    feats = wells[features].to_numpy(dtype=np.float64)
    ap = average_precision(meta, feats, pos_sameby=[pert_col, REF], pos_diffby=[], neg_sameby=[],
                           neg_diffby=[pert_col, REF], batch_size=batch_size, progress_bar=False)
    ap = ap[ap[REF] == -1].dropna(subset=["average_precision"])  # controls are references, not queries
    if ap.empty:
        raise CpvsError("no perturbation has two or more replicate wells: replicate mAP is undefined")
    return mean_average_precision(ap, [pert_col], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False)


def _labels(profiles: pd.DataFrame, label_col: str, multilabel: bool, sep: str) -> list[frozenset[str]]:
    """Label sets per row; a missing or empty label is an empty set (the row takes no part)."""
    if multilabel:
        return parse_targets(profiles[label_col], sep)
    values = profiles[label_col]
    text = values.astype(str)
    return [frozenset([t]) if ok and t else frozenset() for t, ok in zip(text, values.notna())]


def annotation_task(profiles: pd.DataFrame, label_col: str, compound_col: str | None, multilabel: bool = False,
                    sep: str = "|"):
    """The cpvs-engine task of :func:`annotation_map`, to share a pass with other tasks."""
    from cpvs.evaluate.average_precision import AnnotationAPTask

    return AnnotationAPTask(_labels(profiles, label_col, multilabel, sep),
                            codes(profiles[compound_col]) if compound_col else None)


def annotation_map_of_task(task, profiles: pd.DataFrame, label_col: str, compound_col: str | None,
                           null_size: int = 10000, threshold: float = 0.05, seed: int = 0,
                           progress: Progress | None = None) -> pd.DataFrame:
    """mAP per label from an :func:`annotation_task` that has seen the similarities."""
    from cpvs.evaluate.average_precision import mean_average_precision

    meta = {compound_col: profiles[compound_col].astype(str).to_numpy()} if compound_col else {}
    ap = task.frame(label_col, meta)
    if ap.empty:
        raise CpvsError(f"no two perturbations of different compounds share a {label_col}: mAP is undefined")
    return mean_average_precision(ap, [label_col], null_size, threshold, seed, progress)


def annotation_map(profiles: pd.DataFrame, features: list[str], label_col: str, compound_col: str | None,
                   multilabel: bool = False, sep: str = "|", null_size: int = 10000, threshold: float = 0.05,
                   seed: int = 0, batch_size: int = 20000, engine: str = "cpvs", device: str = "cpu",
                   progress: Progress | None = None) -> pd.DataFrame:
    """Per-label mAP of retrieving perturbations that share ``label_col`` (MOA, or targets)."""
    _check_engine(engine)
    if engine == "cpvs":
        df = profiles.reset_index(drop=True)
        task = annotation_task(df, label_col, compound_col, multilabel, sep)
        keep = task.has
        x = np.zeros((len(df), len(features)))
        x[keep] = profile_matrix(df[keep], features)  # unlabelled rows take no part
        scan(x, [task], resolve_device(device), progress=progress, stage=f"{label_col} retrieval")
        return annotation_map_of_task(task, df, label_col, compound_col, null_size, threshold, seed, progress)
    average_precision, mean_average_precision = _copairs()
    df = profiles.dropna(subset=[label_col]).reset_index(drop=True)
    df = df[df[label_col].astype(str).str.len() > 0].reset_index(drop=True)
    meta = pd.DataFrame({label_col: df[label_col].astype(str)})
    diff = []
    if compound_col:
        meta[compound_col] = df[compound_col].astype(str)
        diff = [compound_col]
    feats = df[features].to_numpy(dtype=np.float64)
    if multilabel:
        from copairs.map import multilabel as ml

        meta[label_col] = meta[label_col].map(lambda v: [t.strip() for t in v.split(sep) if t.strip()])
        ap = ml.average_precision(meta, feats, pos_sameby=[label_col], pos_diffby=diff, neg_sameby=[],
                                  neg_diffby=[label_col], multilabel_col=label_col, batch_size=batch_size,
                                  progress_bar=False)
        ap = ap.explode(label_col) if ap[label_col].map(lambda v: isinstance(v, list)).any() else ap
    else:
        ap = average_precision(meta, feats, pos_sameby=[label_col], pos_diffby=diff, neg_sameby=[],
                               neg_diffby=[label_col], batch_size=batch_size, progress_bar=False)
    ap = ap.dropna(subset=["average_precision"])
    if ap.empty:
        raise CpvsError(f"no two perturbations of different compounds share a {label_col}: mAP is undefined")
    return mean_average_precision(ap, [label_col], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False)
