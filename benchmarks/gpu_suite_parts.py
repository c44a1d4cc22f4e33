"""The parts of ``benchmarks/gpu_suite.py``: the figures each reports and their goals, the helpers the parts share,
and the correctness parts (train, predict, ddp); the speed parts are in ``gpu_suite_speed``.

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


def _selftest_sleep(ctx) -> None:
    """For the runner's tests: one figure, then past the cap (the runner must kill it and keep the figure)."""
    ctx.figure("selftest.before", 1.0)
    time.sleep(max(0.0, ctx.left()) + 60)
    ctx.figure("selftest.after", 2.0)


def _selftest_crash(ctx) -> None:
    """For the runner's tests: one figure, then an exception (recorded, and the suite goes on)."""
    ctx.figure("selftest.before", 1.0)
    raise RuntimeError("selftest crash")


RUN = {"_sleep": _selftest_sleep, "_crash": _selftest_crash, "train": run_train, "predict": run_predict, "ddp": run_ddp}
