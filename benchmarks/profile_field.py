"""Profiling speed: seconds per 998² five-channel field, broken down by module, for `cpvs profile`
and for cp_measure's featurizer called directly on the same masks; fields per hour with --workers.

    python benchmarks/profile_field.py                  # all modules
    python benchmarks/profile_field.py --skip costes    # what a --skip costs or saves
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from cpvs.plate import discover_plate, read_image
from cpvs.profile.features import featurizer_config, measure_field
from cpvs.profile.pipeline import ProfileConfig, profile_plate
from cpvs.profile.segment import segment_field
from cpvs.simulate import simulate

CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--skip", default="")
    ap.add_argument("--fields", type=int, default=4, help="fields for the fields-per-hour runs")
    args = ap.parse_args()
    skip = tuple(s for s in args.skip.split(",") if s)
    warnings.simplefilter("ignore")
    print(f"machine: {os.cpu_count()} CPU cores; skipped modules: {', '.join(skip) or 'none'}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim = simulate(tmp / "sim", plates=1, wells=4, sites=max(1, args.fields // 4), size=998, seed=0, masks=False)
        plate = discover_plate(sim.plates[0])
        f = plate.fields[0]
        images = {c: read_image(f.files[c]).astype(np.float64) / 65535 for c in CHANNELS}
        t = time.perf_counter()
        masks = segment_field(images)
        t_seg = time.perf_counter() - t
        print(f"field 998², {masks.n} cells: segmentation {t_seg:.2f} s")

        from cp_measure.bulk import get_core_measurements, get_correlation_measurements
        from cp_measure.featurizer import featurize

        comps = (masks.nuclei, masks.cells, masks.cytoplasm)
        rows = []
        for name, fn in get_core_measurements().items():
            if name in skip:
                continue
            t = time.perf_counter()
            if name in ("sizeshape", "zernike", "feret"):
                for m in comps:
                    fn(m, images["DNA"])
            else:
                for m in comps:
                    for c in CHANNELS:
                        fn(m, images[c])
            rows.append((name, time.perf_counter() - t))
        if "correlation" not in skip:
            for name, fn in get_correlation_measurements().items():
                if name == "costes" and "costes" in skip:
                    continue
                kw = {"scale_max": 65535} if name == "costes" else {}
                t = time.perf_counter()
                for m in comps:
                    for i in range(len(CHANNELS)):
                        for j in range(i + 1, len(CHANNELS)):
                            fn(images[CHANNELS[i]], images[CHANNELS[j]], m, **kw)
                rows.append((f"correlation {name}", time.perf_counter() - t))
        for name, s in sorted(rows, key=lambda r: -r[1]):
            print(f"  {name:28s} {s:7.2f} s")
        print(f"  {'sum of modules':28s} {sum(s for _, s in rows):7.2f} s")

        t = time.perf_counter()
        featurize(np.stack([images[c] for c in CHANNELS])[None], np.stack(comps)[None], featurizer_config(CHANNELS, skip))
        t_direct = time.perf_counter() - t
        t = time.perf_counter()
        df = measure_field(images, masks, CHANNELS, skip)
        t_cpvs = time.perf_counter() - t
        print(f"cp_measure featurizer called directly: {t_direct:.2f} s; cpvs measure_field (featurizer + neighbours + "
              f"CellProfiler names): {t_cpvs:.2f} s, {df.shape[1] - 1} features x {df.shape[0]} cells")

        for workers in (1, 2):
            out = tmp / f"prof{workers}"
            t = time.perf_counter()
            res = profile_plate(ProfileConfig(sim.plates[0], out, skip=skip, workers=workers))
            dt = time.perf_counter() - t
            print(f"cpvs profile, {res.n_written} fields, --workers {workers}: {dt:.1f} s -> {3600 * res.n_written / dt:.0f} fields/hour")


if __name__ == "__main__":
    main()
