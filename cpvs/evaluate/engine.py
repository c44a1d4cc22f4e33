"""Block-wise cosine retrieval: the one engine behind NSC/NSCB, target matching and mAP.

Profiles are L2-normalized once (float64; a zero row stays zero and has similarity 0 with
everything). Similarities are computed for a block of query rows against all candidates at a
time, ``queries[block] @ candidates.T`` in torch on the chosen device, and handed to *tasks*
that keep only what they need (a top-k, rank counts): the n × n matrix never exists, memory
is ``block × n``. Several tasks share one pass (:func:`scan`), so NSC, NSCB, target matching
and the MOA/target mAP of one treatment table cost one matrix product.

What a task may do per block is chosen for cost, since at 10⁵ rows every pass over the
block counts: a top-k (torch), one sort of float32 ranking keys per row (numpy's vectorized
sort is ~20x faster than torch's on CPU), and gathers of the few entries that rules single
out (same compound, same label: sparse index lists). Masks of the block's size are avoided.

Similarities stay float64 on every device: neighbours then equal a brute-force float64
computation, and ranks equal copairs' (which rounds float64 cosines to float32) without
near-tie corrections. Float32 would be ~1.7x faster on CPU but moves near-ties.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

import numpy as np

Progress = Callable[..., None]  # (stage, completed, total, info="")

# Bytes of float64 similarities per block. Tasks keep a few buffers of the same shape
# (float32 keys, one sorted copy, one masked copy), so a block costs ~3x this.
BLOCK_BYTES_CPU = 48 * 2**20
BLOCK_BYTES_GPU = 512 * 2**20


def unit_rows(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit L2 norm, float64; all-zero rows stay zero.

    ``inplace`` reuses ``x`` when it already is a float64 array (no second n × d copy).
    """
    x = np.asarray(x, dtype=np.float64) if inplace else np.array(x, dtype=np.float64)
    for s in range(0, len(x), 8192):  # row chunks: no n × d temporary of squares
        blk = x[s:s + 8192]
        norms = np.sqrt(np.einsum("ij,ij->i", blk, blk))[:, None]
        np.divide(blk, norms, out=blk, where=norms > 0)
    return x


def resolve_device(spec="auto"):
    """``auto`` (the first GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``; a
    ``torch.device`` passes through."""
    from cpvs.device import resolve_device as _resolve

    return _resolve(spec) if isinstance(spec, str) else spec


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@contextmanager
def all_cores() -> Iterator[None]:
    """Let torch use every core this process may run on (torch defaults to the physical
    cores it sees, which under a CPU affinity mask can be more than allowed)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(cpu_cores())
    try:
        yield
    finally:
        torch.set_num_threads(before)


def block_rows(n_candidates: int, device, block_bytes: int | None = None) -> int:
    """Query rows per block so that a block of float64 similarities fits ``block_bytes``."""
    budget = block_bytes or (BLOCK_BYTES_GPU if getattr(device, "type", "cpu") == "cuda" else BLOCK_BYTES_CPU)
    return int(max(1, min(65536, budget // (8 * max(1, n_candidates)))))


class Scratch:
    """Buffers of ``rows × n`` reused from block to block (fresh large arrays cost page faults)."""

    def __init__(self, rows: int, n: int, device):
        self.rows, self.n, self.device = rows, n, device
        self._np: dict[str, np.ndarray] = {}
        self._torch: dict[str, object] = {}

    def array(self, name: str, rows: int, dtype=np.float32) -> np.ndarray:
        if name not in self._np:
            self._np[name] = np.empty((self.rows, self.n), dtype)
        return self._np[name][:rows]

    def tensor(self, name: str, rows: int, dtype=None):
        import torch

        if name not in self._torch:
            self._torch[name] = torch.empty((self.rows, self.n), dtype=dtype or torch.float64, device=self.device)
        return self._torch[name][:rows]


class Block:
    """Rows ``start..stop-1`` (unit rows ``x``) and their similarities ``sim`` (rows, n) with
    every row; derived arrays several tasks need are computed once."""

    def __init__(self, start: int, stop: int, x, sim, scratch: Scratch, top_k: int = 0):
        self.start, self.stop, self.x, self.sim, self.scratch = start, stop, x, sim, scratch
        self.top_k = top_k
        self._keys: np.ndarray | None = None
        self._top = None

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def keys(self) -> np.ndarray:
        """copairs' ranking keys ``1 - float32(sim)`` (float32, CPU), see :func:`ranking_keys`."""
        if self._keys is None:
            self._keys = ranking_keys(self.sim, self.scratch.array("keys", self.rows))
        return self._keys

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`topk_first` of each row over all columns, ``top_k`` long (the most any task
        asked for), as CPU numpy (values, columns): one top-k pass shared by the tasks; each
        keeps its allowed entries (small arrays: numpy is quicker than torch's per-op cost)."""
        if self._top is None:
            vals, cols = topk_first(self.sim, self.top_k)
            self._top = vals.cpu().numpy(), cols.cpu().numpy()
        return self._top


class BlockTask(Protocol):
    """Something computed from blocks of similarities of one table with itself.

    ``top_k``: the length of the shared per-row top-k list the task reads (0: none).
    """

    top_k: int

    def start(self, device, x) -> None:
        """Before the first block: ``x`` (n, d), the unit rows on ``device``."""

    def consume(self, block: Block) -> None:
        """Take what the task needs from one block."""


def scan(unit: np.ndarray, tasks: Iterable[BlockTask], device="cpu", block: int | None = None,
         progress: Progress | None = None, stage: str = "similarities") -> None:
    """Feed every task the similarities of ``unit`` (n, d unit rows) with itself, block by block."""
    import torch

    tasks = list(tasks)
    if not tasks:
        return
    device = torch.device(device)
    n = len(unit)
    with all_cores(), torch.no_grad():
        x = torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float64)).to(device)
        for t in tasks:
            t.start(device, x)
        step = block or block_rows(n, device)
        scratch = Scratch(min(step, n), n, device)
        top_k = max(getattr(t, "top_k", 0) for t in tasks)
        for start in range(0, n, step):
            stop = min(n, start + step)
            sim = scratch.tensor("sim", stop - start)
            torch.mm(x[start:stop], x.T, out=sim)
            blk = Block(start, stop, x[start:stop], sim, scratch, top_k)
            for t in tasks:
                t.consume(blk)
            if progress is not None:
                progress(stage, stop, n)


def ranking_keys(sim, out: np.ndarray | None = None) -> np.ndarray:
    """copairs' ranking key of a similarity: ``1 - float32(sim)`` in float32, ascending.

    copairs stores cosines as float32 and sorts on ``1 - sim``; two candidates whose keys are
    equal are tied, and a positive ranks before a negative it is tied with. Returns a CPU
    float32 array (``out`` when given).
    """
    import torch

    if sim.device.type != "cpu":
        keys = (1 - sim.to(torch.float32)).cpu().numpy()
        if out is None:
            return keys
        out[...] = keys
        return out
    s = sim.numpy()
    out = np.empty(s.shape, np.float32) if out is None else out
    np.copyto(out, s, casting="same_kind")  # round to float32 first, then 1 - x in float32
    np.subtract(np.float32(1), out, out=out)
    return out


def topk_first(masked, k: int):
    """Top-``k`` values per row, largest first, ties broken by the lower column index
    (``np.argsort(-x, kind="stable")``'s order, which torch.topk does not promise).

    ``masked`` (B, n): excluded entries hold -inf. Returns (values, indices), (B, min(k, n));
    a row with fewer than k finite entries has -inf values in its last places. One
    ``topk`` pass; only rows with a tie across the k-th place take a second look.
    """
    import torch

    n = masked.shape[1]
    kk = min(k, n)
    vals, cols = masked.topk(min(kk + 1, n), dim=1)
    tied = vals[:, kk - 1] == vals[:, kk] if n > kk else torch.zeros(len(vals), dtype=torch.bool, device=vals.device)
    vals, cols = vals[:, :kk], cols[:, :kk]
    order = cols.argsort(dim=1)  # the set is right; order it by (value desc, column asc)
    vals, cols = vals.gather(1, order), cols.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    vals, cols = vals.gather(1, order), cols.gather(1, order)
    if bool(tied.any()):
        rows = tied.nonzero()[:, 0]
        vals[rows], cols[rows] = _topk_first_tied(masked[rows], kk)
    return vals, cols


def _topk_first_tied(masked, kk: int):
    """:func:`topk_first` for rows with ties at the k-th place: all entries above the k-th
    value, then the tied ones in column order."""
    import torch

    kth = masked.topk(kk, dim=1).values[:, -1:]
    above = masked > kth
    equal = masked == kth
    need = kk - above.sum(1, keepdim=True)
    take = above | (equal & (equal.cumsum(1) <= need))
    cols = take.nonzero()[:, 1].view(masked.shape[0], kk)
    vals = masked.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def first_allowed(vals: np.ndarray, cols: np.ndarray, allowed: np.ndarray, k: int):
    """From top-k' lists (:func:`topk_first`, as numpy) keep the first ``k`` entries that are
    allowed: (cols (B, k), valid (B, k), short (B,)); invalid places hold column 0.
    ``short``: rows with fewer than k such entries whose list may go on (its last value is
    finite): their answer may lie beyond the list."""
    rank = np.cumsum(allowed, axis=1)
    keep = allowed & (rank <= k)
    out = np.zeros((len(cols), k), cols.dtype)
    valid = np.zeros((len(cols), k), bool)
    r, c = np.nonzero(keep)
    out[r, rank[r, c] - 1] = cols[r, c]
    valid[r, rank[r, c] - 1] = True
    short = (keep.sum(1) < k) & np.isfinite(vals[:, -1])
    return out, valid, short


def average_precision_of_ranks(neg_sorted: np.ndarray, group_row: np.ndarray, pos_group: np.ndarray,
                               pos_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of rankings, from each row's negatives and each ranking's positives.

    ``neg_sorted`` (R, n): per row, the ranking keys of its negatives in ascending order
    (+inf where a column is not a negative); ``group_row`` (G,): the row of each ranking,
    ascending (one row can hold several rankings, e.g. one per target); positives: their
    ranking and their key. A negative ranks before a positive when its key is smaller (ties
    go to the positive), so the i-th positive in key order sits at rank ``i + c_i``, c_i the
    negatives with a smaller key, and AP = mean_i i / (i + c_i): copairs' definition.
    Returns AP (NaN without positives) and the number of positives per ranking.
    """
    n_groups = len(group_row)
    # One float64 sort orders positives by (ranking, key): keys are float32 in [0, 2], so
    # ranking * 4 + key is exact and its parts come back by floor division.
    packed = np.sort(pos_group * 4.0 + pos_keys)
    pos_group = (packed // 4).astype(np.int64)
    pos_keys = (packed - pos_group * 4.0).astype(np.float32)
    rows = group_row[pos_group]
    ahead = np.empty(len(pos_keys), np.int64)
    cuts = np.flatnonzero(np.diff(rows)) + 1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)]):
        if hi > lo:
            ahead[lo:hi] = np.searchsorted(neg_sorted[rows[lo]], pos_keys[lo:hi], side="left")
    n_pos = np.bincount(pos_group, minlength=n_groups)
    first = np.cumsum(n_pos) - n_pos
    i = np.arange(1, len(pos_group) + 1) - first[pos_group]
    total = np.bincount(pos_group, weights=i / (i + ahead), minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        return total / n_pos, n_pos


def concat_ranges(starts: np.ndarray, stops: np.ndarray) -> np.ndarray:
    """``np.concatenate([np.arange(a, b) for a, b in zip(starts, stops)])`` without the loop."""
    lengths = stops - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total) + offsets
