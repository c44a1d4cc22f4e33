"""The tile strategy of staining models (U-Net, cWGAN generator, linear baseline).

Per field: the normalized input planes are cut into overlapping tiles, tiles of several
fields share a batch, each output pixel is the median (or mean) of the tiles covering it
(METHODS §4). Reading, inference and writing overlap: reader threads prepare the next
fields while the device works, writer threads stitch and write finished fields.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.jobs import release_freed_memory
from cpvs.plate.layout import Field
from cpvs.predict.config import TileOptions
from cpvs.predict.tiling import extract_tiles, pad_to_tile, stitch, tile_grid


TRIM_EVERY = 32  # fields between handing freed memory back (keeps RSS flat over long plates)


def written_channels(cfg, outputs: list[str]) -> list[str]:
    return list(outputs)


def run(job, progress) -> tuple[int, list[dict], dict]:
    """Predict the plan's remaining fields; (fields written, skipped fields, extra run-record entries)."""
    cfg, opts, net, device = job.cfg, job.cfg.resolved(TileOptions), job.model.net, job.device
    if opts.tile % net.multiple:
        raise CpvsError(f"--tile {opts.tile} must be a multiple of {net.multiple} for this model")
    n_out, plan = len(job.outputs), job.plan

    def prepare(f: Field):
        """Raw input planes -> normalized tiles, as the training store was made."""
        x, native = job.normalizer.read(f)
        padded, shape = pad_to_tile(x, opts.tile)
        corners = tile_grid(padded.shape[1:], opts.tile, opts.stride)
        return f, native, shape, padded.shape[1:], extract_tiles(padded, corners, opts.tile)

    def prepare_or_error(f: Field):
        try:
            return prepare(f), None
        except CpvsError as e:
            return (f,), e

    def finish(f: Field, native, shape, padded_shape, tiles: np.ndarray) -> None:
        pred = stitch(tiles, padded_shape, opts.tile, opts.stride, opts.stitch)[:, : shape[0], : shape[1]]
        job.writer.write(f, native, pred)

    written = 0
    skipped: list[dict] = []
    readers = ThreadPoolExecutor(max(1, cfg.workers))
    writers = ThreadPoolExecutor(max(1, cfg.workers))
    writes: deque[Future] = deque()
    pending: dict[str, list] = {}  # key -> [field, native, shape, padded_shape, out tiles, remaining]
    buffer: list[tuple[str, int, np.ndarray]] = []

    def run_batch(items) -> None:
        x = np.stack([t for _, _, t in items])
        if len(items) < job.batch_size:  # same shape every call: results never depend on batch composition
            x = np.concatenate([x, np.zeros((job.batch_size - len(items), *x.shape[1:]), x.dtype)])
        with torch.inference_mode(), autocast(device, cfg.precision):
            y = net(torch.from_numpy(x).to(device)).float().cpu().numpy()
        for (key, j, _), pred in zip(items, y):
            entry = pending[key]
            entry[4][j] = pred
            entry[5] -= 1
            if entry[5] == 0:
                del pending[key]
                writes.append(writers.submit(finish, *entry[:5]))

    def drain(block: bool) -> None:
        nonlocal written
        while writes and (block or writes[0].done()):
            writes.popleft().result()  # re-raises write errors (e.g. disk full)
            written += 1
            if written % TRIM_EVERY == 0:
                release_freed_memory()
            progress("fields", len(plan.done) + written, len(plan.fields))

    try:
        prefetch: deque[Future] = deque()
        queue = iter(plan.todo)
        for f in queue:
            prefetch.append(readers.submit(prepare_or_error, f))
            if len(prefetch) >= 2 * max(1, cfg.workers):
                break
        while prefetch:
            fut = prefetch.popleft()
            nxt = next(queue, None)
            if nxt is not None:
                prefetch.append(readers.submit(prepare_or_error, nxt))
            prepared, err = fut.result()
            if err is not None:
                if cfg.on_error != "skip":
                    raise err
                skipped.append({"field": prepared[0].key, "reason": err.render()})
                continue
            f, native, shape, padded_shape, tiles = prepared
            pending[f.key] = [f, native, shape, padded_shape,
                              np.empty((len(tiles), n_out, opts.tile, opts.tile), np.float32), len(tiles)]
            buffer += [(f.key, j, t) for j, t in enumerate(tiles)]
            while len(buffer) >= job.batch_size:
                run_batch(buffer[: job.batch_size])
                buffer = buffer[job.batch_size :]
            drain(block=False)
        if buffer:
            run_batch(buffer)
        drain(block=True)
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)
    return written, skipped, {}
