"""The parts of ``benchmarks/gpu_suite.py``: what each runs, the figures it reports and their goals.

Every part takes a recorder ``ctx`` (``ctx.s``: the settings, ``ctx.work``: the scratch folder shared by the
parts, ``ctx.left()``: seconds until the part must stop, ``ctx.fits(seconds, keys, what)``, ``ctx.figure``,
``ctx.skip``, ``ctx.fail``, ``ctx.note``). A step that does not fit in the time left is skipped with the reason;
a step that raises is recorded as failed and the part goes on with the next one.

No torch at import time: the suite's parent process reads this module's tables before deciding where parts run.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRECISIONS = ("bf16", "fp32")
TRAIN_FAMILIES = ("unet", "cwgan", "linear", "ddpm", "classifier", "dino")
PREDICT_MODELS = ("unet", "cwgan", "linear", "ddpm")
INPUTS, OUTPUTS = ["BF_low", "BF", "BF_high"], ["DNA", "ER", "RNA", "AGP", "Mito"]
FIELDS_GOAL, SECONDS_GOAL = 1536, 30.0  # issue #16: a 1,536-field plate end to end in 30 s
E2E_SHARE_GOAL = 0.70
DIFFUSION_GOAL_S = 0.25  # s per field at the default sampler and steps (ddpm, 50)
PUBLISHED_STEP_MS = {"fp32.eager": 19.1, "bf16.compile": 6.6}  # H200, the published network, per image-step
# Agreement of bf16 with fp32 predictions: Pearson r over all pixels of a channel (the minimum over channels), and the
# largest |bf16 - fp32| over the fp32 prediction's range (max - min) of that channel.
PCC_TOL = {"staining": 0.99, "diffusion": 0.98}
MAXREL_TOL = {"staining": 0.05, "diffusion": 0.10}
# ddpm batch 1 vs 4, max |diff| / range. CPU: bit-identical for batch sizes >= 3; batches of 1-2 take other GEMM kernels
# (3e-7 of the range, fp32 rounding). GPU: cuDNN picks algorithms per batch size, and fp32 convolutions use TF32.
BATCH_TOL = {"cpu": 1e-5, "cuda": 1e-3}
MIN_CAP_S = {"train": 20, "predict": 10, "ddp": 15, "unet_speed": 20, "diffusion_speed": 20, "profile": 5, "evaluate": 10}
SIM_CORE_S = 0.8  # seconds to render one 998² field on one core (measured on a shared 2-core machine: 0.7)
COMPILE_EST_S = {"inductor": 60.0, "eager": 3.0}  # first torch.compile call, before anything is measured

LABELS: dict[str, str] = {}


def expected(name: str, s) -> list[tuple[str, str, str, str]]:
    """(key, label, unit, goal) of every figure the part reports: the table always has these rows."""
    rows: list[tuple[str, str, str, str]] = []
    if name == "train":
        for fam in TRAIN_FAMILIES:
            for p in (("fp32",) if fam == "linear" else PRECISIONS):
                rows.append((f"train.{fam}.{p}", f"{fam} {p}: last training loss", "", "finite"))
    elif name == "predict":
        for m in PREDICT_MODELS:
            role = "diffusion" if m == "ddpm" else "staining"
            rows.append((f"predict.{m}.pcc", f"{m}: bf16 vs fp32 PCC (min over channels)", "", f"≥ {PCC_TOL[role]}"))
            rows.append((f"predict.{m}.maxrel", f"{m}: max |bf16 − fp32| / fp32 range", "", f"≤ {MAXREL_TOL[role]}"))
        rows.append(("predict.ddpm.guided", "ddpm + classifier guidance (bf16): fields written", "fields", "all, finite"))
        rows.append(("predict.ddpm.batch", "ddpm fp32, batch 1 vs 4: max |Δ| / range", "",
                     f"≤ {BATCH_TOL['cpu' if s.device == 'cpu' else 'cuda']:g}"))
    elif name == "ddp":
        rows.append(("ddp.train", "torchrun -m cpvs train (unet, bf16): epochs", "", "1"))
        rows.append(("ddp.resume", "torchrun ... --resume: epochs in metrics.parquet", "", "2 (1, 2)"))
    elif name == "unet_speed":
        rows.append(("unet.params", "U-Net parameters" + (" (tiny, --smoke)" if s.smoke else " (published)"), "M",
                     "" if s.smoke else "31 (METHODS §2)"))
        rows.append(("unet.plate", f"simulate {s.fields} fields of {s.size}²", "s", ""))
        for p in PRECISIONS:
            for mode in ("eager", "compile"):
                rows.append((f"unet.model.{p}.{mode}", f"model only, {p}, {mode}", "fields/s", ""))
        for p in PRECISIONS:
            rows.append((f"unet.e2e.{p}", f"end to end (predict-plate), {p}, eager", "fields/s",
                         f"≥ {FIELDS_GOAL / SECONDS_GOAL:.1f}"))
            rows.append((f"unet.t1536.{p}", f"{FIELDS_GOAL:,} fields end to end, {p} (projected)", "s", f"≤ {SECONDS_GOAL:.0f}"))
            rows.append((f"unet.ratio.{p}", f"end to end / model only, {p}", "", f"≥ {E2E_SHARE_GOAL:.2f}"))
    elif name == "diffusion_speed":
        rows.append(("diff.params", "diffusion network parameters" + (" (tiny, --smoke)" if s.smoke else " (published)"), "M",
                     "" if s.smoke else "63 (METHODS §5)"))
        big = max(s.batch_sizes)
        for k, label in (("fp32.eager", "fp32, eager"), ("bf16.eager", "bf16, eager"), ("bf16.compile", "bf16, compiled")):
            ref = PUBLISHED_STEP_MS.get(k)
            rows.append((f"diff.step.{k}", f"one step at {s.diffusion_size}², batch {big}, {label}", "ms/image",
                         f"ref. H200 {ref}" if ref and not s.smoke else ""))
        rows.append(("diff.compile", f"torch.compile, first call (bf16, batch {big})", "s", ""))
        for b in s.batch_sizes:
            for n in s.steps:
                rows.append((f"diff.b{b}.s{n}", f"ddpm {n} steps, batch {b}, bf16 compiled", "s/field",
                             f"≤ {DIFFUSION_GOAL_S}" if n == 50 else ""))
        rows.append((f"diff.e2e.b{big}.s50", f"predict-plate ddpm 50 steps, batch {big}, bf16 eager", "s/field", ""))
    elif name == "profile":
        rows.append(("profile.field", f"cpvs profiling engine (measure_field) on {s.device}", "s/field", ""))
    elif name == "evaluate":
        rows.append(("evaluate.all", f"evaluate NSC+NSCB+target+mAP, {s.eval_wells:,} wells x {s.eval_features} features",
                     "s", ""))
    for key, label, *_ in rows:
        LABELS[key] = label
    return rows


def goal_of(key: str, s) -> str:
    for name in ("train", "predict", "ddp", "unet_speed", "diffusion_speed", "profile", "evaluate"):
        for k, _, _, goal in expected(name, s):
            if k == key:
                return goal
    return ""


def available(name: str, s) -> bool | str:
    """True, or why the part cannot run in this build (or this environment)."""
    try:
        return _available(name)
    except Exception as e:  # e.g. a package of the engine missing on the GPU machine
        return f"cannot check: {_last_line(e)}"


def _available(name: str) -> bool | str:
    if name == "profile":
        try:
            from cpvs.profile.engine import measure_field  # noqa: F401
        except ImportError:
            return "not available in this build (no cpvs.profile.engine.measure_field)"
    if name == "evaluate":
        from dataclasses import fields

        from cpvs.evaluate.suite import EvalConfig

        if "device" not in {f.name for f in fields(EvalConfig)}:
            return "not available in this build (cpvs.evaluate.suite.EvalConfig has no device field)"
    if name == "ddp":
        import torch.distributed

        if not torch.distributed.is_available():
            return "torch.distributed is not available in this torch build"
    return True


# -- shared helpers --------------------------------------------------------------------------------------------------


def _dev(ctx):
    import torch

    dev = torch.device(ctx.s.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return torch, dev


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _last_line(e: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()[-1]


def _workers() -> int:
    return os.cpu_count() or 1


def tiny_data(ctx) -> dict[str, Path]:
    """A small simulated plate (12 fields) and its stores (native size, and a smaller one for the diffusion models);
    made once per run and shared by the parts."""
    root = ctx.work / "tiny"
    paths = {"plate": root / "sim" / "SIM0-P01", "store": root / "store.zarr", "small": root / "small.zarr"}
    if (root / ".done").exists():
        return paths
    from cpvs.plate import discover_plate
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.simulate import simulate

    t = time.time()
    sim = simulate(root / "sim", plates=1, wells=6, sites=2, size=ctx.s.tiny_size, seed=0, moas=2, masks=False,
                   workers=1 if ctx.s.smoke else min(8, _workers()))
    plate = discover_plate(sim.plates[0])
    paths["plate"] = sim.plates[0]
    preprocess_plates([plate], paths["store"], workers=2, overwrite=True)
    small = ctx.s.tiny_diffusion
    preprocess_plates([plate], paths["small"], size=(small, small), workers=2, overwrite=True)
    (root / ".done").touch()
    ctx.note(f"tiny plate: 12 simulated fields of {ctx.s.tiny_size}², two stores, in {time.time() - t:.1f} s")
    return paths


class _Stop(Exception):
    """Raised from a progress callback when the part's time is up."""


def _stopper(ctx, margin: float = 1.0, limit: float | None = None):
    """A progress callback that stops the run ``margin`` s before the part's cap, or after ``limit`` s."""
    state = {"done": 0}
    stop_at = time.time() + limit if limit else None

    def progress(stage, done, total, info=""):
        if stage == "fields":
            state["done"] = done
        if ctx.left() < margin or (stop_at and time.time() > stop_at):
            raise _Stop(f"stopped after {done} of {total} {stage} ({'the cap' if ctx.left() < margin else 'its time share'})")

    return progress, state


# -- train ----------------------------------------------------------------------------------------------------------


def _train_one(fam: str, prec: str, d: dict, out: Path, ctx):
    dev, steps = ctx.s.device, ctx.s.train_steps
    if fam in ("unet", "cwgan", "linear"):
        from cpvs.train.staining import StainingConfig, train_staining

        common = dict(device=dev, precision=prec, workers=1)
        if fam == "unet":
            cfg = StainingConfig("unet", d["store"], out, crop=64, depth=3, width=8, epochs=1, steps_per_epoch=steps,
                                 batch_size=4, **common)
        elif fam == "cwgan":
            cfg = StainingConfig("cwgan", d["store"], out, init=ctx.work / "runs" / "unet-bf16", crop=64, batch_size=2,
                                 critic_steps=2, epochs=1, steps_per_epoch=steps, **common)
        else:
            cfg = StainingConfig("linear", d["store"], out, crop=32, pixels=20_000, **common)
        res = train_staining(cfg)
        column = "train_l1" if fam != "linear" else "val_l1"
    elif fam in ("ddpm", "classifier"):
        from cpvs.train.diffusion import DiffusionConfig, train_diffusion

        res = train_diffusion(DiffusionConfig(fam, d["small"], out, label="Metadata_Perturbation", epochs=1, steps_per_epoch=steps,
                                              **_TINY_DIFFUSION, crop=ctx.s.tiny_diffusion, device=dev, precision=prec, workers=1))
        column = "loss"
    else:
        from cpvs.train.dino import DinoConfig, train_dino
        from cpvs.train.multicrop import CropSpec

        res = train_dino(DinoConfig("dino", d["store"], out, channels=["DNA"], arch="vit_tiny_patch16_224", out_dim=256, hidden=64, bottleneck=32,
                                    crops=CropSpec(2, 64, (0.1, 0.2), 3, 32, (0.04, 0.08)), batch_size=3, lr=1e-3, min_lr=1e-4,
                                    warmup_epochs=1, epochs=1, steps_per_epoch=steps, device=dev, precision=prec))
        column = "loss"
    frame = res.metrics
    return float(frame[column].iloc[-1]), res


_TINY_DIFFUSION = dict(width=16, channel_mult=(1, 2), num_res_blocks=1, attention_downsample=(2,), head_channels=16, dropout=0.0,
                       schedule={"kind": "linear", "T": 100, "start": 1e-4, "end": 0.05}, batch_size=2)


def run_train(ctx) -> None:
    d = tiny_data(ctx)  # before CUDA: simulate forks its workers
    _dev(ctx)
    runs = ctx.work / "runs"
    slowest = 0.0
    for fam in TRAIN_FAMILIES:
        for prec in (("fp32",) if fam == "linear" else PRECISIONS):
            key = f"train.{fam}.{prec}"
            if ctx.s.device == "cpu" and prec != "bf16" and fam != "linear":
                ctx.skip(key, "on CPU, bf16 computes in fp32 (cpvs.device.autocast): the same run as bf16")
                continue
            if not ctx.fits(1.5 * slowest, key, f"training {fam} {prec}"):
                continue
            if fam == "cwgan" and not (runs / "unet-bf16" / "checkpoints" / "last.pt").exists():
                ctx.skip(key, "needs the U-Net bf16 run (its --init), which did not finish")
                continue
            out = runs / f"{fam}-{prec}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.time()
            try:
                loss, res = _train_one(fam, prec, d, out, ctx)
            except Exception as e:
                ctx.fail(key, e)
                continue
            took = time.time() - t
            slowest = max(slowest, took)
            what = "least-squares fit" if fam == "linear" else f"{ctx.s.train_steps} steps"
            ctx.figure(key, loss, "", note=f"{what} + validation + checkpoint in {took:.1f} s on {res.device}",
                       ok=bool(math.isfinite(loss)))


# -- predict --------------------------------------------------------------------------------------------------------


def _run_folder(ctx, fam: str) -> Path | None:
    for prec in ("fp32", "bf16"):
        run = ctx.work / "runs" / f"{fam}-{prec}"
        if (run / "checkpoints" / "last.pt").exists():
            return run
    return None


def _read_prediction(folder: Path) -> dict:
    import numpy as np

    from cpvs.plate import discover_plate, read_image

    plate = discover_plate(folder)
    return {c: np.stack([read_image(f.files[c]) for f in plate.fields]).astype(np.float64) for c in plate.channels}


def _agreement(a: dict, b: dict) -> tuple[float, float, bool]:
    """(min PCC over channels, max |a − b| / range(b) over channels, bit-identical) of two predictions (b: reference)."""
    import numpy as np

    pccs, rels, same = [], [], True
    for c in b:
        x, y = a[c].ravel(), b[c].ravel()
        same &= bool(np.array_equal(x, y))
        pccs.append(1.0 if np.array_equal(x, y) else float(np.corrcoef(x, y)[0, 1]))
        rng = float(y.max() - y.min()) or 1.0
        rels.append(float(np.abs(x - y).max()) / rng)
    return min(pccs), max(rels), same


def run_predict(ctx) -> None:
    from cpvs.predict.runner import PredictConfig, predict_plate

    d = tiny_data(ctx)
    _dev(ctx)
    preds = ctx.work / "pred"
    shutil.rmtree(preds, ignore_errors=True)
    slowest = 0.0

    def predict(name: str, run: Path, **kw) -> Path:
        nonlocal slowest
        out = preds / name
        t = time.time()
        res = predict_plate(PredictConfig(d["plate"], out, run, device=ctx.s.device, dtype="float32", workers=2, **kw))
        slowest = max(slowest, time.time() - t)
        if res.n_written != res.n_fields:
            raise RuntimeError(f"{name}: {res.n_written} of {res.n_fields} fields written")
        return out

    for m in PREDICT_MODELS:
        keys = [f"predict.{m}.pcc", f"predict.{m}.maxrel"]
        run = _run_folder(ctx, m)
        if run is None:
            ctx.skip(keys, f"no {m} checkpoint (the train part did not make one)")
            continue
        on_cpu = ctx.s.device == "cpu"
        precisions = ("fp32",) if on_cpu else PRECISIONS  # on CPU bf16 computes in fp32: nothing to compare
        if not ctx.fits(1.2 * len(precisions) * slowest, keys, f"predict-plate with {m} in {' and '.join(precisions)}"):
            continue
        role = "diffusion" if m == "ddpm" else "staining"
        opts = dict(steps=10, seed=0, batch_size=4) if m == "ddpm" else dict(tile=64, stride=32, batch_size=16)
        try:
            got = {p: _read_prediction(predict(f"{m}-{p}", run, precision=p, **opts)) for p in precisions}
        except Exception as e:
            ctx.fail(keys, e)
            continue
        if on_cpu:
            ctx.skip(keys, f"{m} predicted in fp32 ({run.name} checkpoint); on CPU bf16 computes in fp32 (cpvs.device.autocast): "
                           "the same prediction")
            continue
        pcc, rel, same = _agreement(got["bf16"], got["fp32"])
        ctx.figure(keys[0], pcc, "", note=f"{run.name} checkpoint; bit-identical: {same}", ok=pcc >= PCC_TOL[role])
        ctx.figure(keys[1], rel, "", ok=rel <= MAXREL_TOL[role])

    ddpm, clf = _run_folder(ctx, "ddpm"), _run_folder(ctx, "classifier")
    if ddpm is None or clf is None:
        ctx.skip("predict.ddpm.guided", "needs the ddpm and classifier runs of the train part")
    elif ctx.fits(1.5 * slowest, "predict.ddpm.guided", "guided ddpm prediction"):
        try:
            got = _read_prediction(predict("ddpm-guided", ddpm, precision="bf16", steps=10, seed=0, batch_size=4, guidance=1.0,
                                           classifier=clf))
            import numpy as np

            finite = all(bool(np.isfinite(v).all()) for v in got.values())
            n = len(next(iter(got.values())))
            ctx.figure("predict.ddpm.guided", n, "fields", note=f"classifier {clf.name}; values finite: {finite}", ok=finite)
        except Exception as e:
            ctx.fail("predict.ddpm.guided", e)

    key = "predict.ddpm.batch"
    if ddpm is None or not (preds / "ddpm-fp32").exists():
        ctx.skip(key, "needs the fp32 ddpm prediction above")
    elif ctx.fits(1.5 * slowest, key, "ddpm prediction with batch size 1"):
        try:
            one = _read_prediction(predict("ddpm-fp32-batch1", ddpm, precision="fp32", steps=10, seed=0, batch_size=1))
            _, rel, same = _agreement(one, _read_prediction(preds / "ddpm-fp32"))
            on_cpu = ctx.s.device == "cpu"
            why = ("" if same else "; the same random numbers, but kernels differ by batch size (CPU: GEMM paths for batches "
                   "of 1-2; GPU: cuDNN algorithms, TF32 convolutions), so sums are rounded differently")
            ctx.figure(key, rel, "", note=f"bit-identical: {same}{why}", ok=rel <= BATCH_TOL["cpu" if on_cpu else "cuda"])
        except Exception as e:
            ctx.fail(key, e)


# -- ddp ------------------------------------------------------------------------------------------------------------


def _bounded(cmd: list[str], timeout: float, env: dict) -> subprocess.CompletedProcess:
    """Run ``cmd``; past ``timeout`` it gets SIGTERM (torchrun passes it to its workers), then SIGKILL."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise TimeoutError(f"{' '.join(cmd[:6])} ... did not finish in {timeout:.0f} s") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ddp(ctx) -> None:
    import pandas as pd
    import torch

    d = tiny_data(ctx)
    cuda = ctx.s.device.startswith("cuda")
    nproc = max(1, min(2, torch.cuda.device_count())) if cuda else 1
    run = ctx.work / "ddp"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "cpvs",
           "--device", "cuda" if cuda else "cpu", "--quiet", "train", "--model", "unet", "--data", str(d["store"]), "-o", str(run),
           "--crop", "64", "--depth", "3", "--width", "8", "--steps-per-epoch", str(ctx.s.train_steps), "--batch-size", "4",
           "--workers", "1", "--precision", "bf16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if nproc == 1:
        ctx.note("one process: torchrun sets WORLD_SIZE=1, so cpvs trains without a process group or DDP wrapper "
                 "(NCCL needs 2 GPUs; tests/test_staining.py runs 2 gloo ranks on CPU)")
    took = 0.0
    for key, extra, want in (("ddp.train", ["--epochs", "1"], [1]), ("ddp.resume", ["--epochs", "2", "--resume"], [1, 2])):
        if not ctx.fits(1.2 * took, key, " ".join(["torchrun", *extra])):
            return
        t = time.time()
        try:
            r = _bounded(cmd + extra, ctx.left(), env)
            if r.returncode != 0:
                tail = (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]
                raise RuntimeError(f"torchrun exit {r.returncode}: {tail}")
            epochs = [int(e) for e in pd.read_parquet(run / "metrics.parquet")["epoch"]]
        except Exception as e:
            ctx.fail(key, e)
            return
        took = time.time() - t
        ctx.figure(key, len(epochs), "", note=f"epochs {epochs}; {nproc} process(es) on {'cuda' if cuda else 'cpu'}; {took:.1f} s",
                   ok=epochs == want)


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
    # The plate first: simulate forks its workers before this process touches CUDA.
    plate = None
    wells, sites = _plate_shape(s.fields)
    n = wells * sites
    est = n * SIM_CORE_S * (s.size / 998) ** 2 / _workers() * 1.15 + 2
    if ctx.fits(est, ["unet.plate"] + e2e_keys, f"simulating {n} fields of {s.size}² with {_workers()} workers"):
        t = time.time()
        sim = simulate(ctx.work / "speed", plates=1, wells=wells, sites=sites, size=s.size, seed=1, masks=False, workers=_workers())
        plate = sim.plates[0]
        ctx.figure("unet.plate", time.time() - t, "s", note=f"{n} fields ({wells} wells x {sites} sites), {_workers()} workers; "
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
        if plate is None:
            ctx.skip(keys, "no plate (its simulation did not fit)")
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

    # Most wanted first, so that a short budget still gets them: the default precision end to end, then compile.
    model_only("bf16", "eager", net)
    model_only("fp32", "eager", net)
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
    plate = speed_plate if speed_plate.exists() else d["plate"]
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


def _selftest_sleep(ctx) -> None:
    """For the runner's tests: one figure, then past the cap (the runner must kill it and keep the figure)."""
    ctx.figure("selftest.before", 1.0)
    time.sleep(max(0.0, ctx.left()) + 60)
    ctx.figure("selftest.after", 2.0)


def _selftest_crash(ctx) -> None:
    """For the runner's tests: one figure, then an exception (recorded, and the suite goes on)."""
    ctx.figure("selftest.before", 1.0)
    raise RuntimeError("selftest crash")


RUN = {"_sleep": _selftest_sleep, "_crash": _selftest_crash, "train": run_train, "predict": run_predict, "ddp": run_ddp, "unet_speed": run_unet_speed,
       "diffusion_speed": run_diffusion_speed, "profile": run_profile, "evaluate": run_evaluate}
