"""``cpvs train``: one command for every model family.

Options are grouped by family in the help; an option given for a family that does not
use it is an error naming it. Defaults are those of the family's config dataclass
(written once, there); the help shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cpvs.cli.common import (
    finish,
    choices,
    Precision, channels as parse_channels, cli_errors, flag, ints, is_main_rank, out_console, pair, progress_bar, state,
)
from cpvs.errors import CpvsError
from cpvs.train.diffusion import DiffusionConfig
from cpvs.train.dino import DinoConfig
from cpvs.train.multicrop import CropSpec
from cpvs.train.staining import StainingConfig


Model = choices("Model", "unet cwgan linear ddpm classifier dino ws-dino")
Prediction = choices("Prediction", "eps v x0")


STAINING, DIFFUSION, DINO = ("unet", "cwgan", "linear"), ("ddpm", "classifier"), ("dino", "ws-dino")
CONFIGS = {**{f: StainingConfig for f in STAINING}, **{f: DiffusionConfig for f in DIFFUSION}, **{f: DinoConfig for f in DINO}}
ALL = STAINING + DIFFUSION + DINO

# The families each option applies to (options not listed apply to every family).
APPLIES = {
    "inputs": ("unet", "linear", "ddpm", "classifier"), "targets": ("unet", "linear", "ddpm", "classifier"),
    "crop": STAINING + DIFFUSION, "batch_size": ("unet", "cwgan") + DIFFUSION + DINO,
    "epochs": ("unet", "cwgan") + DIFFUSION + DINO, "steps_per_epoch": ("unet", "cwgan") + DIFFUSION + DINO,
    "lr": ("unet", "cwgan") + DIFFUSION + DINO, "weight_decay": ("unet", "cwgan") + DINO,
    "depth": ("unet",), "width": ("unet",) + DIFFUSION, "val_fraction": STAINING + DIFFUSION,
    "select": ("unet", "cwgan", "linear"), "workers": STAINING + DIFFUSION,
    **{k: ("cwgan",) for k in ("init", "critic_steps", "lambda_l1", "lambda_gp", "critic_lr", "critic_weight_decay")},
    "pixels": ("linear",),
    **{k: DINO for k in ("channels", "arch", "init_weights", "out_dim", "hidden_dim", "bottleneck_dim", "n_global", "global_size",
                         "global_scale", "n_local", "local_size", "local_scale", "min_lr", "warmup_epochs", "teacher_momentum",
                         "teacher_temp", "student_temp", "eval_every")},
    "weak_label": ("ws-dino",),
    "label": DIFFUSION, "label_dropout": ("ddpm",), "ema": ("ddpm",), "prediction": ("ddpm",), "residual_of": ("ddpm",),
    **{k: DIFFUSION for k in ("channel_mult", "num_res_blocks", "attention_downsample", "head_channels", "dropout", "schedule",
                              "timesteps", "beta_start", "beta_end")},
}
WHY = {("depth", "cwgan"): "the generator keeps the architecture of the --init U-Net",
       ("inputs", "cwgan"): "the generator keeps the channels of the --init U-Net",
       ("targets", "cwgan"): "the generator keeps the channels of the --init U-Net"}
# Where an option lands in its family's config when the names differ.
FIELD = {"hidden_dim": "hidden", "bottleneck_dim": "bottleneck",
         **{k: f"crops.{k}" for k in ("n_global", "global_size", "global_scale", "n_local", "local_size", "local_scale")},
         "schedule": "schedule.kind", "timesteps": "schedule.T", "beta_start": "schedule.start", "beta_end": "schedule.end"}


def _family_default(family: str, name: str):
    cfg = CONFIGS[family](family, Path("."), Path("."))
    if name == "batch_size" and family in STAINING:
        return cfg.resolved_batch()
    obj = cfg
    for part in FIELD.get(name, name).split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def _text(v) -> str:
    return ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)


def _h(text: str, name: str) -> str:
    """Help text plus the default of every family the option applies to, from the configs."""
    by_value: dict[str, list[str]] = {}
    for fam in APPLIES.get(name, ALL):
        v = _family_default(fam, name)
        if v is not None and v is not False:
            by_value.setdefault(_text(v), []).append(fam)
    if not by_value:
        return text
    if len(by_value) == 1:
        return f"{text} (default: {next(iter(by_value))})"
    return f"{text} (default: " + "; ".join(f"{v} {'/'.join(f)}" for v, f in by_value.items()) + ")"


P_COMMON, P_UNET, P_CWGAN, P_LINEAR = "All families", "U-Net (unet, cwgan)", "cWGAN-GP (cwgan)", "Linear baseline (linear)"
P_DIFF, P_DINO = "Diffusion (ddpm, classifier)", "DINO (dino, ws-dino)"


def _check_applies(model: str, given: dict) -> None:
    wrong = [name for name in given if model not in APPLIES.get(name, ALL)]
    if not wrong:
        return
    name = wrong[0]
    fams = APPLIES[name]
    why = WHY.get((name, model))
    kind = f"a {fams[0]} option" if len(fams) == 1 else f"an option of {', '.join(fams)}"
    raise CpvsError(f"{flag(name)} is {kind}; --model {model} does not use it" + (f" ({why})" if why else ""),
                    hint="drop " + ", ".join(flag(n) for n in wrong) if len(wrong) > 1 else f"drop {flag(name)}")


def build_config(model: str, data: Path, out: Path, device: str, given: dict):
    """The family's config from the options given; every other value is the config's default."""
    _check_applies(model, given)
    g = dict(given)
    for key in ("inputs", "targets", "channels"):
        if key in g:
            g[key] = parse_channels(g[key])
    for key in ("precision", "prediction"):
        if key in g:
            g[key] = g[key].value
    if model in STAINING:
        return StainingConfig(model, data, out, device=device, **g)
    if model in DIFFUSION:
        from cpvs.train.diffusion import schedule_spec

        parts = {k: g.pop(k) for k in ("schedule", "timesteps", "beta_start", "beta_end") if k in g}
        if parts:
            g["schedule"] = schedule_spec(parts.get("schedule"), parts.get("timesteps"), parts.get("beta_start"), parts.get("beta_end"))
        for key in ("channel_mult", "attention_downsample"):
            if key in g:
                g[key] = ints(g[key], flag(key))
        if "label" in g and g["label"] == "none":
            g["label"] = None
        return DiffusionConfig(model, data, out, device=device, **g)
    crops = {k: g.pop(k) for k in ("n_global", "global_size", "global_scale", "n_local", "local_size", "local_scale") if k in g}
    for key in ("global_scale", "local_scale"):
        if key in crops:
            crops[key] = pair(crops[key], flag(key))
    if crops:
        g["crops"] = CropSpec(**crops)
    for cli_name, field_name in (("hidden_dim", "hidden"), ("bottleneck_dim", "bottleneck")):
        if cli_name in g:
            g[field_name] = g.pop(cli_name)
    return DinoConfig(model, data, out, device=device, **g)


@cli_errors
def train(
    ctx: typer.Context,
    model: Annotated[Model, typer.Option(help="Model family: unet (L1 U-Net), cwgan (cWGAN-GP from a U-Net), linear (per-pixel least-squares baseline), ddpm (class-guided image-to-image diffusion), classifier (its guidance classifier), dino, ws-dino (self-supervised ViTs per channel).", rich_help_panel=P_COMMON)],
    data: Annotated[Path, typer.Option(metavar="STORE", help="Store written by `cpvs preprocess`.", rich_help_panel=P_COMMON)],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="RUN", help="Run folder: checkpoints/, metrics.parquet, cpvs-run.json.", rich_help_panel=P_COMMON)],
    inputs: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Comma-separated input channels (default: the store's brightfield planes).", rich_help_panel=P_COMMON)] = None,
    targets: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Comma-separated output channels (default: the store's Cell Painting stains).", rich_help_panel=P_COMMON)] = None,
    crop: Annotated[Optional[int], typer.Option(help=_h("Side of the random training crops, px of the store.", "crop"), rich_help_panel=P_COMMON)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help=_h("Crops (images for dino) per step.", "batch_size"), rich_help_panel=P_COMMON)] = None,
    epochs: Annotated[Optional[int], typer.Option(help=_h("Epochs, with validation and checkpoints after each.", "epochs"), rich_help_panel=P_COMMON)] = None,
    steps_per_epoch: Annotated[Optional[int], typer.Option(help=_h("Optimizer steps per epoch (dino default: fields / batch size; cwgan: generator steps).", "steps_per_epoch"), rich_help_panel=P_COMMON)] = None,
    lr: Annotated[Optional[float], typer.Option(help=_h("Learning rate (Adam; AdamW peak for dino).", "lr"), rich_help_panel=P_COMMON)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help=_h("Weight decay of the U-Net / generator / ViT.", "weight_decay"), rich_help_panel=P_COMMON)] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help=_h("Fraction of fields held out for validation (a band of rows per field when there are fewer than 10 fields).", "val_fraction"), rich_help_panel=P_COMMON)] = None,
    seed: Annotated[Optional[int], typer.Option(help=_h("Seed of weights, crops and split; the same seed reproduces a CPU run.", "seed"), rich_help_panel=P_COMMON)] = None,
    precision: Annotated[Optional[Precision], typer.Option(help=_h("Autocast precision on GPU (the CPU always computes in fp32).", "precision"), rich_help_panel=P_COMMON)] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue the run in --out from its last finished epoch.", rich_help_panel=P_COMMON)] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop after the epoch during which this many minutes have passed (resume later with --resume).", rich_help_panel=P_COMMON)] = None,
    workers: Annotated[Optional[int], typer.Option(help=_h("Threads reading crops from the store.", "workers"), rich_help_panel=P_COMMON)] = None,
    select: Annotated[Optional[str], typer.Option(help=_h("Validation metric choosing checkpoints/best.pt: pcc, ssim, psnr, mae, mse or val_l1.", "select"), rich_help_panel=P_UNET)] = None,
    depth: Annotated[Optional[int], typer.Option(help=_h("U-Net levels (6 = published; crops must be multiples of 2^(depth-1) px).", "depth"), rich_help_panel=P_UNET)] = None,
    width: Annotated[Optional[int], typer.Option(help=_h("Filters of the first level, doubled per level (unet 32: ~31 M parameters; ddpm 64: ~63 M).", "width"), rich_help_panel=P_UNET)] = None,
    init: Annotated[Optional[Path], typer.Option(metavar="RUN", help="U-Net run folder or checkpoint the generator starts from (required).", rich_help_panel=P_CWGAN)] = None,
    critic_steps: Annotated[Optional[int], typer.Option(help=_h("Critic updates per generator update.", "critic_steps"), rich_help_panel=P_CWGAN)] = None,
    lambda_l1: Annotated[Optional[float], typer.Option(help=_h("Weight of the L1 term of the generator loss.", "lambda_l1"), rich_help_panel=P_CWGAN)] = None,
    lambda_gp: Annotated[Optional[float], typer.Option(help=_h("Weight of the gradient penalty of the critic loss.", "lambda_gp"), rich_help_panel=P_CWGAN)] = None,
    critic_lr: Annotated[Optional[float], typer.Option(help=_h("Critic Adam learning rate.", "critic_lr"), rich_help_panel=P_CWGAN)] = None,
    critic_weight_decay: Annotated[Optional[float], typer.Option(help=_h("Critic Adam weight decay.", "critic_weight_decay"), rich_help_panel=P_CWGAN)] = None,
    pixels: Annotated[Optional[int], typer.Option(help=_h("Training pixels sampled for the least-squares fit.", "pixels"), rich_help_panel=P_LINEAR)] = None,
    label: Annotated[Optional[str], typer.Option(metavar="COLUMN", help="Class column the ddpm is conditioned on (e.g. Metadata_Perturbation; 'none' for none); classifier: the classes.", rich_help_panel=P_DIFF)] = None,
    label_dropout: Annotated[Optional[float], typer.Option(help=_h("ddpm: fraction of labels replaced by the null class during training.", "label_dropout"), rich_help_panel=P_DIFF)] = None,
    ema: Annotated[Optional[float], typer.Option(help=_h("ddpm: EMA decay of the sampling weights (with warm-up).", "ema"), rich_help_panel=P_DIFF)] = None,
    prediction: Annotated[Optional[Prediction], typer.Option(help=_h("ddpm: what the network predicts: the noise (eps, published), v = √γ·ε − √(1−γ)·y, or the clean stains (x0).", "prediction"), rich_help_panel=P_DIFF)] = None,
    residual_of: Annotated[Optional[Path], typer.Option(metavar="RUN|FILE", help="ddpm: a U-Net run (or checkpoint); diffuse only the residual of its prediction, conditioned on brightfield and the U-Net's prediction (predict-plate adds the U-Net back).", rich_help_panel=P_DIFF)] = None,
    channel_mult: Annotated[Optional[str], typer.Option(metavar="N,...", help=_h("Width multipliers per level.", "channel_mult"), rich_help_panel=P_DIFF)] = None,
    num_res_blocks: Annotated[Optional[int], typer.Option(help=_h("Residual blocks per level.", "num_res_blocks"), rich_help_panel=P_DIFF)] = None,
    attention_downsample: Annotated[Optional[str], typer.Option(metavar="N,...", help=_h("Down-sampling factors with self-attention.", "attention_downsample"), rich_help_panel=P_DIFF)] = None,
    head_channels: Annotated[Optional[int], typer.Option(help=_h("Channels per attention head.", "head_channels"), rich_help_panel=P_DIFF)] = None,
    dropout: Annotated[Optional[float], typer.Option(help=_h("Dropout in residual blocks.", "dropout"), rich_help_panel=P_DIFF)] = None,
    schedule: Annotated[Optional[str], typer.Option(metavar="linear|cosine", help=_h("Noise schedule.", "schedule"), rich_help_panel=P_DIFF)] = None,
    timesteps: Annotated[Optional[int], typer.Option(help=_h("Diffusion steps T.", "timesteps"), rich_help_panel=P_DIFF)] = None,
    beta_start: Annotated[Optional[float], typer.Option(help=_h("First beta of the linear schedule.", "beta_start"), rich_help_panel=P_DIFF)] = None,
    beta_end: Annotated[Optional[float], typer.Option(help=_h("Last beta of the linear schedule.", "beta_end"), rich_help_panel=P_DIFF)] = None,
    channels: Annotated[Optional[str], typer.Option(metavar="CH,...", help="Channels, one ViT each (default: the store's stains).", rich_help_panel=P_DINO)] = None,
    weak_label: Annotated[Optional[str], typer.Option(metavar="COLUMN", help=_h("ws-dino: metadata column whose equal values pair images (compound is best).", "weak_label"), rich_help_panel=P_DINO)] = None,
    arch: Annotated[Optional[str], typer.Option(help=_h("timm ViT name.", "arch"), rich_help_panel=P_DINO)] = None,
    init_weights: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Local DINO/timm ViT weights to start from (RGB weights are adapted to one channel).", rich_help_panel=P_DINO)] = None,
    out_dim: Annotated[Optional[int], typer.Option(help=_h("Projection head output dimension.", "out_dim"), rich_help_panel=P_DINO)] = None,
    hidden_dim: Annotated[Optional[int], typer.Option(help=_h("Projection head hidden width.", "hidden_dim"), rich_help_panel=P_DINO)] = None,
    bottleneck_dim: Annotated[Optional[int], typer.Option(help=_h("Projection head bottleneck (L2-normalized).", "bottleneck_dim"), rich_help_panel=P_DINO)] = None,
    n_global: Annotated[Optional[int], typer.Option(help=_h("Global crops per image.", "n_global"), rich_help_panel=P_DINO)] = None,
    global_size: Annotated[Optional[int], typer.Option(help=_h("Global crop side after resizing, px.", "global_size"), rich_help_panel=P_DINO)] = None,
    global_scale: Annotated[Optional[str], typer.Option(metavar="LOW,HIGH", help=_h("Global crop area as a fraction of the field.", "global_scale"), rich_help_panel=P_DINO)] = None,
    n_local: Annotated[Optional[int], typer.Option(help=_h("Local crops per image.", "n_local"), rich_help_panel=P_DINO)] = None,
    local_size: Annotated[Optional[int], typer.Option(help=_h("Local crop side after resizing, px.", "local_size"), rich_help_panel=P_DINO)] = None,
    local_scale: Annotated[Optional[str], typer.Option(metavar="LOW,HIGH", help=_h("Local crop area as a fraction of the field.", "local_scale"), rich_help_panel=P_DINO)] = None,
    min_lr: Annotated[Optional[float], typer.Option(help=_h("Learning rate at the end of the cosine decay.", "min_lr"), rich_help_panel=P_DINO)] = None,
    warmup_epochs: Annotated[Optional[int], typer.Option(help=_h("Epochs of linear learning-rate warm-up.", "warmup_epochs"), rich_help_panel=P_DINO)] = None,
    teacher_momentum: Annotated[Optional[float], typer.Option(help=_h("EMA momentum of the teacher.", "teacher_momentum"), rich_help_panel=P_DINO)] = None,
    teacher_temp: Annotated[Optional[float], typer.Option(help=_h("Teacher softmax temperature (sharpening).", "teacher_temp"), rich_help_panel=P_DINO)] = None,
    student_temp: Annotated[Optional[float], typer.Option(help=_h("Student softmax temperature.", "student_temp"), rich_help_panel=P_DINO)] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Every N epochs, record NSC/NSCB of teacher embeddings when the store has MOAs (0: never).", rich_help_panel=P_DINO)] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout (for shell pipelines).", rich_help_panel=P_COMMON)] = False,
) -> None:
    """Train a model on a preprocessed store.

    unet: L1 U-Net from brightfield planes to Cell Painting stains (Adam 2e-4, weight decay 2e-4,
    random 256² crops, batch 10). cwgan: conditional Wasserstein GAN with gradient penalty, the
    generator initialised from a U-Net (--init); lambda_e = 1/epoch. linear: the per-pixel
    least-squares baseline. ddpm: class-conditional image-to-image diffusion (Palette + AdaGN);
    classifier: its noisy-image classifier for guidance. dino / ws-dino: one ViT per channel.
    Each epoch ends with validation in metrics.parquet and checkpoints/last.pt (and best.pt for
    the staining models). Under torchrun, every process trains on its own crops (DDP) and rank 0
    writes. Options of another family than --model are refused.
    """
    st = state(ctx)
    params = dict(locals())
    given = {k: v for k, v in params.items() if k not in ("ctx", "st", "model", "data", "out", "json_out") and v is not None}
    cfg = build_config(model.value, data, out, st.device, given)
    with progress_bar(st.quiet) as cb:
        if model.value in STAINING:
            from cpvs.train.staining import train_staining

            res = train_staining(cfg, progress=cb)
        elif model.value in DIFFUSION:
            from cpvs.train.diffusion import train_diffusion

            res = train_diffusion(cfg, progress=cb)
        else:
            from cpvs.evaluate.training import moa_matching
            from cpvs.train.dino import train_dino

            res = train_dino(cfg, progress=cb, evaluate=moa_matching() if cfg.eval_every else None)
    if is_main_rank():
        finish(st, json_out, res, lambda: _print_result(model.value, cfg, res))


def _print_result(model: str, cfg, res) -> None:
    kind = {"ddpm": ", EMA", "classifier": ", EMA", "dino": ", teacher", "ws-dino": ", teacher"}.get(model, "")
    digits = 2 if model in STAINING else 1
    t = Table(title=f"{res.family} ({res.n_parameters / 1e6:.{digits}f} M parameters{kind}) on {res.device}: {res.run}",
              title_justify="left")
    order = ("epoch", "train_l1", "loss_critic", "loss_generator", "loss", "lr", "val_loss", "val_l1", "mae", "ssim", "psnr",
             "pcc", "nsc", "nscb")
    cols = [c for c in order if c in res.metrics]
    for c in cols:
        t.add_column(c, justify="right")
    for _, row in res.metrics.iterrows():
        t.add_row(*[str(int(row[c])) if c == "epoch" else f"{row[c]:.4g}" for c in cols])
    out_console.print(t)
    if getattr(res, "best_epoch", None) is not None and model in STAINING:
        out_console.print(f"best epoch {res.best_epoch} by {cfg.select}: " + ", ".join(
            f"{m} {res.best[m]:.3f}" for m in ("pcc", "ssim") if m in res.best) + f" -> {res.run / 'checkpoints' / 'best.pt'}")
    if res.stopped_early:
        out_console.print(f"[yellow]stopped after {res.epochs_done} epochs (--max-minutes); continue with --resume[/]")
