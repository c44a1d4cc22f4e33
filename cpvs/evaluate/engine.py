"""Block-wise cosine retrieval: the one engine behind NSC/NSCB, target matching and mAP.

Profiles are L2-normalized once (float64; a zero row stays zero and has similarity 0 with
everything). Similarities are computed for a block of query rows against all candidates at a
time, ``queries[block] @ candidates.T`` in torch on the chosen device, and handed to *tasks* that
keep only what they need (a top-k, a rank count): the n × n matrix never exists, memory is
``block × n``. Several tasks can share one pass (:func:`scan`), so NSC, NSCB, target matching
and the MOA/target mAP of one treatment table cost one matrix product.

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

# Bytes of similarities per block (float64). Tasks make a few same-sized temporaries (masks,
# keys, rank counts), so a CPU block costs ~5x this; the GPU has room for larger blocks.
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


@contextmanager
def all_cores() -> Iterator[None]:
    """Let torch use every core this process may run on (torch defaults to the physical
    cores it sees, which under a CPU affinity mask can be more than allowed)."""
    import torch

    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def block_rows(n_candidates: int, device, block_bytes: int | None = None) -> int:
    """Query rows per block so that a block of float64 similarities fits ``block_bytes``."""
    budget = block_bytes or (BLOCK_BYTES_GPU if getattr(device, "type", "cpu") == "cuda" else BLOCK_BYTES_CPU)
    return int(max(1, min(65536, budget // (8 * max(1, n_candidates)))))


class BlockTask(Protocol):
    """Something computed from blocks of similarities of one table with itself."""

    def start(self, device) -> None:
        """Move the task's codes and masks to ``device`` before the first block."""

    def consume(self, start: int, stop: int, sim) -> None:
        """``sim`` (stop - start, n): cosine similarities of rows start..stop-1 with all rows."""


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
            t.start(device)
        step = block or block_rows(n, device)
        for start in range(0, n, step):
            stop = min(n, start + step)
            sim = x[start:stop] @ x.T
            for t in tasks:
                t.consume(start, stop, sim)
            if progress is not None:
                progress(stage, stop, n)


def topk_first(masked, k: int):
    """Top-``k`` values per row, largest first, ties broken by the lower column index
    (``np.argsort(-x, kind="stable")``'s order, which torch.topk does not promise).

    ``masked`` (B, n): excluded entries hold -inf. Returns (values, indices), (B, min(k, n));
    a row with fewer than k finite entries has -inf values in its last places.
    """
    import torch

    kk = min(k, masked.shape[1])
    kth = masked.topk(kk, dim=1).values[:, -1:]
    above = masked > kth
    need = kk - above.sum(1, keepdim=True)
    equal = masked == kth
    tied = equal.sum(1, keepdim=True) > need
    take = above | equal
    if bool(tied.any()):  # keep only the first `need` of the tied entries, by column
        rows = tied.squeeze(1)
        e = equal[rows]
        take[rows] = above[rows] | (e & (e.cumsum(1) <= need[rows]))
    cols = take.nonzero()[:, 1].view(masked.shape[0], kk)  # ascending columns per row
    vals = masked.gather(1, cols)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return vals.gather(1, order), cols.gather(1, order)


def ranking_keys(sim):
    """copairs' ranking key of a similarity: ``1 - float32(sim)`` in float32, ascending.

    copairs stores cosines as float32 and sorts on ``1 - sim``; two candidates whose keys are
    equal are tied, and a positive ranks before a negative it is tied with.
    """
    return 1 - sim.to(dtype=_float32())


def average_precision_from_keys(pos_keys, neg_keys, neg_mask=None):
    """Average precision per row from ranking keys, without sorting the negatives.

    ``pos_keys`` (E, P): the positives' keys in ascending order, padded with +inf;
    ``neg_keys`` (E, n): candidate keys, of which ``neg_mask`` (E, n; all when None) are the
    negatives. A negative ranks before the i-th positive when its key is smaller (ties go to the
    positive), so with ``c[i]`` negatives ahead of it the i-th positive sits at rank ``i + c[i]``
    and AP = mean_i i / (i + c[i]), copairs' definition. Returns float64 AP (NaN without
    positives), the number of positives and the number of negatives, as CPU numpy arrays.
    """
    import torch

    e, p = pos_keys.shape
    n_pos = torch.isfinite(pos_keys).sum(1)
    # How many positives rank ahead of each negative: 0..P; non-negatives go to bin P + 1.
    ahead = torch.searchsorted(pos_keys, neg_keys.contiguous(), right=True)
    if neg_mask is not None:
        ahead.masked_fill_(~neg_mask, p + 1)
    hist = torch.zeros((e, p + 2), dtype=torch.int64, device=pos_keys.device)
    hist.scatter_add_(1, ahead, torch.ones_like(ahead))
    n_neg = hist[:, : p + 1].sum(1)
    before = hist[:, :p].cumsum(1).to(torch.float64)  # negatives ahead of positive i (1-based i)
    i = torch.arange(1, p + 1, dtype=torch.float64, device=pos_keys.device)
    prec = torch.where(i[None, :] <= n_pos[:, None], i / (i + before), torch.zeros((), dtype=torch.float64, device=pos_keys.device))
    with np.errstate(divide="ignore", invalid="ignore"):
        ap = (prec.sum(1) / n_pos).cpu().numpy()
    return ap, n_pos.cpu().numpy(), n_neg.cpu().numpy()


def positive_keys(keys, pos_mask, width: int | None = None):
    """The keys of each row's positives in ascending order, +inf padded to ``width`` columns."""
    import torch

    width = int(pos_mask.sum(1).max()) if width is None else width
    if width == 0:
        return torch.full((keys.shape[0], 0), float("inf"), dtype=keys.dtype, device=keys.device)
    masked = torch.where(pos_mask, keys, torch.full((), float("inf"), dtype=keys.dtype, device=keys.device))
    return masked.topk(width, dim=1, largest=False, sorted=True).values


def _float32():
    import torch

    return torch.float32
