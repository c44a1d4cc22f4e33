"""Training the virtual-staining models: U-Net (L1), cWGAN-GP, and the per-pixel linear baseline.

Defaults are the published ones (METHODS §2–3). Each epoch ends with validation
image metrics appended to ``RUN/metrics.parquet``, ``checkpoints/last.pt`` (with
optimizer and RNG state, for ``--resume``) and ``checkpoints/best.pt`` when the
selection metric improved. A resumed run replays from the last finished epoch and
ends with the same weights as an uninterrupted one (on CPU; GPU kernels may not be
bit-deterministic).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from cpvs.checkpoints import load_checkpoint, save_checkpoint
from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.jobs import graceful_stop
from cpvs.models import build_model, load_model, n_parameters
from cpvs.models.critic import PatchCritic, gradient_penalty
from cpvs.preprocess.store import Store
from cpvs.runinfo import plain, write_run_record
from cpvs.train.data import CropSampler, default_channels
from cpvs.train.runtime import (
    BETTER, Clock, MetricsTable, Progress, check_resume_identity, is_better,
    prepare_run_folder, run_lock, rng_state, set_rng_state, start_run, unwrap, validate
)

FAMILIES = ("unet", "cwgan", "linear")


@dataclass
class StainingConfig:
    model: str
    data: Path
    out: Path
    inputs: list[str] | None = None
    targets: list[str] | None = None
    crop: int = 256
    batch_size: int | None = None  # 10 for unet, 4 for cwgan (published)
    epochs: int = 50
    steps_per_epoch: int = 300
    lr: float = 2e-4
    weight_decay: float = 2e-4
    depth: int = 6
    width: int = 32
    val_fraction: float = 0.1
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    resume: bool = False
    max_minutes: float | None = None
    select: str = "pcc"
    workers: int = 2
    # cWGAN-GP
    init: Path | None = None
    critic_steps: int = 5
    lambda_l1: float = 100.0
    lambda_gp: float = 10.0
    critic_lr: float = 2e-4
    critic_weight_decay: float = 1e-3
    critic_width: int = 64
    # linear baseline
    pixels: int = 2_000_000

    def resolved_batch(self) -> int:
        return self.batch_size or (4 if self.model == "cwgan" else 10)

    def identity(self) -> dict:
        """Settings a resumed run must share with the run it continues."""
        d = asdict(self)
        for k in ("out", "resume", "max_minutes", "epochs", "device", "workers", "data", "init"):
            d.pop(k)
        d["batch_size"] = self.resolved_batch()
        return d


@dataclass
class TrainResult:
    run: Path
    family: str
    n_parameters: int
    epochs_done: int
    best_epoch: int | None
    best: dict = field(default_factory=dict)
    metrics: pd.DataFrame = field(default_factory=pd.DataFrame)
    device: str = "cpu"
    stopped_early: bool = False


def _checkpoint_meta(cfg: StainingConfig, family, hparams, inputs, targets, store: Store, sampler) -> dict:
    return dict(
        family=family, hparams=hparams, inputs=inputs, outputs=targets,
        normalization=store.normalization(inputs + targets), data=sampler.summary() if sampler else {},
        config=plain(cfg),
    )


def train_staining(cfg: StainingConfig, progress: Progress | None = None) -> TrainResult:
    """Train ``cfg.model`` (unet | cwgan | linear) on the store ``cfg.data`` into the run folder ``cfg.out``.

    SIGINT/SIGTERM stop after the current step with a resumable checkpoint of that step
    (``--resume`` continues exactly there)."""
    with run_lock(cfg.out):
        return _train_staining(cfg, progress)


def _train_staining(cfg: StainingConfig, progress: Progress | None) -> TrainResult:
    if cfg.model not in FAMILIES:
        raise CpvsError(f"unknown staining model {cfg.model!r}; use one of {', '.join(FAMILIES)}")
    if cfg.select not in BETTER:
        raise CpvsError(f"--select must be one of {', '.join(BETTER)}, got {cfg.select!r}")
    progress = progress or (lambda *a, **k: None)
    dist, device, store = start_run(cfg.precision, cfg.device, cfg.data)
    if cfg.model == "linear":
        return _fit_linear(cfg, store, device, progress)

    init = None
    if cfg.model == "cwgan":
        if cfg.init is None:
            raise CpvsError("cwgan training starts from a trained U-Net", hint="pass --init RUN_UNET (a run folder or checkpoint)")
        init = load_model(cfg.init, roles=("staining",), option="--init").checkpoint
        if init["family"] not in ("unet", "cwgan"):
            raise CpvsError(f"--init must be a U-Net checkpoint, this one is {init['family']}", init["path"])
        inputs, targets = init["inputs"], init["outputs"]
        hparams = dict(init["hparams"])
        store.channel_index(inputs + targets)
    else:
        inputs, targets = default_channels(store, cfg.inputs, cfg.targets)
        hparams = dict(in_channels=len(inputs), out_channels=len(targets), depth=cfg.depth, width=cfg.width)

    torch.manual_seed(cfg.seed + dist.rank)
    model = build_model(cfg.model, hparams).to(device)
    if cfg.crop % model.multiple:
        raise CpvsError(f"--crop {cfg.crop} must be a multiple of {model.multiple} for a depth-{hparams['depth']} U-Net")
    if init is not None:
        model.load_state_dict(init["state_dict"])
    sampler = CropSampler(store, inputs, targets, cfg.crop, cfg.val_fraction, cfg.seed, cfg.workers)
    batch = cfg.resolved_batch()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                           betas=(0.0, 0.9) if cfg.model == "cwgan" else (0.9, 0.999))
    critic = critic_opt = None
    if cfg.model == "cwgan":
        critic = PatchCritic(len(inputs) + len(targets), cfg.critic_width).to(device)
        critic_opt = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, weight_decay=cfg.critic_weight_decay, betas=(0.0, 0.9))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.precision == "fp16")

    resume_from = prepare_run_folder(cfg.out, cfg.resume)
    metrics = MetricsTable(cfg.out / "metrics.parquet")
    start, best_val, best_epoch, skip, logs0 = 1, None, None, 0, {}
    if resume_from is not None:
        ck = load_checkpoint(resume_from)
        check_resume_identity(ck, cfg.identity(), resume_from)
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["state"]["optimizer"])
        if critic is not None:
            critic.load_state_dict(ck["state"]["critic"])
            critic_opt.load_state_dict(ck["state"]["critic_optimizer"])
        set_rng_state(ck["state"]["rng"])
        start = ck["train"]["epoch"] + 1
        best_val, best_epoch = ck["train"]["best"], ck["train"]["best_epoch"]
        if ck["train"].get("partial"):  # stopped by a signal inside epoch `start`
            skip, logs0 = ck["train"]["partial"]["step"], ck["train"]["partial"]["logs"]
        metrics = MetricsTable.load(cfg.out / "metrics.parquet", ck["train"]["epoch"])
    if dist.main:
        write_run_record(cfg.out, "train", plain(cfg), inputs={"store": str(cfg.data), "init": str(cfg.init) if cfg.init else None})
    if dist.world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if critic is not None:
            critic = nn.parallel.DistributedDataParallel(critic, device_ids=[device.index] if device.type == "cuda" else None)

    meta = _checkpoint_meta(cfg, cfg.model, hparams, inputs, targets, store, sampler)
    clock = Clock(cfg.max_minutes)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    epochs_done = start - 1
    stopped = False
    l1 = nn.L1Loss()

    def save_partial(epoch: int, step: int, logs: dict) -> None:
        """The state after ``step`` steps of ``epoch``: weights, optimizers, RNG and the epoch's logs."""
        state = {"optimizer": opt.state_dict(), "rng": rng_state()}
        if critic is not None:
            state.update(critic=unwrap(critic).state_dict(), critic_optimizer=critic_opt.state_dict())
        train_info = {"epoch": epoch - 1, "step": (epoch - 1) * cfg.steps_per_epoch + step, "best": best_val,
                      "best_epoch": best_epoch, "select": cfg.select, "partial": {"epoch": epoch, "step": step, "logs": logs}}
        save_checkpoint(cfg.out / "checkpoints" / "last.pt", **meta, state_dict=unwrap(model).state_dict(), train=train_info,
                        state=state, config_identity=cfg.identity())

    progress("train", (start - 1) * cfg.steps_per_epoch + skip, total_steps, info="starting")
    with graceful_stop(dist.world == 1) as stop:
        for epoch in range(start, cfg.epochs + 1):
            per_step = (cfg.critic_steps + 1) if critic is not None else 1
            first = skip if epoch == start else 0
            plan = sampler.plan_epoch(epoch, cfg.steps_per_epoch * per_step, batch, dist.rank)
            batches = sampler.batches(plan[first * per_step :])
            logs: dict[str, list[float]] = {k: list(v) for k, v in logs0.items()} if first else {}
            model.train()
            for step in range(first, cfg.steps_per_epoch):
                if stop.requested:
                    save_partial(epoch, step, logs)
                    stop.check()
                _train_step(cfg, epoch, model, critic, opt, critic_opt, scaler, batches, device, logs, l1)
                done = (epoch - 1) * cfg.steps_per_epoch + step + 1
                key = "train_l1" if critic is None else "loss_generator"
                progress("train", done, total_steps, info=f"epoch {epoch}/{cfg.epochs} {key} {np.mean(logs[key][-20:]):.4f}")
            best_val, best_epoch = _end_epoch(cfg, epoch, logs, model, critic, opt, critic_opt, sampler, device, targets, meta,
                                              metrics, clock, best_val, best_epoch, dist)
            epochs_done = epoch
            if dist.agree(clock.out_of_time()) and epoch < cfg.epochs:
                stopped = True
                break
        stop.check()  # a signal during the last validation: the work is saved, the exit code still says why
    frame = metrics.frame()
    best_row = frame.loc[frame["epoch"] == best_epoch].iloc[0].to_dict() if best_epoch is not None and len(frame) else {}
    return TrainResult(cfg.out, cfg.model, n_parameters(unwrap(model)), epochs_done, best_epoch, best_row, frame,
                       str(device), stopped)


def _train_step(cfg, epoch, model, critic, opt, critic_opt, scaler, batches, device, logs, l1) -> None:
    if critic is not None:
        _cwgan_step(cfg, epoch, model, critic, opt, critic_opt, batches, device, logs)
        return
    x, y = (torch.from_numpy(a).to(device, non_blocking=True) for a in next(batches))
    with autocast(device, cfg.precision):
        loss = l1(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    logs.setdefault("train_l1", []).append(float(loss.detach()))


def _end_epoch(cfg, epoch, logs, model, critic, opt, critic_opt, sampler, device, targets, meta, metrics, clock, best_val,
               best_epoch, dist):
    """Validation, metrics row, last.pt (and best.pt when the selected metric improved); (best value, best epoch)."""
    row = {"epoch": epoch, "step": epoch * cfg.steps_per_epoch, "seconds": round(clock.elapsed, 2)}
    row.update({k: float(np.mean(v)) for k, v in logs.items()})
    if dist.main:
        val = validate(unwrap(model), sampler, device, cfg.precision, targets)
        row.update(val)
        metrics.append(row)
        improved = is_better(cfg.select, val[cfg.select], best_val)
        if improved:
            best_val, best_epoch = val[cfg.select], epoch
        train_info = {"epoch": epoch, "step": row["step"], "metrics": val, "best": best_val, "best_epoch": best_epoch,
                      "select": cfg.select}
        state = {"optimizer": opt.state_dict(), "rng": rng_state()}
        if critic is not None:
            state.update(critic=unwrap(critic).state_dict(), critic_optimizer=critic_opt.state_dict())
        weights = unwrap(model).state_dict()
        save_checkpoint(cfg.out / "checkpoints" / "last.pt", **meta, state_dict=weights, train=train_info,
                        state=state, config_identity=cfg.identity())
        if improved:
            save_checkpoint(cfg.out / "checkpoints" / "best.pt", **meta, state_dict=weights, train=train_info)
    dist.barrier()
    return best_val, best_epoch


def _cwgan_step(cfg, epoch, gen, critic, opt_g, opt_d, batches, device, logs) -> None:
    """One generator update after ``critic_steps`` critic updates, each on a fresh batch.

    Critic minimizes E[D(x, G(x))] − E[D(x, y)] + λ₂·GP; the generator minimizes
    λ₁·L1 − λₑ·E[D(x, G(x))] with λₑ = 1/epoch (the adaptive weight of METHODS §3).
    """
    for _ in range(cfg.critic_steps):
        x, y = (torch.from_numpy(a).to(device) for a in next(batches))
        with torch.no_grad(), autocast(device, cfg.precision):
            fake = gen(x).float()
        with autocast(device, cfg.precision):
            d_real = critic(x, y).float().mean()
            d_fake = critic(x, fake).float().mean()
        gp = gradient_penalty(critic, x, y, fake)
        loss_d = d_fake - d_real + cfg.lambda_gp * gp
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        logs.setdefault("loss_critic", []).append(float(loss_d.detach()))
        logs.setdefault("gradient_penalty", []).append(float(gp.detach()))
        logs.setdefault("wasserstein", []).append(float((d_real - d_fake).detach()))
    x, y = (torch.from_numpy(a).to(device) for a in next(batches))
    lambda_e = lambda_schedule(epoch)
    with autocast(device, cfg.precision):
        fake = gen(x).float()
        adv = critic(x, fake).float().mean()
    rec = torch.nn.functional.l1_loss(fake, y)
    loss_g = cfg.lambda_l1 * rec - lambda_e * adv
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    logs.setdefault("loss_generator", []).append(float(loss_g.detach()))
    logs.setdefault("train_l1", []).append(float(rec.detach()))
    logs.setdefault("lambda_e", []).append(lambda_e)


def _fit_linear(cfg: StainingConfig, store: Store, device, progress) -> TrainResult:
    """Least-squares fit of each target channel on the input planes (plus a constant), per pixel."""
    inputs, targets = default_channels(store, cfg.inputs, cfg.targets)
    prepare_run_folder(cfg.out, False)
    sampler = CropSampler(store, inputs, targets, min(cfg.crop, *store.shape), cfg.val_fraction, cfg.seed, cfg.workers)
    rng = np.random.default_rng(cfg.seed)
    fields = sampler.split.train_fields
    r0, r1 = sampler.split.train_rows
    per_field = max(1, cfg.pixels // len(fields))
    xs, ys = [], []
    chans = store.channel_index(inputs + targets)
    for i, f in enumerate(fields):
        img = np.asarray(store.images.oindex[f, chans, r0:r1], dtype=np.float32)
        flat = img.reshape(len(chans), -1)
        pick = rng.integers(0, flat.shape[1], min(per_field, flat.shape[1]))
        xs.append(flat[: len(inputs), pick].T)
        ys.append(flat[len(inputs):, pick].T)
        progress("fit", i + 1, len(fields), info="least squares")
    x = np.concatenate(xs).astype(np.float64)
    y = np.concatenate(ys).astype(np.float64)
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    hparams = dict(in_channels=len(inputs), out_channels=len(targets))
    model = build_model("linear", hparams)
    with torch.no_grad():
        model.conv.weight.copy_(torch.from_numpy(coef[:-1].T.astype(np.float32))[:, :, None, None])
        model.conv.bias.copy_(torch.from_numpy(coef[-1].astype(np.float32)))
    model = model.to(device)
    val = validate(model, sampler, device, "fp32", targets)
    metrics = MetricsTable(cfg.out / "metrics.parquet")
    metrics.append({"epoch": 1, "step": 1, "pixels": len(x), **val})
    meta = _checkpoint_meta(cfg, "linear", hparams, inputs, targets, store, sampler)
    train_info = {"epoch": 1, "step": 1, "metrics": val, "best": val[cfg.select], "best_epoch": 1, "select": cfg.select}
    for name in ("best.pt", "last.pt"):
        save_checkpoint(cfg.out / "checkpoints" / name, **meta, state_dict=model.state_dict(), train=train_info)
    write_run_record(cfg.out, "train", plain(cfg), inputs={"store": str(cfg.data)})
    return TrainResult(cfg.out, "linear", n_parameters(model), 1, 1, {"epoch": 1, **val}, metrics.frame(), str(device))


def lambda_schedule(epoch: int) -> float:
    """λₑ = 1/epoch (1-based): the adversarial weight decays as training goes on."""
    return 1.0 / max(1, epoch)


