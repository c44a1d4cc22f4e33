"""Mean average precision of retrieval with copairs (its p-values and FDR correction).

* **Replicates** (phenotypic activity): each well retrieves the other wells of its
  perturbation against the negative-control wells.
* **MOA / target** (consistency): each perturbation profile retrieves the
  perturbations sharing its annotation (of a different compound) against the
  others; multi-target lists use copairs' multilabel mode.

copairs computes similarities in blocks of ``batch_size`` pairs, so memory stays
bounded on thousands of wells.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError

REF = "Metadata_cpvs_reference_index"


def _copairs():
    from copairs.map import average_precision, mean_average_precision

    return average_precision, mean_average_precision


def replicate_map(wells: pd.DataFrame, features: list[str], pert_col: str, negative: np.ndarray,
                  null_size: int = 10000, threshold: float = 0.05, seed: int = 0, batch_size: int = 20000) -> pd.DataFrame:
    """Per-perturbation mAP of replicate retrieval against negative controls, with p-values."""
    average_precision, mean_average_precision = _copairs()
    negative = np.asarray(negative, bool)
    if negative.sum() == 0:
        raise CpvsError("replicate mAP needs negative-control wells", hint="check --negative-query")
    meta = wells[[pert_col]].reset_index(drop=True).astype(str)
    meta[REF] = np.where(negative, np.arange(len(meta)), -1)
    feats = wells[features].to_numpy(dtype=np.float64)
    ap = average_precision(meta, feats, pos_sameby=[pert_col, REF], pos_diffby=[], neg_sameby=[],
                           neg_diffby=[pert_col, REF], batch_size=batch_size, progress_bar=False)
    ap = ap[ap[REF] == -1].dropna(subset=["average_precision"])  # controls are references, not queries
    if ap.empty:
        raise CpvsError("no perturbation has two or more replicate wells: replicate mAP is undefined")
    return mean_average_precision(ap, [pert_col], null_size=null_size, threshold=threshold, seed=seed, progress_bar=False)


def annotation_map(profiles: pd.DataFrame, features: list[str], label_col: str, compound_col: str | None,
                   multilabel: bool = False, sep: str = "|", null_size: int = 10000, threshold: float = 0.05,
                   seed: int = 0, batch_size: int = 20000) -> pd.DataFrame:
    """Per-label mAP of retrieving perturbations that share ``label_col`` (MOA, or targets)."""
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
