"""cpvs' mean average precision engine, with copairs' definitions (copairs 0.5).

* **AP** of a query: its candidates are its positives and negatives, ranked by cosine
  similarity; copairs rounds similarities to float32 and sorts on ``1 - sim`` (float32), and
  a positive ranks before a negative with an equal key. AP = mean over positives of the
  precision at the positive's rank. Computed from the block engine's similarities by counting,
  for each positive, the negatives ranked ahead (:func:`~cpvs.evaluate.engine.average_precision_of_ranks`),
  so nothing of size queries × candidates is kept.
* **Normalized AP**: (AP − μ₀) / (1 − μ₀), μ₀ the expected AP of a random ranking.
* **Null distribution**: for each configuration (M positives, L candidates), ``null_size`` APs
  of a uniformly random placement of M positives among L ranks, stored as float32 and computed
  with copairs' float32 arithmetic. A group's null is the element-wise mean of its members'
  configuration nulls, as copairs does (members with the same configuration share one null).
* **p-value** of a group's mAP: (#{null > mAP} + 1) / (null_size + 1), compared in float32 as
  copairs does; **FDR**: Benjamini–Hochberg over groups (statsmodels' ``fdr_bh``).

The random stream differs from copairs': p-values agree within Monte-Carlo error, not bit for bit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from cpvs.evaluate.engine import (
    Progress, Scratch, all_cores, average_precision_of_ranks, block_rows, concat_ranges, cpu_cores, ranking_keys,
)
from cpvs.evaluate.retrieval import incidence, sharing_pairs

ROW = "Metadata_cpvs_row"  # the query's row in the input table


def expected_average_precision(m: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Expected AP of a random ranking of ``m`` positives and ``n`` negatives (copairs' μ₀)."""
    m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
    total = m + n
    # Harmonic numbers by a sequential float64 sum, bit for bit copairs' Python loop.
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(1, int(total.max(initial=1))) + 1))])
    h = harmonic[total]
    with np.errstate(divide="ignore", invalid="ignore"):
        mu = (1.0 / total) * (((m - 1.0) / (total - 1.0)) * (total - h) + h)
    mu = np.where(total == 1, (m == 1).astype(float), mu)
    mu = np.where(m == 0, 0.0, mu)
    return np.where((m == total) & (total > 1), 1.0, mu)


def normalized_average_precision(ap: np.ndarray, m: np.ndarray, n: np.ndarray, eps: float = 1e-10) -> np.ndarray:
    """(AP − μ₀) / (1 − μ₀), clipped to [−1, 1] (copairs' ``normalize_ap``)."""
    mu = expected_average_precision(m, n)
    return np.clip((np.asarray(ap, np.float64) - mu) / np.maximum(1 - mu, eps), -1.0, 1.0)


def _ap_frame(rows: np.ndarray, ap: np.ndarray, n_pos: np.ndarray, n_neg: np.ndarray, **meta) -> pd.DataFrame:
    keep = n_pos > 0  # no positive, no AP (copairs gives NaN and the mAP drops it)
    out = pd.DataFrame({ROW: rows[keep], **{k: np.asarray(v)[keep] for k, v in meta.items()},
                        "n_pos_pairs": n_pos[keep], "n_total_pairs": n_pos[keep] + n_neg[keep],
                        "average_precision": ap[keep]})
    out["normalized_average_precision"] = normalized_average_precision(ap[keep], n_pos[keep], n_neg[keep])
    return out


class AnnotationAPTask:
    """AP of each (perturbation, label) over one table, for :func:`~cpvs.evaluate.engine.scan`.

    ``labels``: one set per row (empty: the row takes no part, copairs' dropped rows). For a
    query row i and each of its labels g, the positives are the rows labelled g of another
    compound (``compounds`` codes; None: any other row) and the negatives the rows sharing no
    label with i: copairs' ``multilabel`` mode, which with one label per row is its plain mode
    (positives: same label, other compound; negatives: other label).

    Per block: the keys of each row's negatives (all labelled rows, the few sharing a label set
    to +inf) are sorted once; each positive's rank is a binary search in them.
    """

    def __init__(self, labels: list[frozenset[str]], compounds: np.ndarray | None = None):
        self.has = np.array([bool(s) for s in labels], bool)
        self.lab, self.vocab = incidence(labels)
        self.lab_t = self.lab.T.tocsr()
        self.comp = np.arange(len(labels)) if compounds is None else np.asarray(compounds, np.int64)
        self.unlabelled = np.flatnonzero(~self.has)
        # One AP per (row, label): the row-major nonzeros of the incidence matrix.
        self.exp_row = np.repeat(np.arange(len(labels)), np.diff(self.lab.indptr))
        self.exp_label = self.lab.indices.astype(np.int64)
        self.ap = np.full(len(self.exp_row), np.nan)
        self.n_pos = np.zeros(len(self.exp_row), np.int64)
        self.n_neg = np.zeros(len(self.exp_row), np.int64)

    def start(self, device, x) -> None:
        pass

    def consume(self, block) -> None:
        s, e = block.start, block.stop
        lo, hi = self.lab.indptr[s], self.lab.indptr[e]
        if lo == hi:
            return
        keys = block.keys()
        neg = block.scratch.array("negatives", block.rows)
        np.copyto(neg, keys)
        neg[:, self.unlabelled] = np.inf
        r, c = sharing_pairs(self.lab, self.lab_t, s, e)  # self included
        neg[r, c] = np.inf
        neg.sort(axis=1)
        n_negative = self.has.sum() - np.bincount(r, minlength=block.rows)
        q, g = self.exp_row[lo:hi], self.exp_label[lo:hi]
        starts, stops = self.lab_t.indptr[g], self.lab_t.indptr[g + 1]
        cols = self.lab_t.indices[concat_ranges(starts, stops)].astype(np.int64)
        ranking = np.repeat(np.arange(hi - lo), stops - starts)
        keep = self.comp[cols] != self.comp[q[ranking]]
        cols, ranking = cols[keep], ranking[keep]
        ap, n_pos = average_precision_of_ranks(neg, q - s, ranking, keys[q[ranking] - s, cols])
        self.ap[lo:hi], self.n_pos[lo:hi], self.n_neg[lo:hi] = ap, n_pos, n_negative[q - s]

    def frame(self, label_col: str, meta: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
        """One row per (query, label) with at least one positive: ``ROW``, ``label_col``,
        the ``meta`` columns (per input row), n_pos_pairs, n_total_pairs, AP, normalized AP."""
        extra = {k: np.asarray(v)[self.exp_row] for k, v in (meta or {}).items()}
        return _ap_frame(self.exp_row, self.ap, self.n_pos, self.n_neg,
                         **{label_col: np.asarray(self.vocab, dtype=object)[self.exp_label]}, **extra)


def _group_blocks(sizes: np.ndarray, rows: int) -> list[tuple[int, int]]:
    """Runs of consecutive groups holding about ``rows`` rows (a bigger group alone)."""
    out, first, filled = [], 0, 0
    for i, n in enumerate(sizes):
        if filled and filled + n > rows:
            out.append((first, i))
            first, filled = i, 0
        filled += n
    if len(sizes):
        out.append((first, len(sizes)))
    return out


def replicate_average_precision(unit: np.ndarray, groups: np.ndarray, negative: np.ndarray, device="cpu",
                                progress: Progress | None = None, block: int | None = None) -> pd.DataFrame:
    """AP of each non-control well retrieving the other wells of its group against the controls.

    ``unit`` (n, d): unit-norm profiles; ``groups`` (n,): perturbation codes; ``negative`` (n,):
    control wells. Positives of well i: the other non-control wells of its group; negatives:
    the control wells of another group (copairs with a reference index on the controls).
    Wells are visited group by group, groups of similar size together: similarities to the
    controls come from one product per block, those within groups from a batched product of
    the block's groups.
    """
    import torch

    groups = np.asarray(groups, np.int64)
    negative = np.asarray(negative, bool)
    ctrl, trt = np.flatnonzero(negative), np.flatnonzero(~negative)
    codes_, inverse, sizes = np.unique(groups[trt], return_inverse=True, return_counts=True)
    seq = np.lexsort((codes_, sizes))  # groups by size, then code
    place = np.empty(len(seq), np.int64)
    place[seq] = np.arange(len(seq))
    order = trt[np.argsort(place[inverse], kind="stable")]  # wells, group after group
    sizes, first = sizes[seq], np.cumsum(sizes[seq]) - sizes[seq]
    # A control of the query's own group is neither positive nor negative (copairs' rule).
    ctrl_of = {int(c): np.flatnonzero(groups[ctrl] == c) for c in np.intersect1d(groups[ctrl], codes_[seq])}
    n = len(order)
    ap, n_pos, n_neg = np.full(n, np.nan), np.zeros(n, np.int64), np.zeros(n, np.int64)
    device = torch.device(device)
    runs = [(ga, gb, first[ga], first[gb - 1] + sizes[gb - 1]) for ga, gb in _group_blocks(sizes, block or block_rows(len(ctrl), device))]
    with all_cores(), torch.no_grad():
        controls = torch.from_numpy(unit[ctrl]).to(device)
        scratch = Scratch(max((b - a for _, _, a, b in runs), default=1), len(ctrl), device)
        for ga, gb, a, b in runs:
            wells = order[a:b]
            q = torch.from_numpy(unit[wells]).to(device)
            sim = scratch.tensor("sim", b - a)
            torch.mm(q, controls.T, out=sim)
            neg = ranking_keys(sim, scratch.array("keys", b - a))
            n_neg[a:b] = len(ctrl)
            for g in range(ga, gb):
                mine = ctrl_of.get(int(codes_[seq[g]]))
                if mine is not None:
                    rows = np.arange(first[g] - a, first[g] - a + sizes[g])
                    neg[rows[:, None], mine[None, :]] = np.inf
                    n_neg[a + rows] -= len(mine)
            neg.sort(axis=1)
            # Within-group similarities: groups padded to the block's largest, one batched product.
            width = int(sizes[ga:gb].max())
            offset = np.arange(width)
            valid = offset[None, :] < sizes[ga:gb, None]
            idx = np.where(valid, first[ga:gb, None] + offset[None, :] - a, 0)
            padded = torch.from_numpy(np.where(valid[..., None], unit[wells[idx]], 0.0)).to(device)
            within = ranking_keys(torch.bmm(padded, padded.transpose(1, 2)).reshape(-1, width))
            gi, o, o2 = np.nonzero(valid[:, :, None] & valid[:, None, :] & (offset[:, None] != offset[None, :])[None])
            ap[a:b], n_pos[a:b] = average_precision_of_ranks(neg, np.arange(b - a), idx[gi, o], within[gi * width + o, o2])
            if progress is not None:
                progress("replicate retrieval", b, n)
    back = np.argsort(order, kind="stable")  # rows in table order
    return _ap_frame(order[back], ap[back], n_pos[back], n_neg[back])


# --- null distributions, p-values, FDR -------------------------------------------------------

def _sparse_subsets(rng: np.random.Generator, rows: int, k: int, total: int) -> np.ndarray:
    """(rows, k) sorted uniformly random k-subsets of 0..total-1, for 2k <= total.

    Draw k positions with replacement, then redraw the duplicates until none is left. Every
    step treats all positions alike (the law is invariant under relabelling 0..total-1), so
    the final k-subset is uniform; with 2k <= total a redraw collides with probability <= 1/2.
    """
    dtype = np.int32 if total < 2**31 else np.int64  # half the bytes to draw and sort
    r = rng.integers(0, total, size=(rows, k), dtype=dtype)
    r.sort(axis=1)
    bad = np.flatnonzero((r[:, 1:] == r[:, :-1]).any(axis=1))
    while len(bad):
        sub = r[bad]
        dup = np.zeros(sub.shape, bool)
        dup[:, 1:] = sub[:, 1:] == sub[:, :-1]
        sub[dup] = rng.integers(0, total, size=int(dup.sum()), dtype=dtype)
        sub.sort(axis=1)
        r[bad] = sub
        bad = bad[(sub[:, 1:] == sub[:, :-1]).any(axis=1)]
    return r


def _random_positions(rng: np.random.Generator, rows: int, m: int, total: int) -> np.ndarray:
    """(rows, m) sorted ranks (0-based) of m positives placed uniformly among ``total``."""
    if 2 * m <= total:
        return _sparse_subsets(rng, rows, m, total)
    free = _sparse_subsets(rng, rows, total - m, total)  # place the negatives instead
    mask = np.ones((rows, total), bool)
    np.put_along_axis(mask, free, False, axis=1)
    return np.nonzero(mask)[1].reshape(rows, m)


def _average_precision_of_ranks(rel_k: np.ndarray) -> np.ndarray:
    """copairs' ``compute.average_precision``: the same dtypes and float32 sums, so equal
    rankings give bit-equal APs (p-values compare them with float32 mAPs)."""
    num_pos = rel_k.shape[1]
    pr_k = np.arange(1, num_pos + 1, dtype=np.float32) / (rel_k + 1)
    return (pr_k.sum(axis=1) / num_pos).astype(np.float32)


def null_average_precision(m: int, total: int, null_size: int, seed: int) -> np.ndarray:
    """``null_size`` float32 APs of ``m`` positives placed at random among ``total`` candidates.

    The stream is seeded by (seed, m, total): a configuration's null does not depend on which
    other configurations a table has.
    """
    if m >= total:
        return np.ones(null_size, np.float32)
    rng = np.random.default_rng([seed, m, total])
    dtype = np.uint16 if total < 2**16 else np.uint32  # copairs' rank dtype (it sets the float width)
    out = np.empty(null_size, np.float32)
    step = max(1, 2**21 // max(m, total if 2 * m > total else 1))
    for s in range(0, null_size, step):
        rows = min(step, null_size - s)
        out[s:s + rows] = _average_precision_of_ranks(_random_positions(rng, rows, m, total).astype(dtype))
    return out


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values, statsmodels' ``multipletests(method="fdr_bh")`` step by step."""
    p = np.asarray(p, np.float64)
    if not len(p):
        return p.copy()
    order = np.argsort(p)
    ecdf = np.arange(1, len(p) + 1) / float(len(p))
    adjusted = np.minimum.accumulate((p[order] / ecdf)[::-1])[::-1]
    adjusted[adjusted > 1] = 1
    out = np.empty_like(adjusted)
    out[order] = adjusted
    return out


def mean_average_precision(ap: pd.DataFrame, sameby: list[str], null_size: int, threshold: float, seed: int,
                           progress: Progress | None = None) -> pd.DataFrame:
    """mAP per group of ``sameby`` with p-values and BH-corrected p-values: the columns of
    ``copairs.map.mean_average_precision`` (sameby…, mean_average_precision, indices,
    mean_normalized_average_precision, p_value, corrected_p_value, below_p, below_corrected_p)."""
    ap = ap[ap["average_precision"].notna() & (ap["n_pos_pairs"] > 0)].reset_index(drop=True)
    confs, conf_of = np.unique(ap[["n_pos_pairs", "n_total_pairs"]].to_numpy(np.int64), axis=0, return_inverse=True)
    conf_of = conf_of.ravel()
    nulls = np.empty((len(confs), null_size), np.float32)

    def build(i: int) -> None:
        nulls[i] = null_average_precision(int(confs[i][0]), int(confs[i][1]), null_size, seed)

    # numpy releases the GIL while drawing, sorting and summing: configurations in threads use
    # every core, and each has its own generator, so the result does not depend on scheduling.
    with ThreadPoolExecutor(cpu_cores()) as pool:
        for done, _ in enumerate(pool.map(build, range(len(confs))), 1):
            if progress is not None:
                progress("mAP null distributions", done, len(confs))
    grouped = ap.groupby(sameby, observed=True, sort=True)
    out = grouped[["average_precision", "normalized_average_precision"]].mean().reset_index()
    out.columns = list(sameby) + ["mean_average_precision", "mean_normalized_average_precision"]
    gid = grouped.ngroup().to_numpy()
    members = np.argsort(gid, kind="stable")
    bounds = np.cumsum(np.bincount(gid, minlength=len(out)))[:-1]
    member_lists = np.split(members, bounds)
    out.insert(len(sameby) + 1, "indices", [m.tolist() for m in member_lists])
    # A group's null is the mean of its members' nulls (copairs' float32 mean); groups made
    # of the same configurations share it, so each distinct null is built and sorted once.
    score32 = out["mean_average_precision"].to_numpy().astype(np.float32)
    keys: dict[tuple, list[int]] = {}
    for g, mem in enumerate(member_lists):
        c = conf_of[mem]
        keys.setdefault(("same", int(c[0]), len(c)) if (c == c[0]).all() else tuple(c.tolist()), []).append(g)
    p = np.empty(len(out))
    for key, gs in keys.items():
        confs_of_group = np.full(key[2], key[1]) if key[0] == "same" else np.asarray(key)
        null = np.sort(nulls[confs_of_group].mean(axis=0))
        above = null_size - np.searchsorted(null, score32[gs], side="right")
        p[gs] = (above + 1) / (null_size + 1)
    out["p_value"] = p
    out["corrected_p_value"] = benjamini_hochberg(p)
    out["below_p"] = out["p_value"] < threshold
    out["below_corrected_p"] = out["corrected_p_value"] < threshold
    return out
