"""The speed parts of ``benchmarks/gpu_suite.py`` (U-Net, diffusion) and the engines built on other branches
(profiling, evaluation), which run only where this build has them. Conventions: see ``gpu_suite_parts``.
"""

from __future__ import annotations

import math
import shutil
import time

from gpu_suite_parts import (
    COMPILE_EST_S,
    DIFFUSION_GOAL_S,
    E2E_SHARE_GOAL,
    FIELDS_GOAL,
    INPUTS,
    OUTPUTS,
    PRECISIONS,
    SECONDS_GOAL,
    SIM_CORE_S,
    _TINY_DIFFUSION,
    _Stop,
    _dev,
    _stopper,
    _sync,
    _workers,
    tiny_data,
)


# -- U-Net speed ----------------------------------------------------------------------------------------------------


def _plate_shape(fields: int) -> tuple[int, int]:
    """(wells, sites) with wells x sites >= fields, 4 <= wells <= 384."""
    sites = 4 if fields >= 16 else 1
    wells = max(4, math.ceil(fields / sites))
    if wells > 384:
        wells, sites = 384, math.ceil(fields / 384)
    return wells, sites


def _rate(ctx, fn, per_call: int, window: float, dev, steady: float | None = None) -> tuple[float, str] | None:
    """Items per second of ``fn``: one warm-up call, then timed calls for ``window`` s while the part has time for
    another. ``steady``: the expected seconds of a call after the warm-up (when the warm-up compiles); else the
    warm-up's. Returns (rate, how it was measured); if no timed call fits: the warm-up's rate for an eager call, None
    after a compilation."""
    t = time.perf_counter()
    fn()
    _sync(dev)
    first = time.perf_counter() - t
    est = first if steady is None else steady
    calls, t = 0, time.perf_counter()
    while (calls < 2 or time.perf_counter() - t < window) and ctx.left() > 1.5 * est + 1:
        c = time.perf_counter()
        fn()
        _sync(dev)
        calls, est = calls + 1, time.perf_counter() - c
    if calls == 0:
        if steady is not None:
            return None
        return per_call / first, f"from the warm-up call alone ({first:.1f} s; no time for more)"
    dt = time.perf_counter() - t
    return calls * per_call / dt, f"{calls} timed calls after a {first:.2f} s warm-up"


def run_unet_speed(ctx) -> None:
    s = ctx.s
    from cpvs.checkpoints import save_checkpoint
    from cpvs.device import autocast
    from cpvs.models import build_model, n_parameters
    from cpvs.predict.runner import PredictConfig, predict_plate
    from cpvs.predict.tiling import tile_grid
    from cpvs.preprocess.store import Store
    from cpvs.simulate import simulate

    e2e_keys = [f"unet.{k}.{p}" for p in PRECISIONS for k in ("e2e", "t1536", "ratio")]
    wells, sites = _plate_shape(s.fields)
    n = wells * sites
    plate_state = {"plate": None, "why": "no plate"}

    def make_plate() -> None:
        """The simulated plate, on all cores; given up early when it would not leave time to use it. (Forking the
        renderers after CUDA is up is safe: they never touch CUDA, as with DataLoader workers.)"""
        workers = _workers()
        est = n * SIM_CORE_S * (s.size / 998) ** 2 / workers * 1.15 + 2
        if not ctx.fits(est, ["unet.plate"] + e2e_keys, f"simulating {n} fields of {s.size}² with {workers} workers"):
            plate_state["why"] = "no plate (its simulation did not fit)"
            return
        t = time.time()

        def progress(stage, done, total, info=""):
            spent = time.time() - t
            ahead = spent / max(done, 1) * (total - done)
            if ctx.left() < 1 or (done >= min(total, 2 * workers) and ahead > ctx.left() - 15):
                raise _Stop(f"stopped after {done} of {total} fields in {spent:.0f} s: ~{ahead:.0f} s more, "
                            f"{ctx.left():.0f} s left of the part's cap")

        try:
            sim = simulate(ctx.work / "speed", plates=1, wells=wells, sites=sites, size=s.size, seed=1, masks=False,
                           workers=workers, progress=progress)
        except _Stop as e:
            ctx.skip(["unet.plate"] + e2e_keys, f"plate simulation {e}")
            plate_state["why"] = "no plate (its simulation was stopped)"
            return
        plate_state["plate"] = sim.plates[0]
        ctx.figure("unet.plate", time.time() - t, "s", note=f"{n} fields ({wells} wells x {sites} sites), {workers} workers; "
                                                            f"estimated {est:.0f} s")

    d = tiny_data(ctx)
    torch, dev = _dev(ctx)
    hp = {"in_channels": 3, "out_channels": 5, "depth": 3 if s.smoke else 6, "width": 8 if s.smoke else 32}
    model = build_model("unet", hp)
    ctx.figure("unet.params", n_parameters(model) / 1e6, "M", note=f"depth {hp['depth']}, width {hp['width']}; random weights")
    ck = save_checkpoint(ctx.work / "unet-speed.pt", family="unet", hparams=hp, inputs=INPUTS, outputs=OUTPUTS,
                         normalization=Store(d["store"]).normalization(INPUTS + OUTPUTS), state_dict=model.state_dict())
    net = model.eval().to(dev)
    tiles_per_field = len(tile_grid((s.size, s.size), 256, 128))
    batch = s.unet_batch
    x = torch.randn(batch, 3, 256, 256, device=dev)
    window = 0.3 if s.smoke else 3.0
    model_fps: dict[str, float] = {}

    call_s: list[float] = []  # seconds of one eager call, once known

    def model_only(p: str, mode: str, fn) -> None:
        key = f"unet.model.{p}.{mode}"
        if mode == "eager" and call_s and not ctx.fits(2.2 * call_s[0], key, f"model-only calls ({call_s[0]:.1f} s each)"):
            return
        steady = (call_s[0] if call_s else 1.0) if mode == "compile" else None

        def call():
            with torch.inference_mode(), autocast(dev, p):
                fn(x)

        try:
            got = _rate(ctx, call, batch, window, dev, steady)
        except Exception as e:
            ctx.fail(key, e)
            return
        if got is None:
            ctx.skip(key, "no time left for a timed call after compiling")
            return
        tiles_s, how = got
        if mode == "eager" and not call_s:
            call_s.append(batch / tiles_s)
        model_fps[f"{p}.{mode}"] = tiles_s / tiles_per_field
        ctx.figure(key, tiles_s / tiles_per_field, "fields/s",
                   note=f"{tiles_s:,.0f} tiles/s of 256², batch {batch}, {tiles_per_field} tiles per field; {how}")

    def end_to_end(p: str) -> None:
        keys = [f"unet.{k}.{p}" for k in ("e2e", "t1536", "ratio")]
        plate = plate_state["plate"]
        if plate is None:
            ctx.skip(keys, plate_state["why"])
            return
        guess = n / max(model_fps.get(f"{p}.eager", 1.0) * E2E_SHARE_GOAL, 1e-6) + (1 if s.smoke else 5)
        if not ctx.fits(min(guess, 30.0), keys, f"predict-plate on {n} fields"):
            return
        out = ctx.work / f"speed-pred-{p}"
        progress, state = _stopper(ctx, limit=max(20.0, 0.4 * ctx.left()))  # a rate needs no more; leave time for the rest
        t = time.perf_counter()
        stopped = ""
        try:
            res = predict_plate(PredictConfig(plate, out, ck, device=s.device, precision=p, batch_size=batch,
                                              workers=min(16, _workers())), progress)
            written = res.n_written
        except _Stop as e:
            written, stopped = state["done"], f"; {e}"
        except Exception as e:
            ctx.fail(keys, e)
            return
        finally:
            shutil.rmtree(out, ignore_errors=True)
        dt = time.perf_counter() - t
        if not written:
            ctx.skip(keys, f"no field written before the cap ({dt:.0f} s){stopped}")
            return
        fps = written / dt
        ctx.figure(keys[0], fps, "fields/s", note=f"{written} fields in {dt:.1f} s (TIFFs read, illumination from up to 256 "
                                                  f"fields, tiles, model, median stitch, TIFFs written){stopped}",
                   ok=fps >= FIELDS_GOAL / SECONDS_GOAL)
        ctx.figure(keys[1], FIELDS_GOAL / fps, "s", note=f"{FIELDS_GOAL:,} / the rate above", ok=FIELDS_GOAL / fps <= SECONDS_GOAL)
        ref = model_fps.get(f"{p}.eager")
        if ref:
            ctx.figure(keys[2], fps / ref, "", note="vs model only, eager, same precision and batch", ok=fps / ref >= E2E_SHARE_GOAL)
        else:
            ctx.skip(keys[2], "no model-only figure to compare with")

    compiled, compile_s = None, COMPILE_EST_S[s.compile_backend]

    def compiled_model_only(p: str) -> None:
        nonlocal compiled, compile_s
        key = f"unet.model.{p}.compile"
        if not ctx.fits(compile_s + 3 * (call_s[0] if call_s else 0.0), key, f"torch.compile ({s.compile_backend})"):
            return
        if compiled is None:
            compiled = torch.compile(net, backend=s.compile_backend)
        t = time.time()
        model_only(p, "compile", compiled)
        compile_s = time.time() - t  # a recompile (the other precision) costs about as much

    # Most wanted first, so that a short budget still gets them: model only, the default precision end to end, compile.
    model_only("bf16", "eager", net)
    model_only("fp32", "eager", net)
    make_plate()
    end_to_end("bf16")
    compiled_model_only("bf16")
    end_to_end("fp32")
    compiled_model_only("fp32")
    ctx.note("predict-plate has no compile option: end to end is eager; the compiled figures are model only "
             f"(backend {s.compile_backend}{', dynamo tracing only in --smoke' if s.smoke else ''})")


# -- diffusion speed ------------------------------------------------------------------------------------------------


def run_diffusion_speed(ctx) -> None:
    s = ctx.s
    torch, dev = _dev(ctx)
    from cpvs.device import autocast
    from cpvs.models.diffusion.samplers import make_sampler
    from cpvs.models.diffusion.schedule import NoiseSchedule
    from cpvs.models.diffusion.unet import DiffusionUNet, DiffusionUNetConfig

    cfg = DiffusionUNetConfig(**{k: v for k, v in _TINY_DIFFUSION.items() if k in ("width", "channel_mult", "num_res_blocks",
                                                                                    "attention_downsample", "head_channels")}
                              ) if s.smoke else DiffusionUNetConfig()
    torch.manual_seed(0)
    net = DiffusionUNet(cfg).eval().to(dev)
    ctx.figure("diff.params", sum(p.numel() for p in net.parameters()) / 1e6, "M",
               note=f"width {cfg.width}, mult {list(cfg.channel_mult)}, {cfg.num_res_blocks} res blocks, attention at "
                    f"{list(cfg.attention_downsample)}x down; random weights")
    schedule = NoiseSchedule.linear()  # the published 2,000 steps; samplers respace it
    size, big = s.diffusion_size, max(s.batch_sizes)
    window = 0.3 if s.smoke else 3.0

    def inputs(b: int):
        return (torch.randn(b, 3, size, size, device=dev), torch.randn(b, 5, size, size, device=dev),
                torch.rand(b, device=dev))

    def step_ms(key: str, fn, p: str, b: int, steady: float | None = None) -> float | None:
        x, y, g = inputs(b)

        def call():
            with torch.no_grad(), autocast(dev, p):
                fn(x, y, g)

        try:
            got = _rate(ctx, call, b, window, dev, steady)
        except Exception as e:
            ctx.fail(key, e)
            return None
        if got is None:
            ctx.skip(key, "no time left for a timed call after compiling")
            return None
        per_image, how = got
        ctx.figure(key, 1000 / per_image, "ms/image", note=f"batch {b}; {how}")
        return 1000 / per_image

    eager_ms = None
    for p in ("fp32", "bf16"):
        key = f"diff.step.{p}.eager"
        if ctx.fits(2.5 * (eager_ms or 0) * big / 1000, key, "eager steps"):
            eager_ms = step_ms(key, net, p, big) or eager_ms
    image_ms = eager_ms  # per image-step: the compiled figure replaces it once measured

    lo, hi = (torch.full((1, 5, 1, 1), v, device=dev) for v in (-15.0, 15.0))
    compiled, compile_s = None, COMPILE_EST_S[s.compile_backend]
    for b in sorted(s.batch_sizes, reverse=True):  # the largest batch (the goal's) first
        keys = [f"diff.b{b}.s{n}" for n in s.steps] + (["diff.compile", "diff.step.bf16.compile"] if compiled is None else [])
        # compiled per batch size: the first call at a new batch size recompiles, as dynamo specializes on shapes
        need = compile_s + 50 * (image_ms or 0) * b / 1000 * 1.2
        if not ctx.fits(need, keys, f"torch.compile ({s.compile_backend}) and 50 steps at batch {b}"):
            continue
        try:
            first = compiled is None
            if first:
                compiled = torch.compile(net, backend=s.compile_backend)
            x, y, g = inputs(b)
            t = time.perf_counter()
            with torch.no_grad(), autocast(dev, "bf16"):
                compiled(x, y, g)
            _sync(dev)
            took = compile_s = time.perf_counter() - t
            if first:
                ctx.figure("diff.compile", took, "s", note=f"first call at batch {b} ({s.compile_backend})")
                steady = (image_ms or 100.0) * b / 1000  # the eager call's seconds: no slower once compiled
                image_ms = step_ms("diff.step.bf16.compile", compiled, "bf16", b, steady) or image_ms
            else:
                ctx.note(f"recompiled for batch {b} in {took:.0f} s")
        except Exception as e:
            ctx.fail(keys, e)
            continue

        def eps_fn(yt, t, x=x):
            with autocast(dev, "bf16"):
                return compiled(x, yt, schedule.gamma(t)).float()

        per_step = None
        for n in sorted(s.steps, reverse=True):  # the default (50) first
            key = f"diff.b{b}.s{n}"
            guess = per_step if per_step is not None else (image_ms or 0) * b / 1000
            if not ctx.fits(n * guess * 1.2 + 0.2, key, f"{n} steps at batch {b}"):
                continue
            sampler = make_sampler("ddpm", schedule, n, x0_range=(lo, hi))
            noise = torch.randn(b, 5, size, size, device=dev)
            try:
                _sync(dev)
                t = time.perf_counter()
                with torch.no_grad():
                    out = sampler.sample(eps_fn, noise, lambda i: torch.randn_like(noise))
                _sync(dev)
                dt = time.perf_counter() - t
            except Exception as e:
                ctx.fail(key, e)
                continue
            per_step = dt / n
            ok = dt / b <= DIFFUSION_GOAL_S if n == 50 else None
            ctx.figure(key, dt / b, "s/field", note=f"{dt:.2f} s per batch; {3600 * b / dt:,.0f} fields/h; "
                                                    f"finite: {bool(torch.isfinite(out).all())}", ok=ok)

    _diffusion_e2e(ctx, net, cfg, big, eager_ms)


def _diffusion_e2e(ctx, net, cfg, big: int, eager_ms: float | None) -> None:
    """predict-plate with the published network (random weights): what the sampler costs inside the real path."""
    from cpvs.checkpoints import save_checkpoint
    from cpvs.predict.runner import PredictConfig, predict_plate
    from cpvs.preprocess.store import Store
    from cpvs.train.diffusion import DEFAULT_SCHEDULE

    s = ctx.s
    key = f"diff.e2e.b{big}.s50"
    speed_plate = ctx.work / "speed" / "SIM1-P01"
    d = tiny_data(ctx)
    plate = speed_plate if (speed_plate / "load_data.csv").exists() else d["plate"]  # written when the plate is complete
    from cpvs.plate import discover_plate

    n_plate = len(discover_plate(plate).fields)
    shards = max(1, n_plate // big)
    est = (eager_ms or 50.0) / 1000 * 50 * big * 1.3 + 10
    if not ctx.fits(est, key, f"predict-plate on {big} fields, 50 steps"):
        return
    size = s.diffusion_size
    norm = dict(Store(d["store"]).normalization(INPUTS + OUTPUTS), size=[size, size])
    ck = save_checkpoint(ctx.work / "ddpm-speed.pt", family="ddpm", hparams={"net": cfg.to_dict(), "schedule": DEFAULT_SCHEDULE,
                                                                             "crop": size},
                         inputs=INPUTS, outputs=OUTPUTS, normalization=norm, classes=[], label=None,
                         state_dict={k: v.detach().cpu() for k, v in net.state_dict().items()})
    out = ctx.work / "ddpm-speed-pred"
    progress, state = _stopper(ctx)
    t = time.perf_counter()
    stopped = ""
    try:
        res = predict_plate(PredictConfig(plate, out, ck, device=s.device, precision="bf16", batch_size=big, steps=50,
                                          shard=(1, shards), workers=min(16, _workers())), progress)
        written = res.n_written
    except _Stop as e:
        written, stopped = state["done"], f"; {e}"
    except Exception as e:
        ctx.fail(key, e)
        return
    finally:
        shutil.rmtree(out, ignore_errors=True)
    dt = time.perf_counter() - t
    if not written:
        ctx.skip(key, f"no field written before the cap{stopped}")
        return
    model = f"; model only, eager: {eager_ms * 50 / 1000:.3f} s/field" if eager_ms else ""
    ctx.figure(key, dt / written, "s/field", note=f"{written} fields of {plate.name} resized to {size}² in {dt:.1f} s, noise "
                                                  f"drawn on the CPU per field (as predict does){model}{stopped}")


# -- profile and evaluate -------------------------------------------------------------------------------------------


def run_profile(ctx) -> None:
    import numpy as np

    from cpvs.plate import discover_plate, read_image
    from cpvs.profile.engine import measure_field
    from cpvs.profile.segment import segment_field
    from cpvs.simulate import simulate

    s = ctx.s
    n = 2 if s.smoke else 5
    sim = simulate(ctx.work / "profile", plates=1, wells=4, sites=2, size=s.size, seed=2, masks=False, workers=min(8, _workers()))
    fields = discover_plate(sim.plates[0]).fields[:n]
    _, dev = _dev(ctx)
    key = "profile.field"
    times, cells, t_seg = [], [], 0.0
    for i, f in enumerate(fields):
        images = {c: read_image(f.files[c]).astype(np.float64) / 65535 for c in OUTPUTS}
        t = time.perf_counter()
        masks = segment_field(images)
        t_seg += time.perf_counter() - t
        if times and not ctx.fits(1.5 * max(times), key, "another field"):
            break
        t = time.perf_counter()
        try:
            measure_field(images, masks, OUTPUTS, device=s.device)
        except Exception as e:
            ctx.fail(key, e)
            return
        _sync(dev)
        times.append(time.perf_counter() - t)
        cells.append(int(masks.n))
    if not times:
        ctx.skip(key, "no field measured")
        return
    timed = times[1:] or times
    ctx.figure(key, float(np.mean(timed)), "s/field",
               note=f"mean of {len(timed)} field(s) after a {times[0]:.1f} s first call; {np.mean(cells):.0f} cells per field of "
                    f"{s.size}²; segmentation (CPU, not included) {t_seg / len(times):.1f} s/field")


def synthetic_wells(n: int, n_features: int, seed: int = 0):
    """Wells with a known MOA structure: 50 MOAs, compounds at 3 doses x 4 replicates, ~10 % DMSO, 10 batches."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_moa, reps, doses, n_batches = 50, 4, 3, 10
    n_dmso = n // 10
    n_cmp = max(n_moa, (n - n_dmso) // (reps * doses))
    moa = np.arange(n_cmp) % n_moa
    comp = np.repeat(np.arange(n_cmp), reps * doses)[: n - n_dmso]
    dose = np.tile(np.repeat(np.arange(1, doses + 1), reps), n_cmp)[: len(comp)]
    batch = np.concatenate([rng.integers(0, n_batches, n_cmp)[comp], rng.integers(0, n_batches, n_dmso)])
    x = rng.standard_normal((n, n_features), dtype=np.float32)
    sig = (rng.standard_normal((n_moa, n_features), dtype=np.float32) * 0.4)[moa[comp]] * (dose[:, None] / doses)
    x[: len(comp)] += sig
    x += (rng.standard_normal((n_batches, n_features), dtype=np.float32) * 0.3)[batch]
    meta = pd.DataFrame({
        "Metadata_Plate": [f"P{i // 384:05d}" for i in range(n)],
        "Metadata_Well": [f"{'ABCDEFGHIJKLMNOP'[(i % 384) // 24]}{i % 24 + 1:02d}" for i in range(n)],
        "Metadata_Batch": [f"B{b}" for b in batch],
        "Metadata_Compound": [f"c{c:05d}" for c in comp] + ["DMSO"] * n_dmso,
        "Metadata_Concentration": np.concatenate([dose * 0.1, np.zeros(n_dmso)]),
        "Metadata_MOA": [f"moa{m:02d}" for m in moa[comp]] + ["DMSO"] * n_dmso,
        "Metadata_Target": [f"G{m * 5 + c % 5}" for m, c in zip(moa[comp], comp)] + [None] * n_dmso,
        "Metadata_ControlType": [""] * len(comp) + ["negcon"] * n_dmso,
    })
    feats = pd.DataFrame(x, columns=[f"Cells_Intensity_F{i:04d}_DNA" for i in range(n_features)])
    return pd.concat([meta, feats], axis=1)


def run_evaluate(ctx) -> None:
    from cpvs.evaluate.suite import EvalConfig, evaluate_profiles

    s = ctx.s
    key = "evaluate.all"
    t = time.time()
    table = ctx.work / "wells.parquet"
    synthetic_wells(s.eval_wells, s.eval_features).to_parquet(table)
    ctx.note(f"synthetic table of {s.eval_wells:,} wells x {s.eval_features} features in {time.time() - t:.0f} s")
    if not ctx.fits(5.0, key, "evaluate"):
        return
    stages: dict[str, list[float]] = {}
    stop, _ = _stopper(ctx)

    def progress(stage, done, total, info=""):
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now
        stop(stage, done, total, info)

    t = time.perf_counter()
    try:
        res = evaluate_profiles(EvalConfig(table, nsc=True, nscb=True, target=True, map=True, device=s.device), progress=progress)
    except Exception as e:
        ctx.fail(key, e)
        return
    dt = time.perf_counter() - t
    nsc = res.results.get("nsc")
    score = getattr(nsc, "score", None) if nsc is not None else None
    ctx.figure(key, dt, "s", note=f"device {s.device}; stages " + ", ".join(f"{k} {v[1] - v[0]:.1f} s" for k, v in stages.items())
               + (f"; NSC {score:.2f}" if isinstance(score, float) else ""))


RUN = {"unet_speed": run_unet_speed, "diffusion_speed": run_diffusion_speed, "profile": run_profile, "evaluate": run_evaluate}
