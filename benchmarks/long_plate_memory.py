"""Memory over a long plate: resident set size while predict-plate and profile work through
thousands of fields. Peak RSS must stay flat: growth from field 100 to the last under 10 %.

    python benchmarks/long_plate_memory.py                 # 2,016 fields of 64² (about 10 minutes on 2 cores)
    python benchmarks/long_plate_memory.py --wells 24 --sites 6 --size 64   # a quick look

Both commands run in this process (profile with one worker, so every field is measured here), with
a progress callback that samples the RSS after each field.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


class Sampler:
    """A progress callback recording (fields done, RSS MB) of one stage."""

    def __init__(self, stage: str):
        self.stage, self.samples = stage, []

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None:
        if stage == self.stage:
            self.samples.append((done, rss_mb()))

    def report(self, name: str) -> float:
        by_field = dict(self.samples)
        last = max(by_field)
        marks = [m for m in (100, 250, 500, 1000, 1500, 2000) if m < last] + [last]
        print(f"{name}: RSS (MB) after field " + ", ".join(f"{m}: {max(v for k, v in by_field.items() if k <= m):.0f}"
                                                           for m in marks))
        at100 = max(v for k, v in by_field.items() if k <= min(100, last))
        peak = max(by_field.values())
        growth = (peak - at100) / at100 * 100
        print(f"{name}: peak {peak:.0f} MB; growth from field {min(100, last)} to field {last}: {growth:+.1f} % (goal < 10 %)")
        return growth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, default=336, help="wells of the plate (up to 384)")
    ap.add_argument("--sites", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="simulation processes")
    args = ap.parse_args()

    import torch

    from cpvs.plate import discover_plates
    from cpvs.predict.runner import PredictConfig, predict_plate
    from cpvs.preprocess.pipeline import preprocess_plates
    from cpvs.profile.pipeline import ProfileConfig, profile_plate
    from cpvs.profile.segment import SegmentParams
    from cpvs.simulate import simulate
    from cpvs.train.staining import StainingConfig, train_staining

    torch.set_num_threads(1)
    print(f"machine: {os.cpu_count()} CPU cores; plate of {args.wells * args.sites} fields of {args.size}²")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        small = simulate(tmp / "small", plates=1, wells=4, sites=2, size=args.size, seed=1, masks=False).plates[0]
        plate = simulate(tmp / "long", plates=1, wells=args.wells, sites=args.sites, size=args.size, seed=2, masks=False,
                         workers=args.workers).plates[0]
        preprocess_plates(discover_plates(small), tmp / "s.zarr")
        train_staining(StainingConfig("unet", tmp / "s.zarr", tmp / "unet", crop=32, depth=2, width=4, epochs=1,
                                      steps_per_epoch=1, batch_size=2, device="cpu", workers=1))
        print(f"set-up (simulate, tiny U-Net): {time.perf_counter() - t:.0f} s; RSS {rss_mb():.0f} MB")

        t = time.perf_counter()
        s = Sampler("fields")
        predict_plate(PredictConfig(plate, tmp / "pred", tmp / "unet", device="cpu", tile=32, stride=16, workers=1), progress=s)
        print(f"predict-plate: {time.perf_counter() - t:.0f} s")
        g1 = s.report("predict-plate")

        t = time.perf_counter()
        s = Sampler("fields")
        profile_plate(ProfileConfig(plate, tmp / "prof", workers=1, segment=SegmentParams(min_nucleus_diameter=4),
                                    skip=("texture", "granularity", "costes")), progress=s)
        print(f"profile: {time.perf_counter() - t:.0f} s")
        g2 = s.report("profile")
    print(f"flat: predict-plate {'yes' if g1 < 10 else 'NO'}, profile {'yes' if g2 < 10 else 'NO'}")


if __name__ == "__main__":
    main()
