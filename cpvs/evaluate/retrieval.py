"""Nearest-neighbour matching of treatment profiles (METHODS §8), on the block engine.

* **NSC**: each treatment's nearest neighbour by cosine similarity among
  treatments of a different compound; score = fraction with the same MOA. MOAs
  with a single compound (a positive control, say) cannot be matched: they stay
  candidates but are not queries, and are reported.
* **NSCB**: additionally among treatments of a different batch; MOAs present in a
  single batch are left out (queries and candidates) and reported.
* **Target matching**: nearest neighbour (and any of the k nearest) sharing a
  target gene (``GENE1|GENE2`` lists), and MTdist, the mean cosine distance between
  perturbations that share a target.

Each evaluation is a task of :mod:`cpvs.evaluate.engine`: it sees blocks of similarities
and keeps a top-k per row, so memory stays ``block × n`` and several evaluations of one
table share one pass (see :func:`cpvs.evaluate.suite.evaluate_profiles`). Ties go to the
lower row index, as ``np.argmax`` and a stable ``np.argsort`` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from cpvs.errors import CpvsError
from cpvs.evaluate.engine import Progress, resolve_device, scan, topk_first, unit_rows


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


def profile_matrix(profiles: pd.DataFrame, features: list[str]) -> np.ndarray:
    """Unit-norm float64 rows of ``profiles[features]``; non-finite values are an error.

    Filled a few columns at a time, so a large table costs one n × d float64 array.
    """
    x = np.empty((len(profiles), len(features)))
    for j in range(0, len(features), 128):
        x[:, j:j + 128] = profiles[features[j:j + 128]].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise CpvsError("profiles contain NaN or infinite feature values after aggregation",
                        hint="drop or impute them first (cpvs profile --feature-select drops NaN features)")
    return unit_rows(x, inplace=True)


def codes(values: pd.Series) -> np.ndarray:
    """Integer codes of a column compared as text (how the references compare values)."""
    return pd.factorize(values.astype(str))[0].astype(np.int64)


def _tensor(a: np.ndarray, device):
    import torch

    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


class NearestNeighborTask:
    """NSC (``across_batches=False``) or NSCB (``True``) over the rows of ``profiles``.

    Construct, feed to :func:`~cpvs.evaluate.engine.scan` with the unit rows of the same
    table, then :meth:`result`.
    """

    def __init__(self, profiles: pd.DataFrame, label_col: str, compound_col: str, batch_col: str | None = None,
                 across_batches: bool = False, id_cols: list[str] | None = None):
        if profiles.empty:
            raise CpvsError("no treatment profiles to match (is every row a control or missing its label?)")
        df = profiles.reset_index(drop=True)
        self.across = across_batches
        self.excluded: list[str] = []
        kept = np.ones(len(df), bool)
        if across_batches:
            if batch_col is None:
                raise CpvsError("NSCB needs a batch column", hint="pass --batch-col, or --derive 'Metadata_Batch=Metadata_Plate:REGEX'")
            n_batches = df.groupby(label_col)[batch_col].nunique()
            self.excluded = sorted(n_batches[n_batches < 2].index.astype(str))
            kept = ~df[label_col].astype(str).isin(self.excluded).to_numpy()
            if not kept.any():
                raise CpvsError("every MOA is present in a single batch: NSCB is undefined")
        self.df, self.kept = df, kept
        self.labels = df[label_col].astype(str).to_numpy()
        self.compounds = df[compound_col].astype(str).to_numpy()
        self.comp = codes(df[compound_col])
        self.batch = codes(df[batch_col]) if across_batches else None
        # A class with one compound can never be matched (e.g. a positive control): not a query.
        n_compounds = df[kept].groupby(label_col)[compound_col].nunique()
        self.single = sorted(n_compounds[n_compounds < 2].index.astype(str))
        self.id_cols = [c for c in (id_cols or []) if c in df.columns]
        n = len(df)
        self.best = np.zeros(n, np.int64)
        self.sim = np.full(n, -np.inf)
        self.has = np.zeros(n, bool)

    def start(self, device) -> None:
        self._comp = _tensor(self.comp, device)
        self._kept = _tensor(self.kept, device)
        self._batch = None if self.batch is None else _tensor(self.batch, device)

    def consume(self, start: int, stop: int, sim) -> None:
        if not self.kept[start:stop].any():
            return
        allowed = (self._comp[start:stop, None] != self._comp[None, :]) & self._kept[None, :]
        if self._batch is not None:
            allowed &= self._batch[start:stop, None] != self._batch[None, :]
        masked = sim.masked_fill(~allowed, float("-inf"))
        best = masked.argmax(1)  # the first maximum: lowest index among exact ties
        self.best[start:stop] = best.cpu().numpy()
        self.sim[start:stop] = masked.gather(1, best[:, None]).squeeze(1).cpu().numpy()
        self.has[start:stop] = allowed.any(1).cpu().numpy()

    def result(self) -> MatchResult:
        kept, has = self.kept, self.has & self.kept
        q = np.flatnonzero(has & ~np.isin(self.labels, self.single))
        nn = self.best[q]
        labels, compounds = self.labels, self.compounds
        correct = labels[nn] == labels[q]
        neighbors = pd.DataFrame({
            **{c: self.df[c].to_numpy()[q] for c in self.id_cols},
            "label": labels[q], "neighbor_compound": compounds[nn], "neighbor_label": labels[nn],
            "similarity": self.sim[q], "correct": correct,
        })
        per_class = (neighbors.groupby("label")["correct"].agg(["size", "sum"]).rename(columns={"size": "n", "sum": "correct"})
                     .assign(accuracy=lambda d: d["correct"] / d["n"]).reset_index())
        wrong = neighbors[~neighbors["correct"]]
        confusion = (wrong.groupby(["label", "neighbor_label"]).size().rename("count").reset_index()
                     .sort_values("count", ascending=False, kind="stable").reset_index(drop=True))
        n = len(q)
        return MatchResult("NSCB" if self.across else "NSC", float(correct.mean()) if n else float("nan"), n,
                           int(correct.sum()), per_class, confusion, neighbors, self.excluded, self.single,
                           int((kept & ~self.has).sum()))


def nearest_neighbor_matching(
    profiles: pd.DataFrame, features: list[str], label_col: str, compound_col: str,
    batch_col: str | None = None, across_batches: bool = False, id_cols: list[str] | None = None,
    device: str = "cpu", progress: Progress | None = None,
) -> MatchResult:
    """NSC (``across_batches=False``) or NSCB (``True``) on one profile per row."""
    task = NearestNeighborTask(profiles, label_col, compound_col, batch_col, across_batches, id_cols)
    scan(profile_matrix(task.df, features), [task], resolve_device(device), progress=progress,
         stage="NSCB" if task.across else "NSC")
    return task.result()


@dataclass
class TargetResult:
    n_queries: int
    top1: int
    topk: int
    k: int
    mtdist: float
    mean_distance_other: float
    chance_top1: float  # chance that a random candidate (other compound) shares a target, mean over queries
    neighbors: pd.DataFrame


def parse_targets(values: pd.Series, sep: str = "|") -> list[frozenset[str]]:
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(frozenset())
        else:
            out.append(frozenset(t.strip() for t in str(v).split(sep) if t.strip()))
    return out


def incidence(sets: list[frozenset[str]]) -> tuple[sparse.csr_matrix, list[str]]:
    """Row × label 0/1 matrix of label sets, and the labels (sorted)."""
    vocab = sorted(set().union(*sets)) if sets else []
    index = {g: i for i, g in enumerate(vocab)}
    indptr = np.cumsum([0] + [len(s) for s in sets])
    cols = np.fromiter((index[g] for s in sets for g in sorted(s)), dtype=np.int64, count=int(indptr[-1]))
    m = sparse.csr_matrix((np.ones(len(cols), np.int32), cols, indptr), shape=(len(sets), len(vocab)))
    return m, vocab


def sharing_block(m: sparse.csr_matrix, mt: sparse.csr_matrix, start: int, stop: int) -> np.ndarray:
    """(stop - start, n) bool: rows start..stop-1 share at least one label with each row."""
    return (m[start:stop] @ mt).toarray() > 0


class TargetTask:
    """Target matching over the rows of ``profiles`` that have at least one target."""

    def __init__(self, profiles: pd.DataFrame, target_col: str, compound_col: str | None = None, k: int = 5,
                 sep: str = "|", id_cols: list[str] | None = None):
        df = profiles.reset_index(drop=True)
        self.targets = parse_targets(df[target_col], sep)
        self.has = np.array([bool(t) for t in self.targets], bool)
        if self.has.sum() < 2:
            raise CpvsError(f"fewer than two perturbations have a target in {target_col}")
        self.df, self.k, self.sep = df, k, sep
        n = len(df)
        self.compounds = df[compound_col].astype(str).to_numpy() if compound_col else np.arange(n).astype(str)
        self.comp = codes(pd.Series(self.compounds))
        self.genes, _ = incidence(self.targets)
        self.genes_t = self.genes.T.tocsr()
        self.id_cols = [c for c in (id_cols or []) if c in df.columns]
        kk = min(k, n)
        self.top = np.zeros((n, kk), np.int64)
        self.top_sim = np.full(n, -np.inf)
        self.hit1 = np.zeros(n, bool)
        self.hitk = np.zeros(n, bool)
        self.n_allowed = np.zeros(n, np.int64)
        self.n_sharing = np.zeros(n, np.int64)
        self.sums = np.zeros(4)  # distance sum and pair count: sharing pairs, other pairs

    def start(self, device) -> None:
        self._device = device
        self._comp = _tensor(self.comp, device)
        self._has = _tensor(self.has, device)

    def consume(self, start: int, stop: int, sim) -> None:
        import torch

        if not self.has[start:stop].any():
            return
        allowed = (self._comp[start:stop, None] != self._comp[None, :]) & self._has[None, :] & self._has[start:stop, None]
        shares = _tensor(sharing_block(self.genes, self.genes_t, start, stop), self._device)
        pos, neg = allowed & shares, allowed & ~shares
        n_pos, n_neg = pos.sum(), neg.sum()
        # Sum of 1 - s over a mask = count - sum of s: no block of distances.
        self.sums += np.array([float(n_pos - (sim * pos).sum()), float(n_pos), float(n_neg - (sim * neg).sum()), float(n_neg)])
        self.n_allowed[start:stop] = allowed.sum(1).cpu().numpy()
        self.n_sharing[start:stop] = pos.sum(1).cpu().numpy()
        vals, cols = topk_first(sim.masked_fill(~allowed, float("-inf")), self.k)
        hits = shares.gather(1, cols) & torch.isfinite(vals)
        self.top[start:stop] = cols.cpu().numpy()
        self.top_sim[start:stop] = vals[:, 0].cpu().numpy()
        self.hit1[start:stop] = hits[:, 0].cpu().numpy()
        self.hitk[start:stop] = hits.any(1).cpu().numpy()

    def result(self) -> TargetResult:
        q = np.flatnonzero(self.has & (self.n_allowed > 0))
        first = self.top[q, 0]
        join = self.sep.join
        neighbors = pd.DataFrame({
            **{c: self.df[c].to_numpy()[q] for c in self.id_cols},
            "targets": [join(sorted(self.targets[i])) for i in q], "neighbor": self.compounds[first],
            "neighbor_targets": [join(sorted(self.targets[j])) for j in first], "similarity": self.top_sim[q],
            "top1": self.hit1[q], f"top{self.k}": self.hitk[q],
        })
        s = self.sums
        # The chance a random candidate of the top-1 (another compound) shares a target with the
        # query, averaged over queries: what top-1 matching would score by guessing.
        chance = float(np.mean(self.n_sharing[q] / self.n_allowed[q])) if len(q) else float("nan")
        return TargetResult(len(q), int(self.hit1[q].sum()), int(self.hitk[q].sum()), self.k,
                            s[0] / s[1] if s[1] else float("nan"), s[2] / s[3] if s[3] else float("nan"), chance, neighbors)


def target_matching(profiles: pd.DataFrame, features: list[str], target_col: str, compound_col: str | None = None,
                    k: int = 5, sep: str = "|", id_cols: list[str] | None = None, device: str = "cpu",
                    progress: Progress | None = None) -> TargetResult:
    """Top-1 / top-k target matches among perturbations with at least one target, excluding
    a perturbation's own compound; MTdist over pairs of different compounds sharing a target."""
    task = TargetTask(profiles, target_col, compound_col, k, sep, id_cols)
    x = np.zeros((len(task.df), len(features)))
    x[task.has] = profile_matrix(task.df[task.has], features)  # rows without a target may hold anything
    scan(x, [task], resolve_device(device), progress=progress, stage="target matching")
    return task.result()
