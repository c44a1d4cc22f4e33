"""Why does a diffusion checkpoint give what it gives? Its whole path, checked on held-out fields.

For a ddpm checkpoint and a plate with both the brightfield planes and the real stains:

1. **Path**: the normalized inputs and targets (mean, std, clipped fraction), the recorded
   clamp range and how much of the truth lies outside it, the de-normalization of outputs
   (the truth sent through the writer's arithmetic: its background median against the
   real one), the geometry (native, work and padded shapes against the training crop),
   and the EMA (steps trained, the final EMA decay with its warm-up, and whether the raw
   weights differ).
2. **Clean-image estimate per noise level**: the truth noised at steps t (fixed noise),
   the network's x̂₀ converted from its output (ε, v or x₀), RMSE and PCC against the
   truth in normalized units, for the EMA and the raw weights; "mean" is the RMSE of
   predicting each field's mean (1 for z-scored truth), and residual checkpoints also
   show the U-Net alone and, when training fitted the residual's shrinkage, the last
   step's estimate shrunk as predict-plate writes it.
3. **Sampler trajectory**: per step of the sampler (``--sampler``, ``--steps``) the PCC and
   RMSE of the current x̂₀ (after the clamp) to the truth, and the fraction of x̂₀ pixels
   at the clamp; then the final sample's PCC and, with ``--samples K``, the mean's.

    python benchmarks/diffusion_diagnostic.py --checkpoint RUN --plate PLATE [--truth PLATE] --fields 2 --steps 20

All numbers are in the normalized space the model works in (PCC is the same there as on
intensities). ``--crop`` limits the work to a centre crop of each field.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cpvs.device import resolve_device
from cpvs.models import load_model
from cpvs.models.diffusion.prediction import to_x0_eps
from cpvs.models.diffusion.samplers import make_sampler
from cpvs.plate.discover import discover_plate
from cpvs.predict.config import DiffusionOptions
from cpvs.predict.diffusion import _pad_to, load_residual, x0_range
from cpvs.preprocess.apply import FieldNormalizer


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over channels of the Pearson correlation of (C, h, w) arrays."""
    out = []
    for x, y in zip(a, b):
        x, y = x.ravel() - x.mean(), y.ravel() - y.mean()
        d = np.sqrt((x * x).sum() * (y * y).sum())
        out.append(float((x * y).sum() / d) if d > 0 else 0.0)
    return float(np.mean(out))


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def centre(a: np.ndarray, crop: int) -> np.ndarray:
    if not crop:
        return a
    h, w = a.shape[-2:]
    ch, cw = min(crop, h), min(crop, w)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return a[..., y0 : y0 + ch, x0 : x0 + cw]


class Case:
    """One held-out field in the model's space: condition, truth, and (residual) the U-Net's prediction."""

    def __init__(self, key, x, truth, base, raw_truth):
        self.key, self.x, self.truth, self.base, self.raw_truth = key, x, truth, base, raw_truth


def load_cases(args, loaded, residual, device) -> list[Case]:
    ck = loaded.checkpoint
    inputs, outputs = ck["inputs"], ck["outputs"]
    plate = discover_plate(args.plate, channels=inputs)
    truth_plate = discover_plate(args.truth or args.plate, channels=outputs)
    truth_of = {(f.well, f.site): f for f in truth_plate.fields}
    norm_in = FieldNormalizer.for_plate(plate, inputs, ck["normalization"], args.illum_fields)
    norm_out = FieldNormalizer.for_plate(truth_plate, outputs, ck["normalization"], args.illum_fields)
    fields = plate.fields[:: max(1, len(plate.fields) // args.fields)][: args.fields]
    cases = []
    for f in fields:
        x, native = norm_in.read(f)
        t = truth_of[(f.well, f.site)]
        y, _ = norm_out.read(t)
        from cpvs.plate.stack import read_field_stack

        raw = read_field_stack(t, outputs)
        if norm_out.illum is not None:
            raw = raw / norm_out.illum
        x, y = centre(x, args.crop), centre(y, args.crop)
        x, y = _pad_to(x, loaded.net.multiple), _pad_to(y, loaded.net.multiple)
        base = residual.base(x) if residual is not None else None
        cases.append(Case(f.key, x, y, base, raw))
        print(f"field {f.key}: native {native[0]}x{native[1]}, work {x.shape[1]}x{x.shape[2]} (padded to a multiple of "
              f"{loaded.net.multiple}), training crop {ck['hparams'].get('crop')}")
    return cases


def path_checks(loaded, cases, residual) -> None:
    ck = loaded.checkpoint
    outputs, norm = ck["outputs"], ck["normalization"]
    print("\n== path ==")
    print(f"prediction {ck['hparams'].get('prediction', 'eps')}, schedule {ck['hparams']['schedule']}, "
          f"residual of {ck['hparams'].get('residual_of', {}).get('checkpoint') if residual else 'none'}")
    print(f"normalization: illum_size {norm['illum_size']}, size {norm['size']}, clip ±{norm['clip']}, z-score {norm['zscore']}")
    x = np.concatenate([c.x.reshape(c.x.shape[0], -1) for c in cases], 1)
    clip = norm["clip"] or np.inf
    for ch, v in zip(ck["inputs"], x):
        print(f"  input {ch:8s} mean {v.mean():+.3f} std {v.std():.3f} min {v.min():+.2f} max {v.max():+.2f} "
              f"at clip {np.mean(np.abs(v) >= clip - 1e-4):.4f}")
    rng = ck.get("target_range") or {}
    for i, ch in enumerate(outputs):
        v = np.concatenate([c.truth[i].ravel() for c in cases])
        if residual is not None:  # the model's target is the scaled residual
            v = np.concatenate([((c.truth[i] - c.base[i]) / residual.scale[i, 0, 0]).ravel() for c in cases])
        lo, hi = rng.get(ch, (-np.inf, np.inf))
        print(f"  {'residual' if residual is not None else 'target'} {ch:6s} mean {v.mean():+.3f} std {v.std():.3f} "
              f"p1 {np.percentile(v, 1):+.2f} p99 {np.percentile(v, 99):+.2f} | clamp [{lo:+.2f}, {hi:+.2f}], "
              f"outside {np.mean((v < lo) | (v > hi)):.4f}, clamp midpoint {(lo + hi) / 2:+.2f}")
    stats = norm["channel_stats"]
    print("de-normalization (the writer maps z back with the store's channel mean/std):")
    for i, ch in enumerate(outputs):
        raw = np.concatenate([c.raw_truth[i].ravel() for c in cases])
        back = np.concatenate([(c.truth[i] * stats[ch]["std"] + stats[ch]["mean"]).ravel() for c in cases])
        print(f"  {ch:6s} truth median {np.median(raw):9.1f}  truth through the writer {np.median(back):9.1f}  "
              f"z=0 -> {stats[ch]['mean']:9.1f}")
    train = ck.get("train", {})
    n = int(train.get("step") or 0)
    ema = ck.get("config", {}).get("ema", 0.9999)
    decay = min(ema, (1 + n) / (10 + n)) if n else float("nan")
    raw = ck.get("state", {}).get("model")
    diff = (np.sqrt(sum(float(((raw[k].float() - v.float()) ** 2).sum()) for k, v in ck["state_dict"].items() if v.is_floating_point()))
            if raw else float("nan"))
    print(f"EMA: {n} steps trained, last decay {decay:.4f} (window ~{1 / max(1 - decay, 1e-9):.0f} steps); "
          f"|raw − EMA| = {diff:.3g}")


def net_fn(net, x, labels=None):
    def f(y, gamma):
        with torch.no_grad():
            return net(x, y, gamma, labels).float()
    return f


def condition(case, residual) -> np.ndarray:
    return np.concatenate([case.x, case.base]) if residual is not None else case.x


def to_stains(case, residual, x0: np.ndarray) -> np.ndarray:
    return residual.add(case.base, x0) if residual is not None else x0


def per_noise_level(args, loaded, raw_net, cases, residual, device) -> None:
    ck = loaded.checkpoint
    schedule = loaded.schedule()
    pred = ck["hparams"].get("prediction", "eps")
    ts = sorted({int(round(v)) for v in np.linspace(0, schedule.T - 1, args.buckets)})
    print("\n== clean-image estimate per noise level (x̂0 vs truth, normalized units; mean over fields) ==")
    head = f"{'t':>5s} {'gamma':>9s} {'SNR':>9s} | {'RMSE ema':>8s} {'PCC ema':>7s}"
    head += f" | {'RMSE raw':>8s} {'PCC raw':>7s}" if raw_net is not None else ""
    print(head)
    gen = torch.Generator().manual_seed(args.seed)
    noises = [torch.randn((len(ck["outputs"]), *c.truth.shape[1:]), generator=gen) for c in cases]
    for t in ts:
        g = float(schedule.gammas[t])
        row = {"ema": [], "raw": []}
        for c, noise in zip(cases, noises):
            target = (c.truth - c.base) / residual.scale if residual is not None else c.truth
            y0 = torch.from_numpy(target)[None].float().to(device)
            y_t = g**0.5 * y0 + (1 - g) ** 0.5 * noise[None].to(device)
            x = torch.from_numpy(condition(c, residual))[None].to(device)
            gamma = torch.tensor([g], device=device, dtype=torch.float32)
            for name, net in (("ema", loaded.net), ("raw", raw_net)):
                if net is None:
                    continue
                with torch.no_grad():
                    out = net(x, y_t, gamma, None).float()
                x0, _ = to_x0_eps(pred, out, y_t, g)
                est = to_stains(c, residual, x0[0].cpu().numpy())
                row[name].append((rmse(est, c.truth), pcc(est, c.truth)))
                if name == "ema" and t == ts[-1] and residual is not None and residual.shrink is not None:
                    shrunk = residual.add(c.base, x0[0].cpu().numpy(), point=True)
                    row["shrunk"] = row.get("shrunk", []) + [(rmse(shrunk, c.truth), pcc(shrunk, c.truth))]
        cells = f"{t:5d} {g:9.3g} {g / (1 - g):9.3g} | " + " ".join(f"{v:8.3f}" if i == 0 else f"{v:7.3f}"
                                                                   for i, v in enumerate(np.mean(row['ema'], 0)))
        if raw_net is not None:
            cells += " | " + " ".join(f"{v:8.3f}" if i == 0 else f"{v:7.3f}" for i, v in enumerate(np.mean(row["raw"], 0)))
        print(cells)
        if "shrunk" in row:
            alpha = " ".join(f"{ch} {a:.2f}" for ch, a in zip(ck["outputs"], residual.shrink.ravel()))
            print(f"      shrunk as predict-plate writes it (α {alpha}): RMSE {np.mean(row['shrunk'], 0)[0]:.3f}, "
                  f"PCC {np.mean(row['shrunk'], 0)[1]:.3f}")
    ref = np.mean([rmse(np.zeros_like(c.truth) + c.truth.mean(axis=(1, 2), keepdims=True), c.truth) for c in cases])
    print(f"reference: RMSE of each field's mean {ref:.3f}", end="")
    if residual is not None:
        print(f"; the U-Net alone: RMSE {np.mean([rmse(c.base, c.truth) for c in cases]):.3f}, "
              f"PCC {np.mean([pcc(c.base, c.truth) for c in cases]):.3f}")
    else:
        print()


def trajectory(args, loaded, cases, residual, device) -> None:
    ck = loaded.checkpoint
    schedule = loaded.schedule()
    outputs = ck["outputs"]
    rng = x0_range(ck, outputs, device) if not args.no_clip else None
    sampler = make_sampler(args.sampler, schedule, args.steps, args.eta, rng, prediction=ck["hparams"].get("prediction", "eps"))
    print(f"\n== sampler trajectory: {args.sampler}, {len(sampler.steps)} steps, clamp {'on' if rng else 'off'} "
          f"(PCC / RMSE of the current x̂0 to the truth; 'at clamp': fraction of x̂0 pixels on a bound) ==")
    rows: dict[int, list] = {}
    finals, means, singles_std = [], [], []
    for ci, c in enumerate(cases):
        x = torch.from_numpy(condition(c, residual))[None].to(device)
        samples = []
        for k in range(args.samples):
            gen = torch.Generator().manual_seed(args.seed * 1000 + ci * 100 + k)
            shape = (1, len(outputs), *c.truth.shape[1:])

            def cb(i, t, y, x0, k=k):
                if k:
                    return
                est = to_stains(c, residual, x0[0].cpu().numpy())
                at = float(((x0 <= rng[0] + 1e-6) | (x0 >= rng[1] - 1e-6)).float().mean()) if rng else 0.0
                rows.setdefault(i, []).append((t, pcc(est, c.truth), rmse(est, c.truth), at, float(y.std())))

            def model_fn(y, t):
                with torch.no_grad():
                    return loaded.net(x, y, schedule.gamma(t), None).float()

            noise = torch.randn(shape, generator=gen).to(device)
            y = sampler.sample(model_fn, noise, lambda i: torch.randn(shape, generator=gen).to(device), callback=cb)
            samples.append(to_stains(c, residual, y[0].cpu().numpy()))
        finals.append(pcc(samples[0], c.truth))
        mean = np.mean(samples, 0)
        means.append((pcc(mean, c.truth), rmse(mean, c.truth)))
        if len(samples) > 1:
            singles_std.append(float(np.std(samples, 0).mean()))
    print(f"{'step':>4s} {'t':>5s} {'PCC x̂0':>7s} {'RMSE':>6s} {'at clamp':>8s} {'std y':>6s}")
    for i in sorted(rows):
        v = np.mean([r[1:] for r in rows[i]], 0)
        print(f"{i + 1:4d} {rows[i][0][0]:5d} {v[0]:7.3f} {v[1]:6.3f} {v[2]:8.4f} {v[3]:6.3f}")
    print(f"final sample: PCC {np.mean(finals):.3f}")
    if args.samples > 1:
        m = np.mean(means, 0)
        print(f"mean of {args.samples} samples: PCC {m[0]:.3f}, RMSE {m[1]:.3f}; mean per-pixel std over samples "
              f"{np.mean(singles_std):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--plate", required=True, help="held-out plate with the brightfield planes (and the stains unless --truth)")
    ap.add_argument("--truth", help="plate with the real stains, when not --plate")
    ap.add_argument("--residual-unet", help="residual checkpoints: the U-Net, when it moved")
    ap.add_argument("--fields", type=int, default=2)
    ap.add_argument("--crop", type=int, default=0, help="centre crop of each field, px of the work resolution (0: whole)")
    ap.add_argument("--buckets", type=int, default=10, help="noise levels, evenly spaced steps from 0 to T-1")
    ap.add_argument("--sampler", default="ddpm")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--eta", type=float, default=0.0)
    ap.add_argument("--samples", type=int, default=1)
    ap.add_argument("--no-clip", action="store_true", help="sample without the clamp of x̂0")
    ap.add_argument("--illum-fields", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    loaded = load_model(args.checkpoint, device, roles=("diffusion",))
    residual = load_residual(loaded.checkpoint, DiffusionOptions(residual_unet=args.residual_unet), device, "fp32")
    raw_net = None
    raw = loaded.checkpoint.get("state", {}).get("model")
    if raw:
        from cpvs.models.registry import build_model

        raw_net = build_model("ddpm", loaded.checkpoint["hparams"]).eval().to(device)
        raw_net.load_state_dict(raw)
    print(f"checkpoint {loaded.path}")
    cases = load_cases(args, loaded, residual, device)
    path_checks(loaded, cases, residual)
    per_noise_level(args, loaded, raw_net, cases, residual, device)
    trajectory(args, loaded, cases, residual, device)
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
