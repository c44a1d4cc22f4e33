"""Speed of the foundation: simulate, illumination correction and preprocess.

Prints its own figures. Run: ``python benchmarks/preprocess.py [--wells 16 --sites 2]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from cpvs.plate import discover_plate, read_image
from cpvs.preprocess.illumination import illumination_function
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.simulate import simulate

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "fields" / "pediatric_BR00143976_C03_f03"


def timed(fn, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--wells", type=int, default=16)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--size", type=int, default=998)
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPU cores")

    img = read_image(SHARED / "r03c03f03p01-ch1sk1fk1fl1.tiff").astype(np.float64)[:998, :998]
    t_fast, _ = timed(lambda: illumination_function(img, 249))
    print(f"illumination function, 998² image, 249-px median: {t_fast * 1000:.0f} ms (cpvs, filtered at low resolution)")
    quarter = img.reshape(499, 2, 499, 2).mean(axis=(1, 3))[:250, :250]
    t_ref, ref = timed(lambda: ndimage.median_filter(quarter, size=63), repeat=1)
    t_q, fast = timed(lambda: illumination_function(quarter, 63))
    ref = ref / ref.mean()
    print(f"same at quarter scale (250², 63 px): scipy full median {t_ref * 1000:.0f} ms, cpvs {t_q * 1000:.1f} ms "
          f"-> {t_ref / t_q:.0f}x faster, max |difference| {np.abs(fast - ref).max():.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for workers in (1, 2):
            t = time.perf_counter()
            res = simulate(tmp / f"sim{workers}", plates=1, wells=args.wells, sites=args.sites, size=args.size, seed=0, workers=workers)
            dt = time.perf_counter() - t
            print(f"simulate {args.wells} wells x {args.sites} sites of {args.size}² ({res.n_fields} fields, 8 channels) "
                  f"with {workers} worker(s): {dt:.1f} s, {dt / res.n_fields:.2f} s/field")
        plate = discover_plate(res.plates[0])
        for workers in (1, 2):
            t = time.perf_counter()
            pre = preprocess_plates([plate], tmp / f"store{workers}.zarr", workers=workers)
            dt = time.perf_counter() - t
            size_mb = sum(p.stat().st_size for p in (tmp / f"store{workers}.zarr").rglob("*") if p.is_file()) / 1e6
            print(f"preprocess {pre.n_fields} fields with {workers} thread(s): {dt:.1f} s, {pre.n_fields / dt:.2f} fields/s, "
                  f"store {size_mb:.0f} MB ({size_mb / pre.n_fields:.1f} MB/field, float16)")


if __name__ == "__main__":
    main()
