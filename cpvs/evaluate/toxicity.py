"""Toxicity calls and the active subset (METHODS §8).

Toxicity: profiles are standardized; a k-NN classifier (k = 5, Euclidean) is
trained on the controls (positive control = toxic, negative control = non-toxic)
resampled with replacement to equal class sizes; repeated ``rounds`` times, the
majority vote is each perturbation's call.

Active subset: PCA of the features (up to 100 components), the mean cosine
distance of each perturbation to the negative-control wells, 1-D k-means with
k = 3; every cluster but the one nearest the controls is "active".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial.distance import cdist
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from cpvs.errors import CpvsError


@dataclass
class ToxicityResult:
    calls: pd.DataFrame  # group columns, toxic_votes (fraction of rounds), toxic (bool)
    n_positive: int
    n_negative: int
    k: int
    rounds: int


def _check_controls(n_pos: int, n_neg: int, k: int) -> None:
    if n_pos == 0 or n_neg == 0:
        raise CpvsError(f"the toxicity classifier needs positive and negative control wells (found {n_pos} and {n_neg})",
                        hint="check --positive-query and --negative-query against the table's metadata")


def knn_toxicity(wells: pd.DataFrame, features: list[str], positive: np.ndarray, negative: np.ndarray,
                 group_cols: list[str], k: int = 5, rounds: int = 100, seed: int = 0) -> ToxicityResult:
    """Calls for every perturbation that is not a control (its median standardized profile)."""
    positive, negative = np.asarray(positive, bool), np.asarray(negative, bool)
    _check_controls(int(positive.sum()), int(negative.sum()), k)
    x = StandardScaler().fit_transform(wells[features].to_numpy(dtype=np.float64))
    x = np.nan_to_num(x)  # constant features standardize to 0/0
    queries = wells.loc[~(positive | negative), group_cols].copy()
    if queries.empty:
        raise CpvsError("no perturbations left to call: every row is a positive or negative control")
    qx = pd.DataFrame(x[~(positive | negative)], index=queries.index)
    grouped = qx.groupby([queries[c] for c in group_cols], sort=True)
    q = grouped.median()
    pos, neg = x[positive], x[negative]
    n_each = max(len(pos), len(neg))
    rng = np.random.default_rng(seed)
    votes = np.zeros(len(q))
    for _ in range(rounds):
        ip, ineg = rng.integers(0, len(pos), n_each), rng.integers(0, len(neg), n_each)
        train = np.concatenate([pos[ip], neg[ineg]])
        labels = np.r_[np.ones(n_each), np.zeros(n_each)]
        knn = KNeighborsClassifier(n_neighbors=min(k, len(train)), algorithm="brute").fit(train, labels)
        votes += knn.predict(q.to_numpy())
    calls = q.index.to_frame(index=False)
    calls["toxic_votes"] = votes / rounds
    calls["toxic"] = votes > rounds / 2
    return ToxicityResult(calls, int(positive.sum()), int(negative.sum()), k, rounds)


def sensitivity_specificity(pred: pd.DataFrame, truth: pd.DataFrame, group_cols: list[str]) -> dict:
    """Agreement of predicted calls with the calls made the same way on ground truth."""
    m = pred.merge(truth, on=group_cols, suffixes=("_pred", "_truth"))
    if m.empty:
        raise CpvsError("no perturbation is called in both the prediction and the truth", hint="check --perturbation-cols")
    tp = int((m["toxic_pred"] & m["toxic_truth"]).sum())
    fn = int((~m["toxic_pred"] & m["toxic_truth"]).sum())
    tn = int((~m["toxic_pred"] & ~m["toxic_truth"]).sum())
    fp = int((m["toxic_pred"] & ~m["toxic_truth"]).sum())
    return {"n": len(m), "tp": tp, "fn": fn, "tn": tn, "fp": fp,
            "sensitivity": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan")}


def active_subset(wells: pd.DataFrame, features: list[str], negative: np.ndarray, group_cols: list[str],
                  n_components: int = 100, seed: int = 0) -> pd.DataFrame:
    """Perturbations with their mean cosine distance to the negative controls, cluster and ``active`` flag."""
    negative = np.asarray(negative, bool)
    if negative.sum() == 0:
        raise CpvsError("the active subset needs negative-control wells", hint="check --negative-query")
    x = np.nan_to_num(StandardScaler().fit_transform(wells[features].to_numpy(dtype=np.float64)))
    nc = min(n_components, x.shape[0], x.shape[1])
    z = PCA(n_components=nc, random_state=seed).fit_transform(x)
    pert = wells.loc[~negative, group_cols]
    if pert.empty:
        raise CpvsError("no perturbations besides the negative controls")
    zp = pd.DataFrame(z[~negative], index=pert.index).groupby([pert[c] for c in group_cols], sort=True).median()
    dist = cdist(zp.to_numpy(), z[negative], metric="cosine").mean(axis=1)
    out = zp.index.to_frame(index=False)
    out["distance_to_negcon"] = dist
    n_clusters = min(3, len(out))
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(dist[:, None])
    nearest = int(np.argmin(km.cluster_centers_[:, 0]))
    out["cluster"] = km.labels_
    out["active"] = km.labels_ != nearest
    return out
