"""The brute-force NSC/NSCB and target matching cpvs used before the block engine (full n × n
similarity matrices, per-row Python): the reference the engine must equal in the tests.

Only change from that implementation: the target-match chance is the mean over queries of the
fraction of their candidates (other compounds) that share a target, not 1 / (n - 1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cpvs.evaluate.retrieval import MatchResult, TargetResult, parse_targets


def cosine_similarity(x: np.ndarray) -> np.ndarray:
    """(n, n) cosine similarities of the rows of ``x``; zero rows get similarity 0."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = np.divide(x, norms, out=np.zeros_like(x, dtype=np.float64), where=norms > 0)
    return unit @ unit.T


def nearest_neighbor_matching(profiles, features, label_col, compound_col, batch_col=None, across_batches=False,
                              id_cols=None) -> MatchResult:
    df = profiles.reset_index(drop=True)
    excluded: list[str] = []
    if across_batches:
        n_batches = df.groupby(label_col)[batch_col].nunique()
        excluded = sorted(n_batches[n_batches < 2].index.astype(str))
        df = df[~df[label_col].astype(str).isin(excluded)].reset_index(drop=True)
    sim = cosine_similarity(df[features].to_numpy(dtype=np.float64))
    labels = df[label_col].astype(str).to_numpy()
    compounds = df[compound_col].astype(str).to_numpy()
    allowed = compounds[:, None] != compounds[None, :]
    if across_batches:
        batches = df[batch_col].astype(str).to_numpy()
        allowed &= batches[:, None] != batches[None, :]
    sim = np.where(allowed, sim, -np.inf)
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


def target_matching(profiles, features, target_col, compound_col=None, k=5, sep="|", id_cols=None) -> TargetResult:
    targets = parse_targets(profiles[target_col], sep)
    keep = np.array([bool(t) for t in targets])
    df = profiles[keep].reset_index(drop=True)
    targets = [t for t, k_ in zip(targets, keep) if k_]
    sim = cosine_similarity(df[features].to_numpy(dtype=np.float64))
    n = len(df)
    compounds = df[compound_col].astype(str).to_numpy() if compound_col else np.arange(n).astype(str)
    allowed = compounds[:, None] != compounds[None, :]
    shares = np.array([[bool(targets[i] & targets[j]) for j in range(n)] for i in range(n)])
    masked = np.where(allowed, sim, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")
    rows, chances = [], []
    top1 = topk = 0
    for i in range(n):
        cands = [j for j in order[i] if allowed[i, j]][:k]
        if not cands:
            continue
        hit1 = bool(shares[i, cands[0]])
        hitk = any(shares[i, j] for j in cands)
        top1 += hit1
        topk += hitk
        chances.append(shares[i, allowed[i]].mean())
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
                        float(dist[neg].mean()) if neg.any() else float("nan"), float(np.mean(chances)), pd.DataFrame(rows))
