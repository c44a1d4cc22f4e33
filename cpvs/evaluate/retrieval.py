"""Nearest-neighbour matching of treatment profiles (METHODS §8).

* **NSC**: each treatment's nearest neighbour by cosine similarity among
  treatments of a different compound; score = fraction with the same MOA. MOAs
  with a single compound (a positive control, say) cannot be matched: they stay
  candidates but are not queries, and are reported.
* **NSCB**: additionally among treatments of a different batch; MOAs present in a
  single batch are left out (queries and candidates) and reported.
* **Target matching**: nearest neighbour (and any of the k nearest) sharing a
  target gene (``GENE1|GENE2`` lists), and MTdist, the mean cosine distance between
  perturbations that share a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows of ``x``; zero rows get similarity 0."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)
    return unit @ unit.T


@dataclass
class MatchResult:
    name: str
    score: float
    n_queries: int
    n_correct: int
    per_class: pd.DataFrame
    confusion: pd.DataFrame  # true label, predicted label, count (mismatches only)
    neighbors: pd.DataFrame
    excluded_classes: list[str] = field(default_factory=list)  # NSCB: present in a single batch
    single_compound_classes: list[str] = field(default_factory=list)  # no other compound to match
    n_without_candidates: int = 0


def _features(profiles: pd.DataFrame, features: list[str]) -> np.ndarray:
    x = profiles[features].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise CpvsError("profiles contain NaN or infinite feature values after aggregation",
                        hint="drop or impute them first (cpvs profile --feature-select drops NaN features)")
    return x


def nearest_neighbor_matching(
    profiles: pd.DataFrame, features: list[str], label_col: str, compound_col: str,
    batch_col: str | None = None, across_batches: bool = False, id_cols: list[str] | None = None,
) -> MatchResult:
    """NSC (``across_batches=False``) or NSCB (``True``) on one profile per row."""
    if profiles.empty:
        raise CpvsError("no treatment profiles to match (is every row a control or missing its label?)")
    df = profiles.reset_index(drop=True)
    excluded: list[str] = []
    if across_batches:
        if batch_col is None:
            raise CpvsError("NSCB needs a batch column", hint="pass --batch-col, or --derive 'Metadata_Batch=Metadata_Plate:REGEX'")
        n_batches = df.groupby(label_col)[batch_col].nunique()
        excluded = sorted(n_batches[n_batches < 2].index.astype(str))
        df = df[~df[label_col].astype(str).isin(excluded)].reset_index(drop=True)
        if df.empty:
            raise CpvsError("every MOA is present in a single batch: NSCB is undefined")
    sim = cosine_similarity(_features(df, features))
    labels = df[label_col].astype(str).to_numpy()
    compounds = df[compound_col].astype(str).to_numpy()
    allowed = compounds[:, None] != compounds[None, :]
    if across_batches:
        batches = df[batch_col].astype(str).to_numpy()
        allowed &= batches[:, None] != batches[None, :]
    sim = np.where(allowed, sim, -np.inf)
    # A class with one compound can never be matched (e.g. a positive control): not a query.
    n_compounds = df.groupby(label_col)[compound_col].nunique()
    single = sorted(n_compounds[n_compounds < 2].index.astype(str))
    has = allowed.any(axis=1) & ~np.isin(labels, single)
    nn = np.argmax(sim, axis=1)
    q = np.flatnonzero(has)
    correct = labels[nn[q]] == labels[q]
    id_cols = [c for c in (id_cols or []) if c in df.columns]
    neighbors = pd.DataFrame({
        **{c: df[c].to_numpy()[q] for c in id_cols},
        "label": labels[q], "neighbor_compound": compounds[nn[q]], "neighbor_label": labels[nn[q]],
        "similarity": sim[q, nn[q]], "correct": correct,
    })
    per_class = (neighbors.groupby("label")["correct"].agg(["size", "sum"]).rename(columns={"size": "n", "sum": "correct"})
                 .assign(accuracy=lambda d: d["correct"] / d["n"]).reset_index())
    wrong = neighbors[~neighbors["correct"]]
    confusion = (wrong.groupby(["label", "neighbor_label"]).size().rename("count").reset_index()
                 .sort_values("count", ascending=False, kind="stable").reset_index(drop=True))
    n = len(q)
    return MatchResult("NSCB" if across_batches else "NSC", float(correct.mean()) if n else float("nan"), n,
                       int(correct.sum()), per_class, confusion, neighbors, excluded, single,
                       int((~allowed.any(axis=1)).sum()))


@dataclass
class TargetResult:
    n_queries: int
    top1: int
    topk: int
    k: int
    mtdist: float
    mean_distance_other: float
    chance_top1: float
    neighbors: pd.DataFrame


def parse_targets(values: pd.Series, sep: str = "|") -> list[frozenset[str]]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(frozenset())
        else:
            out.append(frozenset(t.strip() for t in str(v).split(sep) if t.strip()))
    return out


def target_matching(profiles: pd.DataFrame, features: list[str], target_col: str, compound_col: str | None = None,
                    k: int = 5, sep: str = "|", id_cols: list[str] | None = None) -> TargetResult:
    """Top-1 / top-k target matches among perturbations with at least one target, excluding
    a perturbation's own compound; MTdist over pairs of different compounds sharing a target."""
    targets = parse_targets(profiles[target_col], sep)
    keep = np.array([bool(t) for t in targets])
    df = profiles[keep].reset_index(drop=True)
    targets = [t for t, k_ in zip(targets, keep) if k_]
    if len(df) < 2:
        raise CpvsError(f"fewer than two perturbations have a target in {target_col}")
    sim = cosine_similarity(_features(df, features))
    n = len(df)
    compounds = df[compound_col].astype(str).to_numpy() if compound_col else np.arange(n).astype(str)
    allowed = (compounds[:, None] != compounds[None, :])
    shares = np.array([[bool(targets[i] & targets[j]) for j in range(n)] for i in range(n)])
    masked = np.where(allowed, sim, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    rows = []
    top1 = topk = 0
    for i in range(n):
        cands = [j for j in order[i] if allowed[i, j]][:k]
        if not cands:
            continue
        hit1 = bool(shares[i, cands[0]])
        hitk = any(shares[i, j] for j in cands)
        top1 += hit1
        topk += hitk
        rows.append({**{c: df[c].iat[i] for c in (id_cols or []) if c in df.columns},
                     "targets": sep.join(sorted(targets[i])), "neighbor": compounds[cands[0]],
                     "neighbor_targets": sep.join(sorted(targets[cands[0]])), "similarity": masked[i, cands[0]],
                     "top1": hit1, f"top{k}": hitk})
    iu = np.triu_indices(n, 1)
    pair_ok = allowed[iu]
    dist = 1 - sim[iu]
    pos = pair_ok & shares[iu]
    neg = pair_ok & ~shares[iu]
    return TargetResult(len(rows), top1, topk, k, float(dist[pos].mean()) if pos.any() else float("nan"),
                        float(dist[neg].mean()) if neg.any() else float("nan"), 1.0 / max(1, n - 1), pd.DataFrame(rows))
