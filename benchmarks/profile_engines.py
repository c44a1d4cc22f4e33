"""Profiles of the two engines on the same simulated plates: per-feature agreement of the well
profiles and the evaluations a user runs on them (NSC, NSCB, target matching).

Both engines profile the same plates (cpvs segments them once: cp_measure measures inside the
cpvs engine's masks), the well tables are MAD-robustized against the negative controls per
plate and feature-selected (as the README's quick start), and evaluated.

    python benchmarks/profile_engines.py                     # 2 plates x 24 wells x 2 sites of 320²
    python benchmarks/profile_engines.py --size 998 --sites 1 --wells 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plates", type=int, default=2)
    ap.add_argument("--wells", type=int, default=24)
    ap.add_argument("--sites", type=int, default=2)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    from cpvs.evaluate.suite import EvalConfig, evaluate_profiles
    from cpvs.profile.pipeline import ProfileConfig, profile_plate
    from cpvs.profile.postprocess import PostprocessConfig, postprocess
    from cpvs.simulate import simulate

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sim = simulate(tmp / "sim", plates=args.plates, wells=args.wells, sites=args.sites, size=args.size, seed=args.seed,
                       masks=False, workers=args.workers)
        wells, seconds = {}, {}
        for engine in ("cpvs", "cp_measure"):
            t = time.perf_counter()
            tables = []
            for plate in sim.plates:
                masks_from = None if engine == "cpvs" else tmp / "cpvs"
                res = profile_plate(ProfileConfig(plate, tmp / engine, engine=engine, workers=args.workers, masks_from=masks_from))
                tables.append(pd.read_parquet(res.tables["well"]))
            seconds[engine] = time.perf_counter() - t
            wells[engine] = pd.concat(tables, ignore_index=True)
        n_fields = args.plates * args.wells * args.sites
        print(f"{args.plates} plates x {args.wells} wells x {args.sites} sites of {args.size}², --workers {args.workers}: "
              + ", ".join(f"{e} {s:.0f} s ({s / n_fields:.2f} s/field)" for e, s in seconds.items()))

        a, b = wells["cpvs"], wells["cp_measure"]
        feats = [c for c in b.columns if not c.startswith("Metadata_")]
        assert set(feats) == {c for c in a.columns if not c.startswith("Metadata_")}, "engines differ in features"
        a = a.set_index(["Metadata_Plate", "Metadata_Well"]).loc[b.set_index(["Metadata_Plate", "Metadata_Well"]).index]
        b = b.set_index(["Metadata_Plate", "Metadata_Well"])
        r = {}
        for f in feats:
            x, y = a[f].to_numpy(float), b[f].to_numpy(float)
            ok = np.isfinite(x) & np.isfinite(y)
            if ok.sum() > 2 and x[ok].std() > 0 and y[ok].std() > 0:
                r[f] = np.corrcoef(x[ok], y[ok])[0, 1]
            elif ok.sum() and np.allclose(x[ok], y[ok], rtol=1e-6, atol=1e-9):
                r[f] = 1.0  # constant in both engines (a feature without variation across wells)
            else:
                r[f] = np.nan
        r = pd.Series(r)
        print(f"well-profile correlation between engines: {(r >= 0.99).mean():.1%} of {len(r)} features >= 0.99 "
              f"(median {r.median():.6f}); lowest: " + ", ".join(f"{k} {v:.4f}" for k, v in r.nsmallest(5).items()))

        post = PostprocessConfig(normalize="mad_robustize", control_query="Metadata_ControlType == 'negcon'", by_plate=True,
                                 select=True)
        for engine, df in wells.items():
            out, rep = postprocess(df, post)
            path = tmp / f"{engine}_norm.parquet"
            out.to_parquet(path, index=False)
            res = evaluate_profiles(EvalConfig(path, nsc=True, nscb=True, target=True))
            got = {k: res.results[k] for k in ("nsc", "nscb", "target")}
            print(f"{engine:10s}: {rep.n_features_out} features selected; " + "; ".join(f"{k} {_summary(v)}" for k, v in got.items()))


def _summary(result) -> str:
    if hasattr(result, "n_correct"):  # NSC / NSCB
        return f"{result.n_correct}/{result.n_queries} ({result.score:.3f})"
    return f"top-1 {result.top1}/{result.n_queries}, top-{result.k} {result.topk}/{result.n_queries}, MTdist {result.mtdist:.3f}"


if __name__ == "__main__":
    main()
