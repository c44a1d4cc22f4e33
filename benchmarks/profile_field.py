"""Profiling speed per field, side by side on the same field and masks, every module on:
cp_measure (the reference engine, one core) and the cpvs engine (one torch thread, all cores,
and CUDA when there is a GPU), with the share of image reading and segmentation in the
per-field path; then fields per hour of `cpvs profile` with --workers.

    python benchmarks/profile_field.py                      # a simulated 998² field
    python benchmarks/profile_field.py --field pediatric    # the real pediatric field (1080², 30 cells)
    python benchmarks/profile_field.py --skip costes        # what a --skip costs or saves
    python benchmarks/profile_field.py --no-reference       # without the (slow) cp_measure run
    python benchmarks/profile_field.py --dense              # ~2,000 objects (2,600²): engine time and peak memory
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # cp_measure's numpy on one core; torch sets its own threads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
# Idle OpenMP threads sleep instead of spinning: with spinning, several torch threads on a busy
# machine run the engine several times slower than one thread.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]
PEDIATRIC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "fields" / "pediatric_BR00143976_C03_f03"
PEDIATRIC_FILES = {"DNA": 5, "ER": 2, "RNA": 6, "AGP": 3, "Mito": 4}  # 1=BF,2=ER,3=AGP,4=Mito,5=DNA,6=RNA


def clock(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def field_files(kind: str, tmp: Path) -> dict[str, Path]:
    if kind == "pediatric":
        return {c: PEDIATRIC / f"r03c03f03p01-ch{v}sk1fk1fl1.tiff" for c, v in PEDIATRIC_FILES.items()}
    from cpvs.plate import discover_plate
    from cpvs.simulate import simulate

    sim = simulate(tmp / "sim", plates=1, wells=4, sites=1, size=998, seed=0, masks=False)
    f = discover_plate(sim.plates[0]).fields[0]
    return {c: f.files[c] for c in CHANNELS}


def read(files: dict[str, Path]) -> dict[str, np.ndarray]:
    from cpvs.plate import read_image

    return {c: read_image(p).astype(np.float64) / 65535 for c, p in files.items()}


def engine_run(images, masks, skip, device="cpu", threads=1):
    import torch

    from cpvs.profile.engine import measure_field

    torch.set_num_threads(threads)
    timings: dict[str, float] = {}
    df, wall, cpu = clock(lambda: measure_field(images, masks, CHANNELS, skip, device=device, timings=timings))
    return df, wall, cpu, timings


def dense_render(size: int, path: Path) -> None:
    """In a fresh process: a dense simulated field and its masks, saved to ``path`` (npz)."""
    from cpvs.profile.segment import SegmentParams, segment_field
    from cpvs.simulate.render import plate_optics, render_field

    raw, _, _ = render_field(np.random.default_rng(0), (size, size), {"count": 1.4, "size": -0.5}, 1.0,
                             plate_optics(np.random.default_rng(0), 0))
    images = {c: raw[c].astype(np.float64) / 65535 for c in CHANNELS}
    masks, t_seg, _ = clock(lambda: segment_field(images, SegmentParams(keep_border=True)))
    np.savez(path, nuclei=masks.nuclei, cells=masks.cells, t_seg=t_seg, **{c: raw[c] for c in CHANNELS})


def dense_measure(path: Path, skip: tuple[str, ...]) -> None:
    """In a fresh process: read the dense field and its masks, measure; prints JSON (peak memory of
    this process: the field, its masks and the engine)."""
    from cpvs.profile.segment import pair_objects

    data = np.load(path)
    images = {c: data[c].astype(np.float64) / 65535 for c in CHANNELS}
    masks = pair_objects(data["nuclei"], data["cells"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    df, wall, cpu, timings = engine_run(images, masks, skip)
    print(json.dumps({"objects": masks.n, "columns": df.shape[1], "segmentation_s": float(data["t_seg"]), "engine_s": wall,
                      "engine_cpu_s": cpu, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                      "rss_before_engine_gib": rss_before, "timings": timings}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--field", choices=["simulated", "pediatric"], default="simulated")
    ap.add_argument("--skip", default="")
    ap.add_argument("--no-reference", action="store_true", help="skip the cp_measure run")
    ap.add_argument("--fields", type=int, default=4, help="fields for the fields-per-hour runs (0: none)")
    ap.add_argument("--repeats", type=int, default=3, help="engine runs per setting (the median is reported)")
    ap.add_argument("--dense", action="store_true", help="a dense ~2,000-object field: engine time and peak RSS")
    ap.add_argument("--dense-size", type=int, default=2600)
    ap.add_argument("--dense-render", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--dense-measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    skip = tuple(s for s in args.skip.split(",") if s)
    warnings.simplefilter("ignore")
    if args.dense_render:
        return dense_render(args.dense_size, args.dense_render)
    if args.dense_measure:
        return dense_measure(args.dense_measure, skip)
    import torch

    cores = os.cpu_count() or 1
    print(f"machine: {cores} CPU cores, torch {torch.__version__}, CUDA: {torch.cuda.is_available()}; "
          f"skipped modules: {', '.join(skip) or 'none'}")
    if args.dense:
        with tempfile.TemporaryDirectory() as tmp:
            field = Path(tmp) / "dense.npz"
            env = {**os.environ, "PYTHONWARNINGS": "ignore"}
            subprocess.run([sys.executable, __file__, "--dense-render", str(field), "--dense-size", str(args.dense_size)],
                           check=True, env=env)
            out = subprocess.run([sys.executable, __file__, "--dense-measure", str(field), "--skip", args.skip],
                                 capture_output=True, text=True, check=True, env=env)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"dense {args.dense_size}² field: {r['objects']} objects, {r['columns']} columns; segmentation {r['segmentation_s']:.1f} s, "
              f"engine {r['engine_s']:.1f} s (CPU {r['engine_cpu_s']:.1f} s, one thread); peak RSS of the measuring process "
              f"{r['peak_rss_gib']:.2f} GiB ({r['rss_before_engine_gib']:.2f} GiB with the field and masks loaded)")
        print("  " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(r["timings"].items(), key=lambda kv: -kv[1])))
        return

    from cpvs.profile.features import measure_field as cp_measure_field
    from cpvs.profile.segment import segment_field

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = field_files(args.field, tmp)
        images, t_read, _ = clock(lambda: read(files))
        masks, t_seg, _ = clock(lambda: segment_field(images))
        shape = next(iter(images.values())).shape
        print(f"field: {args.field} {shape[0]}x{shape[1]}, {len(CHANNELS)} stains, {masks.n} objects")

        rows = []
        if not args.no_reference:
            ref, wall, cpu = clock(lambda: cp_measure_field(images, masks, CHANNELS, skip))
            rows.append(("cp_measure (one core)", wall, cpu, None))
        torch.set_num_threads(1)
        engine_run(images, masks, skip)  # warm-up: imports, compiled kernels, allocator

        def median_run(**kw):
            """The median of ``args.repeats`` runs (wall), with its CPU time and module timings."""
            runs = sorted((engine_run(images, masks, skip, **kw) for _ in range(args.repeats)), key=lambda r: r[1])
            return runs[len(runs) // 2], [r[1] for r in runs]

        (df, wall, cpu, timings), walls = median_run(threads=1)
        rows.append(("cpvs engine, 1 torch thread", wall, cpu, timings))
        spread = {"cpvs engine, 1 torch thread": walls}
        one_thread = wall
        if cores > 1:
            (_, wall, cpu, t_all), spread[f"cpvs engine, {cores} threads"] = median_run(threads=cores)
            rows.append((f"cpvs engine, {cores} threads", wall, cpu, t_all))
        if torch.cuda.is_available():
            engine_run(images, masks, skip, device="cuda", threads=1)
            (_, wall, cpu, t_gpu), spread["cpvs engine, cuda"] = median_run(device="cuda", threads=1)
            rows.append(("cpvs engine, cuda", wall, cpu, t_gpu))
        print(f"{df.shape[1] - 1} features x {df.shape[0]} objects per engine run")
        base = rows[0][1] if not args.no_reference else None
        print(f"cpvs engine: median of {args.repeats} runs (their range in brackets); cp_measure: one run")
        for name, wall, cpu, _ in rows:
            speed = f"  {base / wall:5.1f}x" if base else ""
            runs = f"  [{min(spread[name]):.2f}-{max(spread[name]):.2f} s]" if name in spread else ""
            print(f"  {name:32s} {wall:7.2f} s  (CPU {cpu:6.2f} s){speed}{runs}")
        print("  cpvs engine by module (1 thread): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                 sorted(timings.items(), key=lambda kv: -kv[1])))
        path = t_read + t_seg + one_thread
        print(f"per-field path with the cpvs engine (1 thread): {path:.2f} s = image reading {t_read:.2f} s ({t_read / path:.0%}), "
              f"segmentation {t_seg:.2f} s ({t_seg / path:.0%}), measurement {one_thread:.2f} s ({one_thread / path:.0%})")
        if not args.no_reference:
            path_cp = t_read + t_seg + rows[0][1]
            print(f"per-field path with cp_measure: {path_cp:.1f} s; reading + segmentation {(t_read + t_seg) / path_cp:.1%} of it")

        if args.fields:
            from cpvs.profile.pipeline import ProfileConfig, profile_plate
            from cpvs.simulate import simulate

            sim = simulate(tmp / "plate", plates=1, wells=4, sites=max(1, args.fields // 4), size=998, seed=0, masks=False)
            for workers in sorted({1, min(2, cores), cores}):
                res, dt, _ = clock(lambda: profile_plate(ProfileConfig(sim.plates[0], tmp / f"prof{workers}", skip=skip, workers=workers)))
                print(f"cpvs profile, {res.n_written} fields, --workers {workers}: {dt:.1f} s -> "
                      f"{3600 * res.n_written / dt:.0f} fields/hour")


if __name__ == "__main__":
    main()
