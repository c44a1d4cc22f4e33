"""Diffusion sampling: speed of the full-size network and quality versus the number of steps.

Speed (the published network, ~63 M parameters, random weights are fine for timing):
seconds per 512² five-channel field and fields per device-hour, for every combination
of precision (fp32, bf16), execution (eager, torch.compile) and batch size; at 2000,
250, 50, 20 and 10 steps. The time of one denoising step is measured over repeated
network calls; a sampler adds nothing measurable beyond the calls, so the per-field
figures are steps x measured step time (printed as such). ``--full`` also runs
complete samplers end to end (use it on a GPU).

Quality (a model you trained, e.g. a small one on simulated plates; say so):
PCC and SSIM against the real stains of held-out fields for DDPM at all T steps
and DDIM / DPM-Solver++ at fewer steps.

    python benchmarks/diffusion_sampling.py --device cuda --batch-sizes 1,8,16 --compile
    python benchmarks/diffusion_sampling.py --quality-checkpoint RUN --quality-plate PLATE --fields 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from cpvs.device import resolve_device
from cpvs.models.diffusion.samplers import make_sampler
from cpvs.models.diffusion.schedule import NoiseSchedule
from cpvs.models.diffusion.unet import DiffusionUNet, DiffusionUNetConfig
from cpvs.device import autocast

STEPS = (2000, 250, 50, 20, 10)


def step_time(net, batch: int, size: int, device, precision: str, repeats: int) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randn(batch, 5, size, size, device=device)
    g = torch.rand(batch, device=device)
    with torch.inference_mode(), autocast(device, precision):
        for _ in range(2):  # warm-up (and compilation)
            net(x, y, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(repeats):
            net(x, y, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def speed(args, device) -> None:
    net = DiffusionUNet(DiffusionUNetConfig()).eval().to(device)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; network {params:.1f} M parameters; field {args.size}² x 5 channels")
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    modes = ["eager", "compile"] if args.compile else ["eager"]
    print(f"{'precision':9s} {'mode':8s} {'batch':>5s} {'s/step/field':>13s} " + " ".join(f"{f'{s} steps':>16s}" for s in STEPS))
    for prec in precisions:
        for mode in modes:
            model = torch.compile(net) if mode == "compile" else net
            for b in [int(v) for v in args.batch_sizes.split(",")]:
                per = step_time(model, b, args.size, device, prec, args.repeats) / b
                cells = " ".join(f"{s * per:7.2f} s {3600 / (s * per):6.0f}/h" for s in STEPS)
                print(f"{prec:9s} {mode:8s} {b:5d} {per:13.4f} {cells}")
    print("per-field figures = steps x measured step time (seconds per field, fields per device-hour)")
    if args.full:
        schedule = NoiseSchedule.linear()
        for sampler_name, steps in (("ddpm", 2000), ("ddim", 50), ("dpmpp", 20), ("dpmpp", 10)):
            sampler = make_sampler(sampler_name, schedule, steps)
            b = int(args.batch_sizes.split(",")[-1])
            x = torch.randn(b, 3, args.size, args.size, device=device)
            prec = "bf16" if device.type == "cuda" else "fp32"

            def eps(y, t):
                with autocast(device, prec):
                    return net(x, y, schedule.gamma(t)).float()

            noise = torch.randn(b, 5, args.size, args.size, device=device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with torch.inference_mode():
                sampler.sample(eps, noise, lambda i: torch.randn_like(noise))
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / b
            print(f"end to end: {sampler_name} {len(sampler.steps)} steps, batch {b}, {prec}: {dt:.3f} s/field, {3600 / dt:.0f} fields/h")


def quality(args, device) -> None:
    from cpvs.evaluate.images import evaluate_images
    from cpvs.predict.runner import PredictConfig, predict_plate

    # ddpm over a sub-sequence is the respaced ancestral process (fresh noise at every step)
    runs = [("ddpm", None)] + [(s, n) for s in ("ddpm", "ddim", "dpmpp") for n in (250, 50, 20, 10)]
    if args.quality_steps:
        keep = {int(v) for v in args.quality_steps.split(",")}
        runs = [(s, n) for s, n in runs if (n or 0) in keep]
    if args.samplers:
        runs = [(s, n) for s, n in runs if s in args.samplers.split(",")]
    from cpvs.checkpoints import load_checkpoint

    T = load_checkpoint(args.quality_checkpoint)["hparams"]["schedule"]["T"]  # "all T": the published sampler
    print(f"quality of {args.quality_checkpoint} on {args.fields} field(s) of {args.quality_plate} (held out)")
    with tempfile.TemporaryDirectory() as tmp:
        for sampler, steps in runs:
            out = Path(tmp) / f"{sampler}{steps}"
            t = time.perf_counter()
            n_fields = len(list(Path(args.quality_plate).glob("*ch5sk1*.tiff")))
            shards = max(1, n_fields // max(1, args.fields))
            predict_plate(PredictConfig(Path(args.quality_plate), out, Path(args.quality_checkpoint),
                                        sampler=sampler, steps=steps or T, device=str(device), seed=0,
                                        shard=(1, shards), batch_size=args.fields))
            dt = time.perf_counter() - t
            ev = evaluate_images(out, Path(args.quality_plate))
            s = ev.summary.set_index("channel")
            n = len(list(out.glob("*.tiff"))) // 5
            print(f"{sampler:6s} {str(steps or 'all T'):>6s} steps: PCC {s.loc['all', 'pcc_mean']:.3f}, "
                  f"SSIM {s.loc['all', 'ssim_mean']:.3f} ({n} fields, {dt / max(n, 1):.1f} s/field)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch-sizes", default="1,4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--quality-checkpoint")
    ap.add_argument("--quality-plate")
    ap.add_argument("--quality-steps", help="comma-separated step counts to evaluate (0 = DDPM over all T)")
    ap.add_argument("--fields", type=int, default=4)
    ap.add_argument("--samplers", help="comma-separated samplers for the quality runs (default: ddpm,ddim,dpmpp)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    if not args.skip_speed:
        speed(args, device)
    if args.quality_checkpoint:
        quality(args, device)


if __name__ == "__main__":
    main()
