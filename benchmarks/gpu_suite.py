"""One command that runs every GPU path of cpvs on the current device and prints the speed table (issue #16).

Parts, in this order (each with a time cap; see ``--help``):

* ``train``            tiny U-Net, cWGAN, linear, DDPM, classifier and DINO trained for a few steps on a simulated
                       plate with precision bf16 and fp32;
* ``predict``          predict-plate with every staining/diffusion model in bf16 and fp32 (they must agree), classifier
                       guidance, and DDPM samples that do not depend on the batch size;
* ``ddp``              ``torchrun --nproc_per_node=N -m cpvs train ...`` runs and resumes (``--resume``);
* ``unet_speed``       the published U-Net (31 M parameters) on a simulated plate of 998² fields: model-only and
                       end-to-end fields/s, bf16 and fp32, eager and torch.compile (model-only);
* ``diffusion_speed``  the published diffusion network (63 M parameters) at 512²: seconds per field of the real
                       sampler for batch sizes 1/8/16 and 10/20/50 steps, bf16 + torch.compile;
* ``profile``          the cpvs profiling engine per field on the device (when this build has it);
* ``evaluate``         the block-wise retrieval/mAP engine on 100,000 wells (when this build has it).

The whole run never exceeds ``--budget-minutes`` (default 8, CUDA warm-up and data generation included): each part
gets a share of the time left, checks what fits before every step and records what it skipped and why. On a GPU
each part runs in its own process, killed at its cap (a CUDA error cannot poison the next part); a part that
crashes records the last line of its traceback and the suite goes on. Results: ``gpu_suite.json`` and
``gpu_suite.md`` in ``--out`` (default ``benchmarks/results/<device>-<date>/``).

    python benchmarks/gpu_suite.py                              # the GPU check (make gpu-check)
    python benchmarks/gpu_suite.py --smoke                      # every part on CPU at tiny sizes (make test runs it)
    python benchmarks/gpu_suite.py --parts unet_speed --budget-minutes 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import gpu_suite_parts as parts  # noqa: E402
import gpu_suite_speed as speed  # noqa: E402

RUN = {**parts.RUN, **speed.RUN}

PARTS = ("train", "predict", "ddp", "unet_speed", "diffusion_speed", "profile", "evaluate")
# Share of the time left that a part may take (shares of later parts are kept for them).
SHARE = {"train": 0.15, "predict": 0.08, "ddp": 0.08, "unet_speed": 0.31, "diffusion_speed": 0.26, "profile": 0.05,
         "evaluate": 0.07}
# --smoke: the shares of what the parts take at tiny sizes on a CPU (two torchrun launches dominate)
SMOKE_SHARE = {"train": 0.20, "predict": 0.12, "ddp": 0.22, "unet_speed": 0.12, "diffusion_speed": 0.18, "profile": 0.08,
               "evaluate": 0.08}
REPORT_RESERVE_S = 4.0  # kept back for writing the report
KILL_GRACE_S = 3.0  # a part's own checks stop this much before the cap at which it is killed


@dataclass
class Settings:
    """Everything a part needs to know; children receive it as JSON."""

    smoke: bool
    device: str  # resolved: cpu, cuda, cuda:N
    work: str
    deadline: float = 0.0  # time.time() at which this part must be finished
    fields: int = 384  # unet_speed plate
    size: int = 998
    unet_batch: int = 64
    diffusion_size: int = 512
    batch_sizes: tuple[int, ...] = (1, 8, 16)
    steps: tuple[int, ...] = (10, 20, 50)
    eval_wells: int = 100_000
    eval_features: int = 1000
    compile_backend: str = "inductor"
    train_steps: int = 3
    tiny_size: int = 256
    tiny_diffusion: int = 64  # fields of the tiny diffusion models (store and crop)
    threads: int = 0  # torch CPU threads (0: torch's default)

    @classmethod
    def for_run(cls, smoke: bool, device: str, work: str, fields: int | None) -> "Settings":
        if smoke:
            return cls(smoke, device, work, fields=fields or 4, size=256, unet_batch=4, diffusion_size=16, batch_sizes=(1, 2, 4),
                       eval_wells=2000, eval_features=64, compile_backend="eager", train_steps=2, tiny_size=128,
                       tiny_diffusion=32, threads=1)
        on_gpu = device.startswith("cuda")
        return cls(smoke, device, work, fields=fields or 384, unet_batch=64 if on_gpu else 16)


@dataclass
class PartResult:
    name: str
    status: str = "not run"  # ok | partial | skipped | failed | killed | not run
    seconds: float = 0.0
    cap_s: float = 0.0
    figures: dict = field(default_factory=dict)  # key -> {value, unit, note, ok}
    skipped: list = field(default_factory=list)  # {keys, why}
    notes: list = field(default_factory=list)
    error: str | None = None


class Recorder:
    """What a part writes: figures, skipped steps and notes, saved after every entry (a killed part keeps them)."""

    def __init__(self, name: str, settings: Settings, path: Path | None, echo: bool = True):
        self.name, self.s, self.path, self.echo = name, settings, path, echo
        self.result = PartResult(name)
        self.work = Path(settings.work)
        parts.expected(name, settings)  # the figures' labels

    def left(self) -> float:
        """Seconds until this part must stop starting new work."""
        return self.s.deadline - time.time()

    def fits(self, seconds: float, keys, what: str) -> bool:
        """Whether a step estimated at ``seconds`` fits in the time left; if not, it is recorded as skipped."""
        left = self.left()
        if seconds <= left:
            return True
        self.skip(keys, f"{what} needs ~{seconds:.0f} s, {max(left, 0):.0f} s left of the part's cap")
        return False

    def figure(self, key: str, value, unit: str = "", note: str = "", ok: bool | None = None) -> None:
        if self.s.smoke and key.startswith(("unet.", "diff.")):
            ok = None  # the speed goals are for the published networks on a GPU, not for tiny ones on a CPU
        self.result.figures[key] = {"value": value, "unit": unit, "note": note, "ok": ok}
        if self.echo:
            label = parts.LABELS.get(key, key)
            goal = parts.goal_of(key, self.s)
            verdict = "" if ok is None else ("  [goal met]" if ok else "  [goal NOT met]")
            print(f"  {label}: {_fmt(value)} {unit}{f' (goal {goal})' if goal else ''}{verdict}"
                  f"{f'  {note}' if note else ''}", flush=True)
        self.save()

    def skip(self, keys, why: str) -> None:
        keys = [keys] if isinstance(keys, str) else list(keys)
        self.result.skipped.append({"keys": keys, "why": why})
        if self.echo:
            print(f"  skipped {', '.join(parts.LABELS.get(k, k) for k in keys[:3])}{' ...' if len(keys) > 3 else ''}: {why}",
                  flush=True)
        self.save()

    def fail(self, keys, error) -> None:
        """A step that raised: recorded with the last line of its traceback; the part goes on."""
        keys = [keys] if isinstance(keys, str) else list(keys)
        line = error if isinstance(error, str) else _last_line(traceback.format_exception(error))
        self.result.skipped.append({"keys": keys, "why": f"FAILED: {line}", "failed": True})
        if self.echo:
            print(f"  FAILED {', '.join(parts.LABELS.get(k, k) for k in keys[:3])}: {line}", flush=True)
        self.save()

    def note(self, text: str) -> None:
        self.result.notes.append(text)
        if self.echo:
            print(f"  note: {text}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.result), default=str))
        os.replace(tmp, self.path)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 1:
            return f"{v:.2f}"
        if a >= 1e-3:
            return f"{v:.4f}"
        return f"{v:.2e}"
    return str(v)


# -- running parts --------------------------------------------------------------------------------------------------


def run_inline(name: str, settings: Settings, path: Path | None) -> PartResult:
    rec = Recorder(name, settings, path)
    t = time.time()
    try:
        RUN[name](rec)
        rec.result.status = "done"
    except Exception as e:  # a part's crash is a result, not the end of the suite
        rec.result.status = "failed"
        rec.result.error = _last_line(traceback.format_exception(e))
        print(f"  FAILED: {rec.result.error}", flush=True)
    rec.result.seconds = time.time() - t
    rec.save()
    return rec.result


def run_child(name: str, settings: Settings, path: Path, kill_at: float) -> PartResult:
    """The part in a fresh process (own session, so its workers and torchrun die with it), killed at ``kill_at``."""
    state = path.with_suffix(".settings.json")
    state.write_text(json.dumps(asdict(settings)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    t = time.time()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", name, "--state", str(state),
                             "--result", str(path)], start_new_session=True, env=env, stderr=subprocess.PIPE, text=True)
    err_tail: list[str] = []

    import threading

    def pump():  # stderr passes through and its tail is kept for the failure line
        for line in proc.stderr:
            sys.stderr.write(line)
            err_tail.append(line)
            del err_tail[:-50]

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = interrupted = False
    try:
        proc.wait(timeout=max(1.0, kill_at - time.time()))
    except subprocess.TimeoutExpired:
        killed = True
        _kill_group(proc)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM to the suite: the part goes too, and the report is still written
        killed = interrupted = True
        _kill_group(proc)
    reader.join(timeout=5)
    res = PartResult(name)
    if path.exists():
        res = PartResult(**json.loads(path.read_text()))
    res.seconds = time.time() - t
    if interrupted:
        res.status, res.error = "killed", f"the suite was interrupted after {res.seconds:.0f} s (figures recorded before are kept)"
        print("  INTERRUPTED", flush=True)
        raise Interrupted(res)
    if killed:
        res.status = "killed"
        res.error = f"killed at its cap after {res.seconds:.0f} s (figures recorded before are kept)"
        print(f"  KILLED at its cap ({res.seconds:.0f} s)", flush=True)
    elif proc.returncode != 0 and res.status != "failed":
        res.status = "failed"
        res.error = _last_line(err_tail) or f"exit code {proc.returncode}"
        print(f"  FAILED: {res.error}", flush=True)
    return res


class Interrupted(Exception):
    """The suite was stopped (Ctrl-C, SIGTERM) while a part ran; carries what the part recorded."""

    def __init__(self, result: PartResult):
        super().__init__(result.error)
        self.result = result


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=2)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # stuck in the driver: leave it, the suite goes on
        pass


def _last_line(lines) -> str:
    text = "".join(lines).strip().splitlines()
    return text[-1].strip() if text else ""


def child_main(name: str, state: Path, result: Path) -> int:
    settings = Settings(**{**json.loads(state.read_text())})
    settings.batch_sizes, settings.steps = tuple(settings.batch_sizes), tuple(settings.steps)
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    res = run_inline(name, settings, result)
    return 0 if res.status != "failed" else 1


# -- status and report ----------------------------------------------------------------------------------------------


def finish_status(res: PartResult, settings: Settings) -> None:
    """ok: every expected figure is there; partial: some were skipped; skipped: none ran."""
    expected = [k for k, *_ in parts.expected(res.name, settings)]
    have = [k for k in expected if k in res.figures]
    if res.status in ("failed", "killed"):
        return
    failures = [x["why"] for x in res.skipped if x.get("failed")]
    if failures:
        res.status, res.error = "failed", failures[0]
        return
    if not have:
        res.status = "skipped"
    elif len(have) < len(expected):
        res.status = "partial"
    else:
        res.status = "ok"


def why_missing(res: PartResult, key: str) -> str:
    for s in res.skipped:
        if key in s["keys"] or any(key.startswith(k + ".") for k in s["keys"]):
            return f"skipped: {s['why']}"
    if res.status == "failed":
        return f"part failed: {res.error}"
    if res.status == "killed" or res.error:
        return f"not reached: {res.error}"
    return "not reached"


def markdown(report: dict, settings: Settings) -> str:
    env = report["environment"]
    lines = [f"# cpvs GPU suite: {env['device_name']}", "",
             f"{env['when']}; torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}; "
             f"{env['cpus']} CPU cores; {'smoke (tiny sizes)' if settings.smoke else 'full sizes'}; "
             f"budget {report['budget_s']:.0f} s, used {report['seconds']:.0f} s", "",
             "| part | figure | value | unit | goal | met | note |", "|---|---|---|---|---|---|---|"]
    for name in report["selected"]:
        res = PartResult(**report["parts"][name])
        head = f"{name} ({res.status}, {res.seconds:.0f} s of {res.cap_s:.0f} s)"
        for key, label, unit, goal in parts.expected(name, settings):
            fig = res.figures.get(key)
            if fig is None:
                value, met, note = "—", "", why_missing(res, key)
            else:
                value, unit = _fmt(fig["value"]), fig["unit"] or unit
                met = "" if fig["ok"] is None else ("yes" if fig["ok"] else "**no**")
                note = fig["note"]
            lines.append(f"| {head} | {label} | {value} | {unit} | {goal or ''} | {met} | {note.replace('|', '/')} |")
            head = ""
        for text in res.notes:
            lines.append(f"| {head} | note | | | | | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    import platform

    import torch

    info = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda or "none",
            "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none",
            "cpus": os.cpu_count(), "device": device, "cuda_available": torch.cuda.is_available()}
    import cpvs

    info["cpvs"] = cpvs.__version__
    if device.startswith("cuda"):
        t = time.time()
        props = torch.cuda.get_device_properties(torch.device(device))
        info.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", gpus=torch.cuda.device_count(),
                    bf16_supported=torch.cuda.is_bf16_supported(), cuda_init_s=round(time.time() - t, 1),
                    driver=_driver(), tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                    tf32_cudnn=torch.backends.cudnn.allow_tf32)
    else:
        info["device_name"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return info


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


# -- main -----------------------------------------------------------------------------------------------------------


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="every part on CPU at tiny sizes, one torch thread (about 30 s)")
    ap.add_argument("--device", default=None, help="auto (default: a GPU when there is one; cpu with --smoke), cpu, cuda, cuda:N")
    ap.add_argument("--budget-minutes", type=float, default=None, help="the whole run, start to report (default 8; 3 with --smoke)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--out", type=Path, default=None, help="folder for gpu_suite.json and gpu_suite.md")
    ap.add_argument("--fields", type=int, default=None, help="fields of the unet_speed plate (default 384; 4 with --smoke)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--isolate", choices=("auto", "process", "inline"), default="auto",
                    help="run each part in its own process, killed at its cap (auto: yes unless --smoke)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    t0 = time.time()
    args = parse(argv)
    if args.child:
        sys.exit(child_main(args.child, args.state, args.result))
    selected = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in selected if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    budget = 60 * (args.budget_minutes if args.budget_minutes is not None else (3 if args.smoke else 8))
    deadline_all = t0 + budget

    import torch

    from cpvs.device import resolve_device

    device = str(resolve_device(args.device or ("cpu" if args.smoke else "auto")))
    threads = torch.get_num_threads()
    base = Settings.for_run(args.smoke, device, "", args.fields)
    if base.threads:  # --smoke: tiny tensors, one thread is as fast, and far faster on a busy machine
        torch.set_num_threads(base.threads)
    env = environment(device)
    # The first lines: what this ran on.
    print(f"cpvs GPU suite: {env['device_name']} ({device}); torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, "
          f"cpvs {env['cpvs']}, Python {env['python']}, {env['cpus']} CPU cores", flush=True)
    if device.startswith("cuda"):
        print(f"  {env['gpu_memory_gib']} GiB, compute capability {env['capability']}, driver {env['driver']}, "
              f"{env['gpus']} GPU(s) visible, bf16 {'supported' if env['bf16_supported'] else 'NOT supported'}, "
              f"CUDA initialised in {env['cuda_init_s']} s", flush=True)
    elif not args.smoke:
        print(f"  no GPU in use (torch.cuda.is_available() = {torch.cuda.is_available()}): full sizes on CPU", flush=True)
    print(f"  budget {budget:.0f} s; parts: {', '.join(selected)}", flush=True)

    keep_work = args.work is not None
    work = Path(args.work) if keep_work else Path(tempfile.mkdtemp(prefix="cpvs-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or HERE / "results" / f"{slug(env['device_name'] if device != 'cpu' else 'cpu')}-{date.today().isoformat()}"
    out.mkdir(parents=True, exist_ok=True)
    isolate = args.isolate == "process" or (args.isolate == "auto" and not args.smoke)
    base.work = str(work)
    results: dict[str, PartResult] = {}
    interrupted = False
    old_handler = signal.signal(signal.SIGTERM, _sigterm)  # `timeout` sends SIGTERM: stop the part, still write the report
    try:
        available = {name: parts.available(name, base) for name in selected}
        for i, name in enumerate(selected):
            if available[name] is not True:
                results[name] = PartResult(name, "skipped", skipped=[{"keys": [name], "why": available[name]}])
                print(f"\n[{name}] skipped: {available[name]}", flush=True)
                continue
            left = deadline_all - time.time() - REPORT_RESERVE_S
            share = SMOKE_SHARE if args.smoke else SHARE
            cap = left * share[name] / sum(share[p] for p in selected[i:] if available[p] is True)
            print(f"\n[{name}] cap {cap:.0f} s ({left:.0f} s left)", flush=True)
            if cap < parts.MIN_CAP_S[name] * (0.1 if args.smoke else 1):
                why = f"the budget has {left:.0f} s left, {cap:.0f} s for this part (it needs at least {parts.MIN_CAP_S[name]} s)"
                results[name] = PartResult(name, "skipped", cap_s=cap, skipped=[{"keys": [name], "why": why}])
                print(f"  skipped: {why}", flush=True)
                continue
            end = time.time() + cap
            settings = Settings(**{**asdict(base), "deadline": end - (KILL_GRACE_S if isolate else 0.0)})
            path = work / f"part-{name}.json"
            try:
                res = run_child(name, settings, path, end) if isolate else run_inline(name, settings, path)
            except Interrupted as e:
                e.result.cap_s, results[name] = cap, e.result
                interrupted = True
                break
            res.cap_s = cap
            finish_status(res, settings)
            results[name] = res
            print(f"  -> {res.status} in {res.seconds:.0f} s", flush=True)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGTERM, old_handler)
        report = {"environment": env, "budget_s": budget, "seconds": time.time() - t0, "smoke": args.smoke,
                  "interrupted": interrupted,
                  "isolation": "process" if isolate else "inline", "selected": selected,
                  "settings": {k: v for k, v in asdict(base).items() if k not in ("work", "deadline")},
                  "goals": {k: g for p in selected for k, _, _, g in parts.expected(p, base) if g},
                  "parts": {name: asdict(results.get(name, PartResult(name, error="the suite was interrupted" if interrupted
                                                                      else None))) for name in selected}}
        (out / "gpu_suite.json").write_text(json.dumps(report, indent=1, default=str))
        table = markdown(report, base)
        (out / "gpu_suite.md").write_text(table)
        print("\n" + table, flush=True)
        print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} ({report['seconds']:.0f} s of {budget:.0f} s)",
              flush=True)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
