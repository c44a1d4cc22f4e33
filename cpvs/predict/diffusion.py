"""The diffusion strategy of ``cpvs predict-plate`` (ddpm checkpoints).

Field strategy (``field_strategy``):

* ``resize`` (default): each field is brought to the model's training resolution
  by the checkpoint's own preprocessing (the published model works on whole
  512² fields), sampled whole, and resized back to the native size. One network
  call per step covers the field, so it is the cheapest, and there are no seams.
* ``tiles``: for models trained on tiles of full-resolution fields; tiles are
  sampled with noise cut from one field-sized noise image per step (overlapping
  tiles see the same noise where they overlap) and combined per pixel by the
  ``stitch`` method, as for the U-Net.

Fields of several wells share a batch. ``samples`` K > 1 draws K samples per
field and writes their per-pixel mean (the prediction) and standard deviation
(``<channel>_std``, an uncertainty map in the same intensity units). With
``estimate="mean"`` the prediction is instead the network's clean-image estimate at
the first step (pure noise, so it estimates E[stains | input]), averaged over the K
starts: the limit the samples' mean approaches, at no extra cost. Every
random number of a field comes from a generator seeded by (seed, field, sample),
so results do not depend on batching, sharding or resuming. Classifier guidance
works with both strategies.

Residual diffusion (a checkpoint trained with ``--residual-of``): the U-Net named in the
checkpoint (its file and digest; ``residual_unet`` points elsewhere when it moved) is
loaded through the registry, predicts the field by its own tiles (256², stride 128,
median), the network is conditioned on the planes and that prediction, and each sample
is u(x) + scale · residual. The std maps are the samples' spread around u(x). The prediction's
residual estimate is shrunk per channel by the weight fitted on held-out crops in training
(``cpvs.train.residual``; ``shrink=False`` keeps it whole).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.models import load_model
from cpvs.models.diffusion.samplers import make_sampler
from cpvs.plate.layout import Field
from cpvs.predict.config import DiffusionOptions, TileOptions
from cpvs.predict.tiling import extract_tiles, pad_to_tile, stitch, tile_grid
from cpvs.runinfo import file_digest


def written_channels(cfg, outputs: list[str]) -> list[str]:
    samples = cfg.samples if cfg.samples is not None else 1
    return outputs + ([f"{c}_std" for c in outputs] if samples > 1 else [])


def field_seed(seed: int, key: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}|{key}|{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


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


@dataclass
class Residual:
    """The U-Net of a residual diffusion checkpoint and the residual's per-channel scale."""

    net: torch.nn.Module
    scale: np.ndarray  # (C, 1, 1)
    device: object
    precision: str
    batch_size: int = 16
    shrink: np.ndarray | None = None  # (C, 1, 1): the point estimate's weight fitted in training (train/residual.py)

    @torch.no_grad()
    def base(self, x: np.ndarray) -> np.ndarray:
        """u(x) of a normalized (C_in, h, w) field: overlapping 256² tiles (stride 128), median-stitched,
        as predict-plate runs the U-Net."""
        t = TileOptions()
        padded, (h, w) = pad_to_tile(x, t.tile)
        corners = tile_grid(padded.shape[1:], t.tile, t.stride)
        tiles = extract_tiles(padded, corners, t.tile)
        out = []
        for i in range(0, len(tiles), self.batch_size):
            with autocast(self.device, self.precision):
                out.append(self.net(torch.from_numpy(tiles[i : i + self.batch_size]).to(self.device)).float().cpu().numpy())
        return stitch(np.concatenate(out), padded.shape[1:], t.tile, t.stride, t.stitch)[:, :h, :w]

    def add(self, base: np.ndarray, residual: np.ndarray, point: bool = False) -> np.ndarray:
        """Stains from a scaled residual; ``point``: the prediction, whose residual estimate is shrunk."""
        return base + (self.scale * self.shrink if point and self.shrink is not None else self.scale) * residual


def load_residual(ck: dict, opts: DiffusionOptions, device, precision: str) -> Residual | None:
    """The U-Net a residual diffusion checkpoint was trained on (None for a plain one); refused when it is
    missing or is not the same file (its digest is recorded)."""
    rec = ck["hparams"].get("residual_of")
    if not rec:
        if opts.residual_unet is not None:
            raise CpvsError("--residual-unet applies to residual diffusion checkpoints (trained with --residual-of); "
                            "this one diffuses the stains themselves", ck["path"], "drop --residual-unet")
        return None
    path = Path(opts.residual_unet) if opts.residual_unet is not None else Path(rec["checkpoint"])
    if not path.exists():
        raise CpvsError(f"this ddpm checkpoint diffuses the residual of the U-Net {rec['checkpoint']}, which is not there"
                        + (f" (--residual-unet {path})" if opts.residual_unet is not None else ""), ck["path"],
                        "put that U-Net run back, or pass --residual-unet with where it is now (its digest is checked)")
    unet = load_model(path, device, roles=("staining",), option="--residual-unet")
    digest = file_digest(unet.path)
    if digest != rec["sha256"]:
        raise CpvsError(f"{unet.path} is not the U-Net this model was trained on (sha256 {digest}, the checkpoint records "
                        f"{rec['sha256']})", ck["path"], "pass --residual-unet with the U-Net checkpoint the model was trained with")
    if unet.checkpoint["inputs"] != ck["inputs"] or unet.checkpoint["outputs"] != ck["outputs"]:
        raise CpvsError("the U-Net's channels differ from the diffusion model's", unet.path)
    scale = np.asarray(rec["scale"], dtype=np.float32)[:, None, None]
    alpha = (ck.get("residual_shrink") or {}).get("alpha") if opts.shrink else None
    shrink = np.asarray([alpha[c] for c in ck["outputs"]], dtype=np.float32)[:, None, None] if alpha else None
    return Residual(unet.net, scale, device, precision, shrink=shrink)


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect") if (ph or pw) else x


@dataclass
class Conditioning:
    """How a batch is conditioned: the model's class of each field, and the guidance gradient."""

    classes: list
    class_of: Callable[[Field], int]
    classifier: object | None  # NoisyClassifier
    classifier_classes: list
    label_col: str | None

    def grad_fn(self, labels: torch.Tensor, schedule, device):
        """∇ log p(k | y_t) for the batch's labels (zero where the classifier does not know the class)."""
        if self.classifier is None:
            return None
        clf_labels = torch.tensor([self.classifier_classes.index(self.classes[k])
                                   if 0 <= k < len(self.classes) and self.classes[k] in self.classifier_classes
                                   else -1 for k in labels.tolist()], device=device)

        def grad_fn(y, t):
            g = torch.zeros_like(y)
            ok = clf_labels >= 0
            if ok.any():
                g[ok] = self.classifier.log_prob_grad(y[ok], schedule.gamma(t)[ok], clf_labels[ok])
            return g

        return grad_fn


def _conditioning(job, opts) -> Conditioning:
    ck, cfg = job.model.checkpoint, job.cfg
    classes = ck.get("classes") or []
    label_col = opts.label_col if opts.label_col is not None else ck.get("label")
    label_col = None if label_col in (None, "none") else label_col
    clf, clf_classes = None, []
    if opts.guidance:
        if opts.classifier is None:
            raise CpvsError("--guidance needs --classifier (a run of `cpvs train --model classifier`)")
        loaded = load_model(opts.classifier, job.device, roles=("guidance",), option="--classifier")
        clf, clf_classes = loaded.net, loaded.checkpoint["classes"]
        label_col = label_col or loaded.checkpoint.get("label")
    meta = job.plate.table()
    if label_col and label_col not in meta.columns:
        cols = [c for c in meta.columns if c.startswith("Metadata_")]
        raise CpvsError(f"--label-col {label_col!r} is not in the plate's metadata; it has {', '.join(cols)}", cfg.plate,
                        "pass --platemap, or --label-col none to sample without labels")
    value_of = {f.key: str(meta.iloc[i][label_col]) for i, f in enumerate(job.plate.fields)} if label_col else {}
    class_of = lambda f: classes.index(value_of[f.key]) if value_of.get(f.key) in classes else -1  # noqa: E731
    return Conditioning(classes, class_of, clf, clf_classes, label_col)


def run(job, progress) -> tuple[int, list[dict], dict]:
    """Sample the plan's remaining fields; (fields written, skipped fields, extra run-record entries)."""
    cfg, opts, tiles = job.cfg, job.cfg.resolved(DiffusionOptions), job.cfg.resolved(TileOptions)
    if opts.samples < 1:
        raise CpvsError("--samples must be at least 1")
    net, device, ck, outputs = job.model.net, job.device, job.model.checkpoint, job.outputs
    schedule = job.model.schedule()
    sampler = make_sampler(opts.sampler, schedule, opts.steps, opts.eta,
                           x0_range(ck, outputs, device) if opts.clip_denoised else None,
                           prediction=ck["hparams"].get("prediction", "eps"))
    residual = load_residual(ck, opts, device, cfg.precision)
    if residual is None and "shrink" in cfg.given(DiffusionOptions):
        raise CpvsError("--shrink/--no-shrink apply to residual diffusion checkpoints (trained with --residual-of); this one "
                        "diffuses the stains themselves", ck["path"], "drop --shrink/--no-shrink")
    if residual is not None and opts.guidance:
        raise CpvsError("classifier guidance is not available for residual diffusion (the classifier sees stains, the "
                        "model diffuses residuals)", ck["path"], "drop --guidance")
    cond = _conditioning(job, opts)
    plan = job.plan
    info = f"{opts.sampler} {len(sampler.steps)} steps" + (", tiles" if opts.field_strategy == "tiles" else "")

    def sample_batch(x: torch.Tensor, labels: torch.Tensor, noise_of: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the sampler on a batch; ``noise_of()`` draws the batch's next noise (y_T first, then each step's).
        Returns the samples and the clean-image estimate of the first step (the posterior mean's estimate)."""

        def model_fn(y, t):
            with autocast(device, cfg.precision):
                return net(x, y, schedule.gamma(t), labels).float()

        noise0 = noise_of()
        first: list[torch.Tensor] = []

        def keep_first(i, _t, _y, x0):
            if i == 0:
                first.append(x0.float())
        with torch.inference_mode(False), torch.no_grad():
            y = sampler.sample(model_fn, noise0, lambda _i: noise_of(), cond.grad_fn(labels, schedule, device), opts.guidance,
                               callback=keep_first)
        return y, first[0]

    def finish(f: Field, native, work_shape, samples_arr: np.ndarray, first_arr: np.ndarray, base: np.ndarray | None = None) -> None:
        """(K, C, h, w) samples and first-step estimates at work resolution (residual diffusion: scaled residuals
        around the U-Net's ``base``) -> the prediction (the samples' mean, or with ``estimate="mean"`` the estimates'
        mean) and the samples' std, as TIFFs at native size."""
        h, w = work_shape
        spread = samples_arr.std(axis=0) if opts.samples > 1 else None
        point = (first_arr if opts.estimate == "mean" else samples_arr).mean(axis=0)
        if base is not None:
            point, spread = residual.add(base, point, point=True), (residual.scale * spread if spread is not None else None)
        job.writer.write(f, native, point[:, :h, :w], spread[:, :h, :w] if spread is not None else None)

    written = 0
    skipped: list[dict] = []

    def read(f: Field):
        try:
            return job.normalizer.read(f)
        except CpvsError as e:
            if cfg.on_error != "skip":
                raise
            skipped.append({"field": f.key, "reason": e.render()})
            return None

    writer = ThreadPoolExecutor(max(1, cfg.workers))
    try:
        if opts.field_strategy == "resize":
            for start in range(0, len(plan.todo), job.batch_size):
                chunk = [(f, r) for f in plan.todo[start : start + job.batch_size] if (r := read(f)) is not None]
                if chunk:
                    _sample_resized(chunk, job, opts, cond, sample_batch, finish, writer, residual)
                written += len(chunk)
                progress("fields", len(plan.done) + written, len(plan.fields), info=info)
        else:
            if tiles.tile % net.multiple:
                raise CpvsError(f"--tile {tiles.tile} must be a multiple of {net.multiple} for this model")
            for f in plan.todo:
                r = read(f)
                if r is None:
                    continue
                x, native = r
                base = residual.base(x) if residual is not None else None
                xc = np.concatenate([x, base]) if base is not None else x
                samples, firsts = (np.stack(a) for a in zip(*[_sample_tiles(xc, f, k, cond.class_of(f), job, opts, tiles, sample_batch)
                                                              for k in range(opts.samples)]))
                finish(f, native, x.shape[1:], samples, firsts, base)
                written += 1
                progress("fields", len(plan.done) + written, len(plan.fields), info=info)
    finally:
        writer.shutdown(wait=True)
    return written, skipped, {"label_column": cond.label_col}


def _sample_resized(chunk, job, opts, cond: Conditioning, sample_batch, finish, writer, residual: Residual | None = None) -> None:
    """Whole fields at the model's resolution, K samples each, in one batch."""
    net, device, n_out = job.model.net, job.device, len(job.outputs)
    work = [_pad_to(x, net.multiple) for _, (x, _) in chunk]
    bases = [residual.base(w) for w in work] if residual is not None else None
    if bases is not None:
        work = [np.concatenate([w, b]) for w, b in zip(work, bases)]
    if len({w.shape for w in work}) > 1:
        raise CpvsError("fields of one plate differ in size", job.cfg.plate)
    xs, labels, gens, shapes = [], [], [], []
    for (f, _), w in zip(chunk, work):
        for k in range(opts.samples):
            xs.append(torch.from_numpy(w))
            labels.append(cond.class_of(f))
            gens.append(torch.Generator().manual_seed(field_seed(opts.seed, f.key, k)))
            shapes.append((n_out, *w.shape[1:]))

    def noise_of() -> torch.Tensor:
        return torch.stack([torch.randn(s, generator=g) for g, s in zip(gens, shapes)]).to(device)

    y, first = (t.cpu().numpy() for t in sample_batch(torch.stack(xs).to(device), torch.tensor(labels, device=device), noise_of))
    K = opts.samples
    futures = [writer.submit(finish, f, native, x.shape[1:], y[j * K : (j + 1) * K], first[j * K : (j + 1) * K],
                             bases[j] if bases is not None else None)
               for j, (f, (x, native)) in enumerate(chunk)]
    for fut in futures:
        fut.result()  # re-raises write errors (e.g. disk full)


def _sample_tiles(x, f, k, label, job, opts, tiles, sample_batch) -> tuple[np.ndarray, np.ndarray]:
    """One sample of a field (and its first-step clean estimate) by tiles (all tiles of the field in one batch), their noise cut
    from one field-sized noise image per step so overlapping tiles agree on it."""
    h, w = x.shape[1:]
    if h < tiles.tile or w < tiles.tile:
        raise CpvsError(f"field is {h}x{w} px at the model's resolution, smaller than --tile {tiles.tile}")
    corners = tile_grid((h, w), tiles.tile, tiles.stride)
    device, n_out = job.device, len(job.outputs)
    gen = torch.Generator().manual_seed(field_seed(opts.seed, f.key, k))
    tiles_x = torch.stack([torch.from_numpy(x[:, y0 : y0 + tiles.tile, x0 : x0 + tiles.tile]) for y0, x0 in corners]).to(device)
    labels = torch.full((len(corners),), label, device=device, dtype=torch.long)

    def field_noise() -> torch.Tensor:
        full = torch.randn((n_out, h, w), generator=gen)  # drawn in step order: the same for any batching
        return torch.stack([full[:, y0 : y0 + tiles.tile, x0 : x0 + tiles.tile] for y0, x0 in corners]).to(device)

    out, first = sample_batch(tiles_x, labels, field_noise)
    return tuple(stitch(a.cpu().numpy(), (h, w), tiles.tile, tiles.stride, tiles.stitch) for a in (out, first))
