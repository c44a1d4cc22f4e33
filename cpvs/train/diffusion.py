"""Training the class-guided image-to-image diffusion model and its guidance classifier (METHODS §5).

``ddpm``: ε-prediction (or ``prediction`` v or x₀, :mod:`cpvs.models.diffusion.prediction`)
with an L2 loss at a uniformly drawn step, random flips and 90° rotations (p = 0.5 each,
the same for condition and target), Adam 8e-5, EMA weights for sampling. With ``label``, each crop carries its field's class (e.g.
``Metadata_Perturbation``); a fraction ``label_dropout`` of labels is replaced by
the null class so the model also learns to sample without one.

``classifier``: p(k | y_t) on noisy stains at random steps, cross-entropy.

``residual_of`` (a U-Net run): **residual diffusion** (as CorrDiff, Mardani et al. 2023). The
frozen U-Net's prediction u(x) is computed for every crop (with 64 px of context around it,
as its tiles see at prediction time); the network is conditioned on the brightfield planes
and u(x), and diffuses only the residual (y − u(x)) / scale, with a per-channel scale (the
residual's std on training crops) so the residual has unit variance like the noise. The
checkpoint records the U-Net's file, digest and the scale; predict-plate adds u(x) back. Each
validation also fits the weight of the residual's estimate per channel (:mod:`cpvs.train.residual`)
when the validation crops lie in the U-Net's own validation data (same store, seed and fraction, a
crop no larger than the U-Net's); else the checkpoint says ``held_out: False`` and none is fitted.

The EMA uses the usual warm-up, decay_t = min(decay, (1 + t) / (10 + t)), so a
short run still ends with useful averaged weights; long runs reach the published
0.9999. Resume, bf16 on GPU and torchrun DDP work as for the U-Net.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpvs.checkpoints import load_checkpoint, save_checkpoint
from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.jobs import graceful_stop
from cpvs.models.diffusion.classifier import NoisyClassifier
from cpvs.models.diffusion.prediction import check_prediction, training_target
from cpvs.models.diffusion.schedule import NoiseSchedule
from cpvs.models.diffusion.unet import DiffusionUNet, DiffusionUNetConfig
from cpvs.preprocess.store import Store
from cpvs.runinfo import plain, write_run_record
from cpvs.train.data import CropSampler, default_channels
from cpvs.train.residual import ResidualBase, fit_shrinkage, held_out_from_base, residual_batch, residual_stats
from cpvs.train.runtime import (
    Clock, MetricsTable, Progress, check_resume_identity, prepare_run_folder,
    run_lock, rng_state, set_rng_state, start_run, unwrap
)


DEFAULT_SCHEDULE = {"kind": "linear", "T": 2000, "start": 1e-6, "end": 0.01}  # METHODS §5


@dataclass
class DiffusionConfig:
    model: str  # ddpm | classifier
    data: Path
    out: Path
    inputs: list[str] | None = None
    targets: list[str] | None = None
    label: str | None = None  # metadata column of the class label; None: unconditional
    label_dropout: float = 0.1
    crop: int = 512
    batch_size: int = 2
    epochs: int = 250
    steps_per_epoch: int = 1000
    lr: float = 8e-5
    ema: float = 0.9999
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_downsample: tuple[int, ...] = (16,)
    head_channels: int = 32
    dropout: float = 0.2
    schedule: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULE))
    prediction: str = "eps"  # what the network predicts: eps (published), v or x0
    residual_of: Path | None = None  # a U-Net run: diffuse the residual of its prediction
    val_fraction: float = 0.1
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None
    workers: int = 2

    def net_config(self, n_in: int, n_out: int, n_classes: int) -> DiffusionUNetConfig:
        return DiffusionUNetConfig(n_in, n_out, self.width, tuple(self.channel_mult), self.num_res_blocks,
                                   tuple(self.attention_downsample), self.head_channels, self.dropout, n_classes)

    def identity(self) -> dict:
        d = {k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        for k in ("out", "resume", "max_minutes", "epochs", "device", "workers", "data"):
            d.pop(k)
        return d


def schedule_spec(kind: str | None = None, T: int | None = None, start: float | None = None, end: float | None = None) -> dict:
    """A schedule spec from the parts given (the rest from the published linear schedule)."""
    kind = kind or DEFAULT_SCHEDULE["kind"]
    if kind not in ("linear", "cosine"):
        raise CpvsError(f"--schedule must be linear or cosine, got {kind!r}")
    spec = {"kind": kind, "T": T if T is not None else DEFAULT_SCHEDULE["T"]}
    if kind == "linear":
        spec.update(start=start if start is not None else DEFAULT_SCHEDULE["start"],
                    end=end if end is not None else DEFAULT_SCHEDULE["end"])
    elif start is not None or end is not None:
        raise CpvsError("--beta-start and --beta-end set the linear schedule; the cosine schedule has no betas to set")
    return spec


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random horizontal/vertical flip and 90° rotation (p = 0.5 each) of condition and target."""
    r = torch.rand(3, generator=gen)
    if r[0] < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if r[1] < 0.5:
        x, y = x.flip(-2), y.flip(-2)
    if r[2] < 0.5:
        x, y = x.rot90(1, (-2, -1)), y.rot90(1, (-2, -1))
    return x, y


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def class_table(store: Store, label: str | None) -> tuple[list[str], dict[int, int]]:
    """Sorted class names and field index -> class index (fields without a value: null)."""
    if label is None:
        return [], {}
    if label not in store.table.columns:
        meta = [c for c in store.table.columns if c.startswith("Metadata_")]
        raise CpvsError(f"store has no label column {label!r}; it has {', '.join(meta)}", store.path,
                        "pass --label with one of those, or --label none")
    values = store.table[label].astype(str)
    classes = sorted(v for v in values.unique() if v and v != "nan")
    index = {c: i for i, c in enumerate(classes)}
    return classes, {i: index.get(v, -1) for i, v in enumerate(values)}


def train_diffusion(cfg: DiffusionConfig, progress: Progress | None = None):
    """Train the ddpm or its guidance classifier; SIGINT/SIGTERM stop after the current step with a
    resumable checkpoint of that step."""
    with run_lock(cfg.out):
        return _train_diffusion(cfg, progress)


def _train_diffusion(cfg: DiffusionConfig, progress: Progress | None):
    from cpvs.train.staining import TrainResult

    if cfg.model not in ("ddpm", "classifier"):
        raise CpvsError(f"unknown diffusion family {cfg.model!r}")
    progress = progress or (lambda *a, **k: None)
    check_prediction(cfg.prediction)
    if cfg.model == "classifier" and (cfg.residual_of is not None or cfg.prediction != "eps"):
        raise CpvsError("--residual-of and --prediction are ddpm options; the guidance classifier does not use them")
    dist, device, store = start_run(cfg.precision, cfg.device, cfg.data)
    base = ResidualBase(cfg.residual_of, store, cfg.inputs, cfg.targets, device) if cfg.residual_of is not None else None
    inputs, targets = (base.inputs, base.outputs) if base else default_channels(store, cfg.inputs, cfg.targets)
    if cfg.model == "classifier" and not cfg.label:
        raise CpvsError("the guidance classifier needs --label (the class column, e.g. Metadata_Perturbation)")
    classes, label_of = class_table(store, cfg.label)
    schedule = NoiseSchedule.from_spec(cfg.schedule)
    crop = min(cfg.crop, *store.shape)
    # residual diffusion also sees the U-Net's prediction: the condition is the inputs and u(x)
    net_cfg = cfg.net_config(len(inputs) + (len(targets) if base else 0), len(targets), len(classes))
    torch.manual_seed(cfg.seed + dist.rank)
    model = (DiffusionUNet(net_cfg) if cfg.model == "ddpm" else NoisyClassifier(net_cfg, len(classes))).to(device)
    multiple = 2 ** (len(cfg.channel_mult) - 1)
    if crop % multiple:
        raise CpvsError(f"crop {crop} must be a multiple of {multiple} for {len(cfg.channel_mult)} levels",
                        hint="pass --crop, or preprocess with --size to a multiple")
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sampler = CropSampler(store, inputs, targets, crop, cfg.val_fraction, cfg.seed, cfg.workers)
    resume_from = prepare_run_folder(cfg.out, cfg.resume)
    metrics = MetricsTable(cfg.out / "metrics.parquet")
    start, partial = 1, None
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        check_resume_identity(ck, cfg.identity(), resume_from)
        model.load_state_dict(ck["state"]["model"])
        ema.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["state"]["optimizer"])
        set_rng_state(ck["state"]["rng"])
        start = ck["train"]["epoch"] + 1
        partial = ck["train"].get("partial")  # stopped by a signal inside epoch `start`
        metrics = MetricsTable.load(cfg.out / "metrics.parquet", ck["train"]["epoch"])
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    hparams = {"net": net_cfg.to_dict(), "schedule": cfg.schedule, "crop": crop, "prediction": cfg.prediction}
    if base is not None:
        scale, rng = residual_stats(base, sampler, crop)
        hparams["residual_of"] = base.record | {"scale": scale.tolist()}
        base.scale = torch.tensor(scale, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    else:
        rng = target_range(store, targets)
    meta = dict(family=cfg.model, hparams=hparams,
                inputs=inputs, outputs=targets, normalization=store.normalization(inputs + targets),
                target_range=rng, classes=classes,
                label=cfg.label, data=sampler.summary(),
                config=plain(cfg))
    val = _val_batch(sampler, sampler.val_items(max_crops=16), base, device) if dist.main else None
    if base is not None:  # the shrinkage is only fitted where the U-Net's residuals are honest
        fitted = (ck.get("residual_shrink") or {}).get("alpha") if resume_from is not None else None  # kept until refitted
        meta["residual_shrink"] = {"alpha": fitted, "held_out": bool(val and held_out_from_base(base, sampler, val[0]))}
    if dist.main:  # after the setup (the target range reads up to 64 fields): the record says the loop starts
        write_run_record(cfg.out, "train", plain(cfg), inputs={"store": str(cfg.data)})
    clock = Clock(cfg.max_minutes)

    def save(epoch: int, row: dict, partial: dict | None = None) -> None:
        state = {"model": unwrap(model).state_dict(), "optimizer": opt.state_dict(), "rng": rng_state()}
        train = {"epoch": epoch, "step": row["step"], "metrics": row} | ({"partial": partial} if partial else {})
        save_checkpoint(cfg.out / "checkpoints" / "last.pt", **meta, state_dict=ema.state_dict(), train=train, state=state,
                        config_identity=cfg.identity())

    with graceful_stop(dist.world == 1) as stop:
        epochs_done, stopped = _epochs(cfg, start, partial, sampler, schedule, model, ema, opt, label_of, classes, device,
                                       dist, metrics, clock, val, progress, save, stop, base, meta.get("residual_shrink"))
        stop.check()
    frame = metrics.frame()
    return TrainResult(cfg.out, cfg.model, sum(p.numel() for p in ema.parameters()), epochs_done, None,
                       frame.iloc[-1].to_dict() if len(frame) else {}, frame, str(device), stopped)


def _epochs(cfg, start, partial, sampler, schedule, model, ema, opt, label_of, classes, device, dist, metrics, clock,
            val, progress, save, stop, base=None, shrink=None) -> tuple[int, bool]:
    """The training epochs from ``start`` (from inside it when ``partial``); (epochs done, stopped by the clock)."""
    total = cfg.epochs * cfg.steps_per_epoch
    epochs_done, stopped = start - 1, False
    progress("train", (start - 1) * cfg.steps_per_epoch + (partial["step"] if partial else 0), total, info="starting")
    for epoch in range(start, cfg.epochs + 1):
        plan = sampler.plan_epoch(epoch, cfg.steps_per_epoch, cfg.batch_size, dist.rank)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, dist.rank, epoch]).generate_state(1)[0]))
        first, losses = 0, []
        if partial and epoch == start:
            first, losses = partial["step"], list(partial["losses"])
            gen.set_state(partial["gen"])
        model.train()
        for step, (items, (xb, yb)) in enumerate(zip(plan[first:], sampler.batches(plan[first:])), start=first):
            if stop.requested:
                save(epoch - 1, {"step": (epoch - 1) * cfg.steps_per_epoch + step},
                     {"epoch": epoch, "step": step, "losses": losses, "gen": gen.get_state()})
                stop.check()
            x, y = residual_batch(base, items, torch.from_numpy(xb).to(device), torch.from_numpy(yb).to(device), xb.shape[-1])
            x, y = augment(x, y, gen)
            t = torch.randint(0, schedule.T, (len(x),), generator=gen).to(device)
            noise = torch.randn(y.shape, generator=gen).to(device)
            y_t = schedule.q_sample(y, t, noise)
            gamma = schedule.gamma(t)
            with autocast(device, cfg.precision):
                if cfg.model == "ddpm":
                    labels = None
                    if classes:
                        labels = torch.tensor([label_of[f] for f, _, _ in items], dtype=torch.long)
                        drop = torch.rand(len(labels), generator=gen) < cfg.label_dropout
                        labels = torch.where(drop, torch.full_like(labels, -1), labels).to(device)
                    target = training_target(cfg.prediction, y, noise, gamma)
                    loss = F.mse_loss(model(x, y_t, gamma, labels).float(), target)
                else:
                    labels = torch.tensor([label_of[f] for f, _, _ in items], dtype=torch.long).to(device)
                    keep = labels >= 0
                    if not keep.any():
                        continue
                    loss = F.cross_entropy(model(y_t[keep], gamma[keep]).float(), labels[keep])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done = (epoch - 1) * cfg.steps_per_epoch + step + 1
            ema_update(ema, unwrap(model), min(cfg.ema, (1 + done) / (10 + done)))
            losses.append(float(loss.detach()))
            progress("train", done, total, info=f"epoch {epoch}/{cfg.epochs} loss {np.mean(losses[-20:]):.4f}")
        row = {"epoch": epoch, "step": epoch * cfg.steps_per_epoch, "seconds": round(clock.elapsed, 2),
               "loss": float(np.mean(losses)) if losses else float("nan")}
        if dist.main:
            row["val_loss"] = _validate(ema, val, schedule, cfg, label_of, device)
            if shrink is not None and shrink["held_out"]:  # held out implies validation crops; saved with meta
                alpha = fit_shrinkage(ema, val[1], val[2], schedule, cfg.prediction, cfg.precision, cfg.seed)
                shrink["alpha"] = dict(zip(base.outputs, alpha.tolist()))
                row.update({f"shrink_{c}": float(a) for c, a in zip(base.outputs, alpha)})
            metrics.append(row)
            save(epoch, row)
        dist.barrier()
        epochs_done = epoch
        if dist.agree(clock.out_of_time()) and epoch < cfg.epochs:
            stopped = True
            break
    return epochs_done, stopped


def target_range(store: Store, targets: list[str], max_fields: int = 64) -> dict[str, list[float]]:
    """Per-channel [min, max] of the training targets over up to ``max_fields`` evenly spaced
    fields: the range samplers clamp predicted clean images into."""
    idx = np.unique(np.linspace(0, len(store) - 1, min(max_fields, len(store))).astype(int))
    lo, hi = np.full(len(targets), np.inf), np.full(len(targets), -np.inf)
    for i in idx:  # one field at a time: 64 full fields at once would take gigabytes
        a = store.read_field(int(i), targets)
        lo, hi = np.minimum(lo, a.min(axis=(1, 2))), np.maximum(hi, a.max(axis=(1, 2)))
    return {c: [float(a), float(b)] for c, a, b in zip(targets, lo, hi)}


@torch.no_grad()
def _val_batch(sampler, items, base, device):
    """(items, condition, diffusion target) of the fixed validation crops, read once; None without crops."""
    if not items:
        return None
    x, y = (torch.from_numpy(a).to(device) for a in sampler.read(items))
    return (items, *residual_batch(base, items, x, y, x.shape[-1]))


@torch.no_grad()
def _validate(ema, val, schedule, cfg, label_of, device) -> float:
    """The training objective of the EMA weights on fixed validation crops, steps and noise."""
    if not val:
        return float("nan")
    items, x, y = val
    gen = torch.Generator().manual_seed(cfg.seed)
    t = torch.linspace(0, schedule.T - 1, len(x)).long().to(device)
    noise = torch.randn(y.shape, generator=gen).to(device)
    y_t = schedule.q_sample(y, t, noise)
    with autocast(device, cfg.precision):
        if cfg.model == "ddpm":
            labels = torch.tensor([label_of.get(f, -1) for f, _, _ in items], dtype=torch.long).to(device) if label_of else None
            target = training_target(cfg.prediction, y, noise, schedule.gamma(t))
            return float(F.mse_loss(ema(x, y_t, schedule.gamma(t), labels).float(), target))
        labels = torch.tensor([label_of[f] for f, _, _ in items], dtype=torch.long).to(device)
        keep = labels >= 0
        if not keep.any():
            return float("nan")
        return float(F.cross_entropy(ema(y_t[keep], schedule.gamma(t)[keep]).float(), labels[keep]))
