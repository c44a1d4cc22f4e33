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
from cpvs.evaluate.engine import Progress, concat_ranges, first_allowed, resolve_device, scan, topk_first, unit_rows


MASK_CLASSES = 64  # most batches masked by a one-hot product (beyond: per-batch fills)


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
    table, then :meth:`result`. Per block the answer is the first allowed row of the block's
    shared top-k list, k = (most rows of one compound) + 1 at least, so NSC always finds it
    there; NSCB rows whose list holds only their own batch take a second, masked look.
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
        self.k = int(np.bincount(self.comp[kept]).max()) + 1  # holds a row of another compound
        # NSCB reads further down the shared list: the best row of another batch is usually there.
        self.top_k = self.k + (16 if across_batches else 0)
        # A class with one compound can never be matched (e.g. a positive control): not a query.
        n_compounds = df[kept].groupby(label_col)[compound_col].nunique()
        self.single = sorted(n_compounds[n_compounds < 2].index.astype(str))
        self.id_cols = [c for c in (id_cols or []) if c in df.columns]
        n = len(df)
        self.best = np.zeros(n, np.int64)
        self.sim = np.full(n, -np.inf)
        self.has = np.zeros(n, bool)

    def start(self, device, x) -> None:
        # The masked look subtracts 4 from excluded entries (cosines are >= -1, so they fall
        # below every allowed one; allowed entries get + 0, unchanged) with one product of
        # one-hot classes: row class c excludes column class c (its batch; class 0, held by
        # every row, marks the columns never allowed). With many batches the classes would
        # outweigh the block: then rows of one batch at a time, their columns filled with -inf.
        n_cls = 1 + (0 if self.batch is None else int(self.batch.max()) + 1)
        self._row_cls = None
        if n_cls <= MASK_CLASSES:
            rows, cols = np.zeros((len(self.kept), n_cls)), np.zeros((n_cls, len(self.kept)))
            rows[:, 0], cols[0] = 1, ~self.kept
            if self.batch is not None:
                rows[np.arange(len(self.batch)), 1 + self.batch] = 1
                cols[1 + self.batch, np.arange(len(self.batch))] = 1
            self._row_cls, self._col_cls = _tensor(rows, device), _tensor(cols, device)
        else:
            dropped = np.flatnonzero(~self.kept)
            self._excluded = [_tensor(np.union1d(dropped, np.flatnonzero(self.batch == b)), device) for b in range(n_cls - 1)]

    def consume(self, block) -> None:
        s, e = block.start, block.stop
        if not self.kept[s:e].any():
            return
        rows = np.arange(block.rows)
        vals, cols = block.top()
        best, valid, short = first_allowed(vals, cols, self._allowed(cols, s + rows, vals), 1)
        self._store(block, s + rows, best[:, 0], valid[:, 0])
        short &= self.kept[s:e]
        if not short.any():
            return
        # The shared list held no allowed row (NSCB: all of its own batch): a masked look.
        if self._row_cls is None:
            parts = [rows[short & (self.batch[s:e] == b)] for b in np.unique(self.batch[s:e][short])]
        else:
            parts = [rows[short]]
        for sub in parts:
            st = _tensor(sub, block.sim.device)
            if self._row_cls is None:
                masked = block.sim.index_select(0, st)
                masked.index_fill_(1, self._excluded[self.batch[s + sub[0]]], float("-inf"))
            elif len(sub) > block.rows // 2:  # most rows: mask the whole block in one product
                masked = torch_addmm(block.sim, self._row_cls[s:e], self._col_cls, block.scratch.tensor("masked", block.rows))
            else:
                masked = block.sim.index_select(0, st).addmm_(self._row_cls[s + st], self._col_cls, alpha=-4)
            v, c = topk_first(masked, self.k)
            v, c = v.cpu().numpy(), c.cpu().numpy()
            if len(v) != len(sub):
                v, c = v[sub], c[sub]
            best, valid, _ = first_allowed(v, c, self._allowed(c, s + sub, v), 1)
            self._store(block, s + sub, best[:, 0], valid[:, 0])

    def _allowed(self, cols: np.ndarray, q: np.ndarray, vals: np.ndarray) -> np.ndarray:
        """Candidates ``cols`` (len(q), k) that query rows ``q`` may match (masked ones hold < -2)."""
        ok = (self.comp[cols] != self.comp[q][:, None]) & self.kept[cols] & (vals > -2)
        if self.batch is not None:
            ok &= self.batch[cols] != self.batch[q][:, None]
        return ok

    def _store(self, block, q: np.ndarray, best: np.ndarray, valid: np.ndarray) -> None:
        self.best[q] = best
        self.has[q] = valid
        self.sim[q] = np.where(valid, _gather(block.sim, q - block.start, best), -np.inf)

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


def same_code_matrix(code: np.ndarray, among: np.ndarray) -> sparse.csr_matrix:
    """(n, n) 0/1: row i has the rows j in ``among`` (bool) with ``code[j] == code[i]``."""
    members = np.flatnonzero(among)
    members = members[np.argsort(code[members], kind="stable")]
    counts = np.bincount(code[members], minlength=int(code.max()) + 1)
    first = np.cumsum(counts) - counts
    starts, stops = first[code], first[code] + counts[code]
    cols = members[concat_ranges(starts, stops)]
    indptr = np.r_[0, np.cumsum(stops - starts)]
    return sparse.csr_matrix((np.ones(len(cols), np.int8), cols, indptr), shape=(len(code), len(code)))


def block_pairs(sub: sparse.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Nonzeros (row, column) of a sparse matrix, row by row."""
    sub = sub.tocsr()
    return np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr)), sub.indices.astype(np.int64)


def sharing_pairs(m: sparse.csr_matrix, m_t: sparse.csr_matrix, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(local row, column) of the rows start..stop-1 that share a label (``m``: row × label) with a row."""
    return block_pairs(m[start:stop] @ m_t)


class TargetTask:
    """Target matching over the rows of ``profiles`` that have at least one target.

    Per block: the first k allowed rows of the shared top-k list, k' = k + (most target rows
    of one compound) long, which holds them unless rows without a target come first (those
    rows take a masked look). What involves pairs sharing a target or a compound (hits, MTdist, the chance) comes from
    sparse lists of those pairs; the sum over all other pairs from one matrix-vector product.
    """

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
        self.same = same_code_matrix(self.comp, self.has)  # target rows of the same compound (self included)
        n_same = np.diff(self.same.indptr)
        self.kprime = k + int(n_same[self.has].max())  # holds k rows of other compounds
        self.top_k = self.kprime
        self.n_allowed = np.where(self.has, self.has.sum() - n_same, 0)
        self.id_cols = [c for c in (id_cols or []) if c in df.columns]
        self.top = np.zeros((n, k), np.int64)
        self.top_valid = np.zeros((n, k), bool)
        self.top_sim = np.full(n, -np.inf)
        self.hit1 = np.zeros(n, bool)
        self.hitk = np.zeros(n, bool)
        self.n_sharing = np.zeros(n, np.int64)
        self.sum_sharing = np.zeros(n)  # similarities to candidates sharing a target
        self.sum_allowed = np.zeros(n)  # similarities to all candidates

    def start(self, device, x) -> None:
        self._others = _tensor((~self.has).astype(float)[None, :], device)  # 1 x n: columns without a target
        self._total = x[_tensor(self.has, device)].sum(0)  # sum of the target rows: sims to all of them at once

    def consume(self, block) -> None:
        s, e = block.start, block.stop
        if not self.has[s:e].any():
            return
        sim = block.sim
        rows = np.arange(block.rows)
        vals, cols = block.top()
        top, valid, short = first_allowed(vals, cols, self._allowed(cols, s + rows, vals), self.k)
        short &= self.has[s:e]
        if short.any():  # rows without a target ahead in the list: push them below -2, look again
            sub = rows[short]
            masked = sim.index_select(0, _tensor(sub, sim.device))
            masked.addmm_(masked.new_ones((len(sub), 1)), self._others, alpha=-4)
            v, c = topk_first(masked, self.kprime)
            v, c = v.cpu().numpy(), c.cpu().numpy()
            top[sub], valid[sub], _ = first_allowed(v, c, self._allowed(c, s + sub, v), self.k)
        self.top[s:e], self.top_valid[s:e] = top, valid
        self.top_sim[s:e] = np.where(valid[:, 0], sim.gather(1, _tensor(top[:, :1], sim.device))[:, 0].cpu().numpy(), -np.inf)
        r, c = np.nonzero(valid)
        hits = np.zeros(valid.shape, bool)
        hits[r, c] = np.asarray(self.genes[s + r].multiply(self.genes[top[r, c]]).sum(1)).ravel() > 0
        self.hit1[s:e], self.hitk[s:e] = hits[:, 0], hits.any(1)
        # Pairs sharing a target, of another compound; then all candidates: total minus own compound.
        r, c = sharing_pairs(self.genes, self.genes_t, s, e)  # self included
        keep = self.comp[s + r] != self.comp[c]
        r, c = r[keep], c[keep]
        self.n_sharing[s:e] = np.bincount(r, minlength=block.rows)
        self.sum_sharing[s:e] = np.bincount(r, weights=_gather(sim, r, c), minlength=block.rows)
        r, c = block_pairs(self.same[s:e])
        own = np.bincount(r, weights=_gather(sim, r, c), minlength=block.rows)
        self.sum_allowed[s:e] = np.where(self.has[s:e], (block.x @ self._total).cpu().numpy() - own, 0)

    def _allowed(self, cols: np.ndarray, q: np.ndarray, vals: np.ndarray) -> np.ndarray:
        return (self.comp[cols] != self.comp[q][:, None]) & self.has[cols] & self.has[q][:, None] & (vals > -2)

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
        n_share, n_other = self.n_sharing[q].sum(), (self.n_allowed[q] - self.n_sharing[q]).sum()
        s_share = self.sum_sharing[q].sum()
        s_other = self.sum_allowed[q].sum() - s_share
        # The chance a random candidate of the top-1 (another compound) shares a target with the
        # query, averaged over queries: what top-1 matching would score by guessing.
        chance = float(np.mean(self.n_sharing[q] / self.n_allowed[q])) if len(q) else float("nan")
        return TargetResult(len(q), int(self.hit1[q].sum()), int(self.hitk[q].sum()), self.k,
                            float((n_share - s_share) / n_share) if n_share else float("nan"),
                            float((n_other - s_other) / n_other) if n_other else float("nan"), chance, neighbors)


def torch_addmm(sim, rows, cols, out):
    """``out = sim - 4 * rows @ cols``: the masked copy of a whole block in one product."""
    import torch

    return torch.addmm(sim, rows, cols, alpha=-4, out=out)


def _gather(sim, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``sim[rows, cols]`` as a CPU float64 array."""
    if not len(rows):
        return np.zeros(0)
    return sim[_tensor(rows, sim.device), _tensor(cols, sim.device)].cpu().numpy()


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
