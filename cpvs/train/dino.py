"""DINO and WS-DINO training, one ViT per channel (METHODS §6).

Student and teacher see multi-crop views (2 global, 8 local); the loss is the
cross-entropy between the teacher's centred, sharpened softmax over the global
views and the student's softmax over every other view. The teacher is an EMA of
the student, the centre an EMA of the teacher's outputs. WS-DINO draws the local
views from another image with the same weak label. Defaults are the thesis's
(AdamW, batch 16, 10 warm-up epochs, learning rate 4e-6 decayed by cosine to
3e-6, no weight decay, teacher momentum 0.99, temperatures 0.04 / 0.1): they
suit fine-tuning ImageNet DINO weights (``--init-weights``); from scratch, use a
larger learning rate.

With MOA labels in the store, ``eval_every`` embeds the store with the teacher
every few epochs and records NSC (and NSCB) in ``metrics.parquet``: the numbers
are reported, never used to pick a checkpoint silently.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cpvs.checkpoints import load_checkpoint, save_checkpoint
from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.jobs import graceful_stop
from cpvs.models.vit import ChannelModels, load_init_weights
from cpvs.plate.channels import is_brightfield
from cpvs.preprocess.store import Store
from cpvs.runinfo import plain, write_run_record
from cpvs.train.multicrop import CropSpec, PairSampler, views_for_batch
from cpvs.train.runtime import (
    Clock, MetricsTable, Progress, check_resume_identity, prepare_run_folder,
    run_lock, rng_state, set_rng_state, start_run, unwrap
)


EvaluateFn = Callable[[ChannelModels, Store, list, torch.device], dict]


@dataclass
class DinoConfig:
    model: str  # dino | ws-dino
    data: Path
    out: Path
    channels: list[str] | None = None
    weak_label: str = "Metadata_Compound"
    arch: str = "vit_small_patch8_224"
    out_dim: int = 65536
    hidden: int = 2048
    bottleneck: int = 256
    init_weights: Path | None = None
    crops: CropSpec = field(default_factory=CropSpec)
    batch_size: int = 16
    epochs: int = 400
    steps_per_epoch: int | None = None  # default: training fields / batch size
    lr: float = 4e-6
    min_lr: float = 3e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.0
    teacher_momentum: float = 0.99
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None
    eval_every: int = 0

    def identity(self) -> dict:
        d = asdict(self)
        for k in ("out", "resume", "max_minutes", "epochs", "device", "data", "init_weights", "eval_every"):
            d.pop(k)
        return d


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, n_global: int, n_crops: int,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """Mean over (teacher global view, student view ≠ that view) of −Σ p_teacher log p_student."""
    s = (student_out / student_temp).chunk(n_crops)
    t = F.softmax((teacher_out - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    for pt, ps in zip(teacher.parameters(), student.parameters()):
        pt.mul_(momentum).add_(ps.detach(), alpha=1 - momentum)


def train_dino(cfg: DinoConfig, progress: Progress | None = None, evaluate: EvaluateFn | None = None):
    """Train DINO / WS-DINO on the store ``cfg.data``. ``evaluate(teacher, store, channels, device)``
    returns metrics (e.g. NSC/NSCB of teacher embeddings) recorded every ``cfg.eval_every`` epochs;
    the evaluation layer supplies it (:func:`cpvs.evaluate.training.moa_matching`). SIGINT/SIGTERM stop
    after the current step with a resumable checkpoint of that step."""
    with run_lock(cfg.out):
        return _train_dino(cfg, progress, evaluate)


def _train_dino(cfg: DinoConfig, progress: Progress | None, evaluate: EvaluateFn | None):
    from cpvs.train.staining import TrainResult

    if cfg.model not in ("dino", "ws-dino"):
        raise CpvsError(f"unknown self-supervised model {cfg.model!r}")
    progress = progress or (lambda *a, **k: None)
    dist, device, store = start_run(cfg.precision, cfg.device, cfg.data)
    channels = cfg.channels or [c for c in store.channels if not is_brightfield(c)]
    store.channel_index(channels)
    done = np.flatnonzero(store.done_mask()).tolist()
    labels = None
    if cfg.model == "ws-dino":
        if cfg.weak_label not in store.table.columns:
            meta = [c for c in store.table.columns if c.startswith("Metadata_")]
            raise CpvsError(f"store has no weak-label column {cfg.weak_label!r}; it has {', '.join(meta)}", store.path,
                            "pass --weak-label with one of those (preprocess the plate with its platemap)")
        labels = store.table[cfg.weak_label].iloc[done].tolist()
    sampler = PairSampler(done, labels)
    steps = cfg.steps_per_epoch or max(1, len(done) // cfg.batch_size)
    spec = cfg.crops
    torch.manual_seed(cfg.seed + dist.rank)
    hp = dict(arch=cfg.arch, out_dim=cfg.out_dim, hidden=cfg.hidden, bottleneck=cfg.bottleneck,
              img_size=spec.global_size, channels=channels)
    student = ChannelModels(channels, cfg.arch, cfg.out_dim, cfg.hidden, cfg.bottleneck, spec.global_size)
    init_notes = {}
    if cfg.init_weights is not None:
        for c in channels:
            init_notes = load_init_weights(student[c].backbone, cfg.init_weights)
    student.to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    center = {c: torch.zeros(cfg.out_dim, device=device) for c in channels}

    resume_from = prepare_run_folder(cfg.out, cfg.resume)
    metrics = MetricsTable(cfg.out / "metrics.parquet")
    start, partial = 1, None
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        check_resume_identity(ck, cfg.identity(), resume_from)
        student.load_state_dict(ck["state"]["student"])
        teacher.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["state"]["optimizer"])
        for c in channels:
            center[c] = ck["state"]["center"][c].to(device)
        set_rng_state(ck["state"]["rng"])
        start = ck["train"]["epoch"] + 1
        partial = ck["train"].get("partial")  # stopped by a signal inside epoch `start`
        metrics = MetricsTable.load(cfg.out / "metrics.parquet", ck["train"]["epoch"])
    if dist.main:
        write_run_record(cfg.out, "train", plain(cfg), inputs={"store": str(cfg.data)},
                         excluded_weak_labels=sampler.excluded, init_weights=init_notes)
    if dist.world > 1:
        student = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)

    meta = dict(family=cfg.model, hparams=hp, inputs=channels, outputs=[],
                normalization=store.normalization(channels),
                data={"store": str(cfg.data), "n_fields": len(done), "weak_label": cfg.weak_label if labels else None,
                      "excluded_weak_labels": sampler.excluded},
                config=plain(cfg))
    total = cfg.epochs * steps
    warmup = cfg.warmup_epochs * steps
    clock = Clock(cfg.max_minutes)
    has_moa = cfg.eval_every > 0 and evaluate is not None
    if has_moa and start == 1 and dist.main:  # the untrained (random or --init-weights) networks, for reference
        teacher.eval()
        scores = evaluate(teacher, store, channels, device)
        if scores:
            metrics.append({"epoch": 0, "step": 0, "seconds": 0.0, "loss": float("nan"), "lr": 0.0, **scores})
    def save(epoch: int, row: dict, partial: dict | None = None) -> None:
        state = {"student": unwrap(student).state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                 "center": {c: v.cpu() for c, v in center.items()}}
        train = {"epoch": epoch, "step": row["step"], "metrics": row} | ({"partial": partial} if partial else {})
        save_checkpoint(cfg.out / "checkpoints" / "last.pt", **meta, state_dict=teacher.state_dict(), train=train, state=state,
                        config_identity=plain(cfg.identity()))

    with graceful_stop(dist.world == 1) as stop:
        epochs_done, stopped = _epochs(cfg, start, partial, steps, total, warmup, store, sampler, spec, channels, student,
                                       teacher, opt, center, device, dist, metrics, clock, progress, save, stop,
                                       evaluate if has_moa else None)
        stop.check()
    frame = metrics.frame()
    n_params = sum(p.numel() for p in teacher.parameters())
    return TrainResult(cfg.out, cfg.model, n_params, epochs_done, None, frame.iloc[-1].to_dict() if len(frame) else {},
                       frame, str(device), stopped)


def _epochs(cfg, start, partial, steps, total, warmup, store, sampler, spec, channels, student, teacher, opt, center, device,
            dist, metrics, clock, progress, save, stop, evaluate) -> tuple[int, bool]:
    """The training epochs from ``start`` (from inside it when ``partial``); (epochs done, stopped by the clock)."""
    epochs_done, stopped = start - 1, False
    for epoch in range(start, cfg.epochs + 1):
        first, losses = 0, []
        if partial and epoch == start:
            first, losses = partial["step"], list(partial["losses"])
        for step in range(first, steps):
            if stop.requested:
                save(epoch - 1, {"step": (epoch - 1) * steps + step}, {"epoch": epoch, "step": step, "losses": losses})
                stop.check()
            gstep = (epoch - 1) * steps + step
            for g in opt.param_groups:
                g["lr"] = lr_at(gstep, total, warmup, cfg.lr, cfg.min_lr)
            rng = np.random.default_rng([cfg.seed, dist.rank, epoch, step])
            pairs = sampler.sample(rng, cfg.batch_size)
            views = {c: [v.to(device) for v in views_for_batch(store, rng, pairs, c, spec)] for c in channels}
            with autocast(device, cfg.precision):
                s_all = student(views)
                with torch.no_grad():
                    t_all = teacher({c: v[: spec.n_global] for c, v in views.items()})
            loss = 0.0
            for c in channels:
                s_out, t_out = s_all[c].float(), t_all[c].float()
                loss = loss + dino_loss(s_out, t_out, center[c], spec.n_global, spec.n_crops, cfg.student_temp, cfg.teacher_temp)
                with torch.no_grad():
                    batch_center = t_out.mean(dim=0)
                    if dist.world > 1:
                        torch.distributed.all_reduce(batch_center)
                        batch_center /= dist.world
                    center[c] = center[c] * cfg.center_momentum + batch_center * (1 - cfg.center_momentum)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ema_update(teacher, unwrap(student), cfg.teacher_momentum)
            losses.append(float(loss.detach()) / len(channels))
            progress("train", gstep + 1, total, info=f"epoch {epoch}/{cfg.epochs} loss {np.mean(losses[-20:]):.4f}")
        row = {"epoch": epoch, "step": epoch * steps, "seconds": round(clock.elapsed, 2), "loss": float(np.mean(losses)),
               "lr": opt.param_groups[0]["lr"]}
        if dist.main:
            if evaluate is not None and epoch % cfg.eval_every == 0:
                teacher.eval()
                row.update(evaluate(teacher, store, channels, device))
            metrics.append(row)
            save(epoch, row)
        dist.barrier()
        epochs_done = epoch
        if dist.agree(clock.out_of_time()) and epoch < cfg.epochs:
            stopped = True
            break
    return epochs_done, stopped
