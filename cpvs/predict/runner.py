"""``cpvs predict-plate``: a whole plate of brightfield fields -> predicted Cell Painting TIFFs.

Per field: read the input planes, apply the checkpoint's own preprocessing
(illumination correction estimated on this plate, resize, z-score, clip), cut
overlapping tiles, predict them in batches that mix fields, stitch by the median,
undo the resize and the normalization, and write one TIFF per channel with the
input plate's naming plus ``load_data.csv``, ``channel_map.csv`` and the platemap.

Reading, inference and writing overlap: reader threads prepare the next fields
while the device works, writer threads stitch and write finished fields. Every
file is written under a temporary name and renamed; a field is finished when all
its channel files exist, so a rerun skips it. ``shard=(i, n)`` takes every n-th
field starting at the i-th, a deterministic disjoint part of the plate.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cpvs.device import resolve_device
from cpvs.errors import CpvsError
from cpvs.models import build_model
from cpvs.plate.channels import ChannelMap
from cpvs.plate.discover import CHANNEL_MAP_NAME, discover_plate
from cpvs.plate.layout import Field, Plate
from cpvs.plate.loaddata import write_load_data
from cpvs.plate.naming import phenix_name
from cpvs.plate.tiff import write_image
from cpvs.predict.tiling import extract_tiles, pad_to_tile, stitch, tile_grid
from cpvs.preprocess.apply import FieldNormalizer
from cpvs.preprocess.normalize import resize_image
from cpvs.runinfo import atomic_path, plain, write_run_record
from cpvs.train.checkpoint import load_checkpoint
from cpvs.train.runtime import autocast, check_precision

Progress = Callable[..., None]


@dataclass
class PredictConfig:
    plate: Path
    out: Path
    checkpoint: Path
    model: str | None = None  # expected family; None accepts any
    channel_map: str | None = None
    platemap: Path | None = None
    plate_name: str | None = None
    tile: int = 256
    stride: int = 128
    stitch: str = "median"
    batch_size: int = 16
    device: str = "auto"
    precision: str = "bf16"
    dtype: str = "uint16"
    shard: tuple[int, int] = (1, 1)
    workers: int = 2
    illum_fields: int = 256
    on_error: str = "raise"


@dataclass
class PredictResult:
    out: Path
    channels: list[str]
    n_fields: int  # in this shard
    n_written: int
    n_resumed: int
    seconds: float
    device: str
    skipped: list[dict] = field(default_factory=list)


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"2/3"`` -> (2, 3); shards are numbered from 1."""
    if not text:
        return (1, 1)
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise CpvsError(f"--shard must look like I/N (e.g. 2/3), got {text!r}") from None
    if not 1 <= i <= n:
        raise CpvsError(f"--shard {text}: I must be between 1 and N")
    return i, n


def shard_fields(fields: list[Field], shard: tuple[int, int]) -> list[Field]:
    """Every n-th field from the i-th (fields in plate order): disjoint, covering, and balanced over wells."""
    i, n = shard
    return fields[i - 1 :: n]


def output_names(plate: Plate, channels: list[str]) -> tuple[Callable[[Field, str], str], ChannelMap | None]:
    """File naming of the predicted plate: the input's Phenix numbering where the input
    map names a channel (new numbers after it otherwise), else ``PLATE_WELL_sSITE_CH.tiff``."""
    if plate.layout == "phenix" and plate.channel_map is not None:
        numbers = {name: ch for (ch, _), name in plate.channel_map.entries}
        nxt = max([ch for (ch, _), _ in plate.channel_map.entries] + [0]) + 1
        for c in channels:
            if c not in numbers:
                numbers[c], nxt = nxt, nxt + 1
        cmap = ChannelMap(tuple(((numbers[c], None), c) for c in channels), "predicted plate")
        return (lambda f, c: phenix_name(f.well, f.site, numbers[c])), cmap
    return (lambda f, c: f"{f.plate}_{f.well}_s{f.site}_{c}.tiff"), None


def predict_plate(cfg: PredictConfig, progress: Progress | None = None) -> PredictResult:
    t0 = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    check_precision(cfg.precision)
    if cfg.dtype not in ("uint16", "float32"):
        raise CpvsError(f"--dtype must be uint16 or float32, got {cfg.dtype!r}")
    ck = load_checkpoint(cfg.checkpoint)
    if cfg.model and ck["family"] != cfg.model:
        raise CpvsError(f"--model {cfg.model} but the checkpoint is a {ck['family']} model", ck["path"],
                        f"pass --model {ck['family']} or another checkpoint")
    device = resolve_device(cfg.device)
    model = build_model(ck["family"], ck["hparams"])
    model.load_state_dict(ck["state_dict"])
    model.eval().to(device)
    if cfg.tile % model.multiple:
        raise CpvsError(f"--tile {cfg.tile} must be a multiple of {model.multiple} for this model")
    inputs, outputs, norm = ck["inputs"], ck["outputs"], ck["normalization"]

    plate = discover_plate(cfg.plate, channel_map=cfg.channel_map, channels=inputs, plate_name=cfg.plate_name,
                           platemap=cfg.platemap, on_error=cfg.on_error)
    out = Path(cfg.out)
    name_of, todo_all, done, todo = plan_outputs(plate, out, outputs, cfg.shard)

    cache = out / ".cpvs-cache"
    cache.mkdir(exist_ok=True)
    normalizer = FieldNormalizer.for_plate(plate, inputs, norm, cfg.illum_fields, cache, cfg.workers)
    stats = norm["channel_stats"]
    mean = np.array([stats[c]["mean"] for c in outputs], dtype=np.float32)[:, None, None]
    std = np.array([stats[c]["std"] for c in outputs], dtype=np.float32)[:, None, None]

    def prepare(f: Field):
        """Raw input planes -> normalized tiles, as the training store was made."""
        x, native = normalizer.read(f)
        padded, shape = pad_to_tile(x, cfg.tile)
        corners = tile_grid(padded.shape[1:], cfg.tile, cfg.stride)
        return f, native, shape, padded.shape[1:], extract_tiles(padded, corners, cfg.tile)

    def prepare_or_error(f: Field):
        try:
            return prepare(f), None
        except CpvsError as e:
            return (f,), e

    def finish(f: Field, native, shape, padded_shape, tiles: np.ndarray) -> None:
        pred = stitch(tiles, padded_shape, cfg.tile, cfg.stride, cfg.stitch)[:, : shape[0], : shape[1]]
        if tuple(shape) != tuple(native):
            pred = np.stack([resize_image(p, native, norm["resize_method"]) for p in pred])
        img = pred * std + mean
        for c, ch in enumerate(outputs):
            arr = np.clip(np.rint(img[c]), 0, 65535).astype(np.uint16) if cfg.dtype == "uint16" else img[c].astype(np.float32)
            write_image(out / name_of(f, ch), arr)

    written = 0
    skipped: list[dict] = []
    readers = ThreadPoolExecutor(max(1, cfg.workers))
    writers = ThreadPoolExecutor(max(1, cfg.workers))
    writes: deque[Future] = deque()
    pending: dict[str, list] = {}  # key -> [field, native, shape, padded_shape, out tiles, remaining]
    buffer: list[tuple[str, int, np.ndarray]] = []

    def run_batch(items) -> None:
        nonlocal written
        x = np.stack([t for _, _, t in items])
        if len(items) < cfg.batch_size:  # same shape every call: results never depend on batch composition
            x = np.concatenate([x, np.zeros((cfg.batch_size - len(items), *x.shape[1:]), x.dtype)])
        with torch.inference_mode(), autocast(device, cfg.precision):
            y = model(torch.from_numpy(x).to(device)).float().cpu().numpy()
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
            progress("fields", len(done) + written, len(todo_all))

    try:
        prefetch: deque[Future] = deque()
        queue = iter(todo)
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
                              np.empty((len(tiles), len(outputs), cfg.tile, cfg.tile), np.float32), len(tiles)]
            buffer += [(f.key, j, t) for j, t in enumerate(tiles)]
            while len(buffer) >= cfg.batch_size:
                run_batch(buffer[: cfg.batch_size])
                buffer = buffer[cfg.batch_size :]
            drain(block=False)
        if buffer:
            run_batch(buffer)
        drain(block=True)
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True)
    # Shards running side by side each keep their own record.
    record = "cpvs-run.json" if cfg.shard == (1, 1) else f"cpvs-run.shard-{cfg.shard[0]}-of-{cfg.shard[1]}.json"
    params = plain(cfg)
    write_run_record(out, "predict-plate", params, inputs={"plate": str(cfg.plate), "checkpoint": ck["path"]},
                     name=record, n_fields=len(todo_all), skipped=skipped)
    return PredictResult(out, outputs, len(todo_all), written, len(done), time.perf_counter() - t0, str(device), skipped)


def plan_outputs(plate: Plate, out: Path, channels: list[str], shard: tuple[int, int]):
    """Prepare a predicted plate's folder: (file name of a field and channel, this shard's
    fields, those already finished, those to do). Writes load_data.csv, channel_map.csv and
    the platemap, the same for every shard."""
    out.mkdir(parents=True, exist_ok=True)
    name_of, out_map = output_names(plate, channels)
    mine = shard_fields(plate.fields, shard)
    done = [f for f in mine if all((out / name_of(f, c)).exists() for c in channels)]
    todo = [f for f in mine if f not in done]
    _write_plate_files(plate, out, channels, name_of, out_map)
    return name_of, mine, done, todo


def _write_plate_files(plate: Plate, out: Path, outputs: list[str], name_of, out_map: ChannelMap | None) -> None:
    """``load_data.csv`` for every field of the plate (the same for every shard),
    ``channel_map.csv`` and the platemap, so cpvs or CellProfiler read the prediction directly."""
    pred = Plate(plate.name, out, "predicted", list(outputs),
                 [Field(f.plate, f.well, f.site, {c: out / name_of(f, c) for c in outputs}) for f in plate.fields],
                 metadata=plate.metadata)
    write_load_data(pred, out / "load_data.csv")
    if out_map is not None:
        with atomic_path(out / CHANNEL_MAP_NAME) as tmp:
            tmp.write_text("channel,name\n" + "".join(f"{k},{v}\n" for k, v in out_map.to_dict().items()))
    if plate.platemap_path is not None:
        with atomic_path(out / f"platemap{Path(plate.platemap_path).suffix}") as tmp:
            tmp.write_text(Path(plate.platemap_path).read_text())

