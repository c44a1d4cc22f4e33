"""``cpvs predict-plate --model ddpm``: whole plates with the diffusion model.

Field strategy (``--field-strategy``):

* ``resize`` (default): each field is brought to the model's training resolution
  by the checkpoint's own preprocessing (the published model works on whole
  512² fields), sampled whole, and resized back to the native size. One network
  call per step covers the field, so it is the cheapest, and there are no seams.
* ``tiles``: for models trained on tiles of full-resolution fields; tiles are
  sampled with noise cut from one field-sized noise image per step (overlapping
  tiles see the same noise where they overlap) and combined by the per-pixel
  median, as for the U-Net.

Fields of several wells share a batch. ``samples`` K > 1 draws K samples per
field and writes their per-pixel mean (the prediction) and standard deviation
(``<channel>_std``, an uncertainty map in the same intensity units). Every
random number of a field comes from a generator seeded by (seed, field, sample),
so results do not depend on batching, sharding or resuming.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cpvs.device import resolve_device
from cpvs.errors import CpvsError
from cpvs.models.diffusion.classifier import NoisyClassifier
from cpvs.models.diffusion.samplers import make_sampler
from cpvs.models.diffusion.schedule import NoiseSchedule
from cpvs.models.diffusion.unet import DiffusionUNet, DiffusionUNetConfig
from cpvs.plate.discover import discover_plate
from cpvs.plate.layout import Field
from cpvs.plate.tiff import write_image
from cpvs.predict.runner import PredictResult, plan_outputs
from cpvs.predict.tiling import stitch, tile_grid
from cpvs.preprocess.apply import FieldNormalizer
from cpvs.preprocess.normalize import resize_image
from cpvs.runinfo import plain, write_run_record
from cpvs.train.checkpoint import load_checkpoint
from cpvs.train.runtime import autocast

Progress = Callable[..., None]


@dataclass
class DiffusionPredictConfig:
    plate: Path
    out: Path
    checkpoint: Path
    sampler: str = "ddpm"  # respaced ancestral: robust to an imperfect ε-model (see README)
    steps: int = 50
    eta: float = 0.0
    clip_denoised: bool = True  # clamp predicted clean images into the training targets' range
    guidance: float = 0.0
    classifier: Path | None = None
    label_col: str | None = None  # default: the column the model was trained with
    samples: int = 1
    seed: int = 0
    field_strategy: str = "resize"
    tile: int = 256
    stride: int = 128
    batch_size: int = 4  # resize: fields per network call (times samples); tiles: a field's tiles go together
    channel_map: str | None = None
    platemap: Path | None = None
    plate_name: str | None = None
    device: str = "auto"
    precision: str = "bf16"
    dtype: str = "uint16"
    shard: tuple[int, int] = (1, 1)
    workers: int = 2
    illum_fields: int = 256


def field_seed(seed: int, key: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def load_diffusion(ck: dict, device) -> tuple[DiffusionUNet, NoiseSchedule]:
    net = DiffusionUNet(DiffusionUNetConfig.from_dict(ck["hparams"]["net"]))
    net.load_state_dict(ck["state_dict"])
    return net.eval().to(device), NoiseSchedule.from_spec(ck["hparams"]["schedule"])


def x0_range(ck: dict, outputs: list[str], device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The training targets' per-channel range from the checkpoint; checkpoints older than
    that record fall back to the preprocessing clip (±clip), or no clamp when there was none."""
    rng = ck.get("target_range")
    if rng:
        lo, hi = zip(*(rng[c] for c in outputs))
    elif ck["normalization"].get("clip"):
        c = float(ck["normalization"]["clip"])
        lo, hi = [-c] * len(outputs), [c] * len(outputs)
    else:
        return None
    as_t = lambda v: torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1)  # noqa: E731
    return as_t(lo), as_t(hi)


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect") if (ph or pw) else x


def predict_plate_diffusion(cfg: DiffusionPredictConfig, progress: Progress | None = None) -> PredictResult:
    t0 = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    if cfg.samples < 1:
        raise CpvsError("--samples must be at least 1")
    if cfg.field_strategy not in ("resize", "tiles"):
        raise CpvsError(f"--field-strategy must be resize or tiles, got {cfg.field_strategy!r}")
    ck = load_checkpoint(cfg.checkpoint, prefer="last")
    if ck["family"] != "ddpm":
        raise CpvsError(f"--model ddpm but the checkpoint is a {ck['family']} model", ck["path"])
    device = resolve_device(cfg.device)
    net, schedule = load_diffusion(ck, device)
    inputs, outputs, norm = ck["inputs"], ck["outputs"], ck["normalization"]
    sampler = make_sampler(cfg.sampler, schedule, cfg.steps, cfg.eta,
                           x0_range(ck, outputs, device) if cfg.clip_denoised else None)
    classes = ck.get("classes") or []
    label_col = cfg.label_col if cfg.label_col is not None else ck.get("label")
    label_col = None if label_col in (None, "none") else label_col
    clf = None
    if cfg.guidance:
        if cfg.classifier is None:
            raise CpvsError("--guidance needs --classifier (a run of `cpvs train --model classifier`)")
        cck = load_checkpoint(cfg.classifier, prefer="last")
        if cck["family"] != "classifier":
            raise CpvsError(f"--classifier must be a classifier checkpoint, this is {cck['family']}", cck["path"])
        clf = NoisyClassifier(DiffusionUNetConfig.from_dict(cck["hparams"]["net"]), len(cck["classes"]))
        clf.load_state_dict(cck["state_dict"])
        clf = clf.eval().to(device)
        clf_classes = cck["classes"]
        label_col = label_col or cck.get("label")

    plate = discover_plate(cfg.plate, channel_map=cfg.channel_map, channels=inputs, plate_name=cfg.plate_name,
                           platemap=cfg.platemap)
    meta = plate.table()
    if label_col and label_col not in meta.columns:
        cols = [c for c in meta.columns if c.startswith("Metadata_")]
        raise CpvsError(f"--label-col {label_col!r} is not in the plate's metadata; it has {', '.join(cols)}", cfg.plate,
                        "pass --platemap, or --label-col none to sample without labels")
    value_of = {f.key: str(meta.iloc[i][label_col]) for i, f in enumerate(plate.fields)} if label_col else {}
    class_of = lambda f: classes.index(value_of[f.key]) if value_of.get(f.key) in classes else -1  # noqa: E731
    written_channels = outputs + ([f"{c}_std" for c in outputs] if cfg.samples > 1 else [])
    out = Path(cfg.out)
    name_of, mine, done, todo = plan_outputs(plate, out, written_channels, cfg.shard)
    normalizer = FieldNormalizer.for_plate(plate, inputs, norm, cfg.illum_fields, out / ".cpvs-cache", cfg.workers)
    stats = norm["channel_stats"]
    mean = np.array([stats[c]["mean"] for c in outputs], dtype=np.float32)[:, None, None]
    std = np.array([stats[c]["std"] for c in outputs], dtype=np.float32)[:, None, None]

    def sample_items(x: torch.Tensor, labels: torch.Tensor, gens: list[torch.Generator], shapes) -> torch.Tensor:
        """Run the sampler on a batch; ``gens`` supply every item's noise, ``shapes`` its noise shape."""
        noise0 = torch.stack([torch.randn(s, generator=g) for g, s in zip(gens, shapes)]).to(device)

        def eps_fn(y, t):
            with autocast(device, cfg.precision):
                return net(x, y, schedule.gamma(t), labels).float()

        def step_noise(i):
            return torch.stack([torch.randn(s, generator=g) for g, s in zip(gens, shapes)]).to(device)

        grad_fn = None
        if clf is not None:
            clf_labels = torch.tensor([clf_classes.index(classes[k]) if 0 <= k < len(classes) and classes[k] in clf_classes
                                       else -1 for k in labels.tolist()], device=device)

            def grad_fn(y, t):
                g = torch.zeros_like(y)
                ok = clf_labels >= 0
                if ok.any():
                    g[ok] = clf.log_prob_grad(y[ok], schedule.gamma(t)[ok], clf_labels[ok])
                return g

        with torch.inference_mode(False), torch.no_grad():
            return sampler.sample(eps_fn, noise0, step_noise, grad_fn, cfg.guidance)

    def finish(f: Field, native, work_shape, samples_arr: np.ndarray) -> None:
        """(K, C, h, w) samples at work resolution -> mean (and std) TIFFs at native size."""
        m = samples_arr.mean(axis=0)[:, : work_shape[0], : work_shape[1]]
        maps = [m]
        if cfg.samples > 1:
            maps.append(samples_arr.std(axis=0)[:, : work_shape[0], : work_shape[1]])
        for which, arr in enumerate(maps):
            if tuple(work_shape) != tuple(native):
                arr = np.stack([resize_image(a, native, norm["resize_method"]) for a in arr])
            img = arr * std + mean if which == 0 else arr * std
            names = outputs if which == 0 else [f"{c}_std" for c in outputs]
            for c, ch in enumerate(names):
                a = np.clip(np.rint(img[c]), 0, 65535).astype(np.uint16) if cfg.dtype == "uint16" else img[c].astype(np.float32)
                write_image(out / name_of(f, ch), a)

    written = 0
    writer = ThreadPoolExecutor(max(1, cfg.workers))
    futures = []
    try:
        if cfg.field_strategy == "resize":
            per_call = max(1, cfg.batch_size)
            for start in range(0, len(todo), per_call):
                chunk = todo[start : start + per_call]
                prepared = [normalizer.read(f) for f in chunk]
                work = [_pad_to(x, net.multiple) for x, _ in prepared]
                if len({w.shape for w in work}) > 1:
                    raise CpvsError("fields of one plate differ in size", cfg.plate)
                xs, labels, gens, shapes = [], [], [], []
                for f, w in zip(chunk, work):
                    for k in range(cfg.samples):
                        xs.append(torch.from_numpy(w))
                        labels.append(class_of(f))
                        gens.append(torch.Generator().manual_seed(field_seed(cfg.seed, f.key, k)))
                        shapes.append((len(outputs), *w.shape[1:]))
                y = sample_items(torch.stack(xs).to(device), torch.tensor(labels, device=device), gens, shapes).cpu().numpy()
                for j, (f, (x, native)) in enumerate(zip(chunk, prepared)):
                    futures.append(writer.submit(finish, f, native, x.shape[1:], y[j * cfg.samples : (j + 1) * cfg.samples]))
                for fut in futures:
                    fut.result()
                written += len(chunk)
                futures.clear()
                progress("fields", len(done) + written, len(mine), info=f"{cfg.sampler} {len(sampler.steps)} steps")
        else:
            for f in todo:
                x, native = normalizer.read(f)
                h, w = x.shape[1:]
                if h < cfg.tile or w < cfg.tile:
                    raise CpvsError(f"field is {h}x{w} px at the model's resolution, smaller than --tile {cfg.tile}")
                corners = tile_grid((h, w), cfg.tile, cfg.stride)
                samples_out = []
                for k in range(cfg.samples):
                    samples_out.append(_sample_tiles(x, corners, cfg, f, k, class_of(f), net, schedule, sampler, device,
                                                     len(outputs)))
                finish(f, native, (h, w), np.stack(samples_out))
                written += 1
                progress("fields", len(done) + written, len(mine), info=f"{cfg.sampler} {len(sampler.steps)} steps, tiles")
    finally:
        writer.shutdown(wait=True)
    record = "cpvs-run.json" if cfg.shard == (1, 1) else f"cpvs-run.shard-{cfg.shard[0]}-of-{cfg.shard[1]}.json"
    params = plain(cfg)
    write_run_record(out, "predict-plate", params, inputs={"plate": str(cfg.plate), "checkpoint": ck["path"]}, name=record,
                     n_fields=len(mine), label_column=label_col)
    return PredictResult(out, written_channels, len(mine), written, len(done), time.perf_counter() - t0, str(device))


def _sample_tiles(x, corners, cfg, f, k, label, net, schedule, sampler, device, n_out) -> np.ndarray:
    """One sample of a field by tiles (all tiles of the field in one batch), their noise cut
    from one field-sized noise image per step so overlapping tiles agree on it."""
    h, w = x.shape[1:]
    gen = torch.Generator().manual_seed(field_seed(cfg.seed, f.key, k))
    tiles_x = torch.stack([torch.from_numpy(x[:, y0 : y0 + cfg.tile, x0 : x0 + cfg.tile]) for y0, x0 in corners]).to(device)
    labels = torch.full((len(corners),), label, device=device, dtype=torch.long)

    def field_noise(_step: int | None = None) -> torch.Tensor:
        full = torch.randn((n_out, h, w), generator=gen)  # drawn in step order: the same for any batching
        return torch.stack([full[:, y0 : y0 + cfg.tile, x0 : x0 + cfg.tile] for y0, x0 in corners]).to(device)

    def eps_fn(y, t):
        with autocast(device, cfg.precision):
            return net(tiles_x, y, schedule.gamma(t), labels).float()

    with torch.no_grad():
        tiles = sampler.sample(eps_fn, field_noise(), field_noise).cpu().numpy()
    return stitch(tiles, (h, w), cfg.tile, cfg.stride, "median")
