"""`cpvs evaluate --nsc --nscb --target --map` at scale: seconds and peak RSS per metric for
cpvs' block engine and for copairs' mAP, side by side, on synthetic well tables.

    python benchmarks/evaluate_scale.py                      # 10k and 100k wells x 1,000 features
    python benchmarks/evaluate_scale.py --wells 10000        # one size
    python benchmarks/evaluate_scale.py --copairs-max 0      # no copairs runs

The tables have a known MOA structure: 50 MOAs with a signature each, compounds at 3 doses
(each compound its own offset, 1-2 target genes from its MOA's 5, sometimes one more), 4
replicate wells per treatment, ~10 % DMSO wells, 10 batches with a batch offset (a compound
lives in one batch, as in BBBC021). Features are float64, as CellProfiler writes them.

Every (metric, engine) runs in a fresh subprocess that reads the Parquet table and calls
``evaluate_profiles``, so its seconds include reading the table (the ``read table`` row gives
that alone) and its peak RSS (``ru_maxrss``) is the whole process, interpreter, torch and table
included. ``cpu s`` is the process's user + system time: on a shared machine wall seconds
grow with other people's load (printed per row), CPU seconds much less. copairs only exists
for mAP; it runs where the table has at most ``--copairs-max`` wells. ``all`` is one run of
``--nsc --nscb --target --map``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = {"read table": {}, "nsc": {"nsc": True}, "nscb": {"nscb": True}, "target": {"target": True},
           "map": {"map": True}, "all": {"nsc": True, "nscb": True, "target": True, "map": True}}


def synthetic_table(n_wells: int, n_features: int, seed: int = 0) -> pd.DataFrame:
    """Wells with plate, well, batch, compound, concentration, MOA and target metadata."""
    rng = np.random.default_rng(seed)
    n_moa, reps, doses, n_batches = 50, 4, 3, 10
    n_dmso = n_wells // 10
    n_compounds = max(n_moa, (n_wells - n_dmso) // (reps * doses))
    moa_of = np.arange(n_compounds) % n_moa
    genes = np.arange(n_moa * 5).reshape(n_moa, 5)
    targets = []
    for c in range(n_compounds):
        tg = set(rng.choice(genes[moa_of[c]], size=rng.integers(1, 3), replace=False))
        if rng.random() < 0.2:
            tg.add(int(rng.integers(0, genes.size)))
        targets.append("|".join(f"G{g}" for g in sorted(tg)))
    batch_of = rng.integers(0, n_batches, n_compounds)
    comp = np.repeat(np.arange(n_compounds), reps * doses)
    dose = np.tile(np.repeat(np.arange(1, doses + 1), reps), n_compounds)
    n_trt = len(comp)
    moa_sig = rng.normal(size=(n_moa, n_features)) * 0.35
    comp_sig = rng.normal(size=(n_compounds, n_features)) * 0.25
    batch_sig = rng.normal(size=(n_batches, n_features)) * 0.3
    x = rng.normal(size=(n_trt + n_dmso, n_features))
    x[:n_trt] += (moa_sig[moa_of[comp]] + comp_sig[comp]) * (dose[:, None] / doses)
    batch = np.concatenate([batch_of[comp], rng.integers(0, n_batches, n_dmso)])
    x += batch_sig[batch]
    df = pd.DataFrame(x, columns=[f"Cells_Intensity_Feature{i:04d}_DNA" for i in range(n_features)])
    meta = pd.DataFrame({
        "Metadata_Plate": [f"Week{b + 1}_P{i // 384:04d}" for i, b in enumerate(batch)],
        "Metadata_Well": [f"{'ABCDEFGHIJKLMNOP'[(i % 384) // 24]}{i % 24 + 1:02d}" for i in range(len(x))],
        "Metadata_Batch": [f"Week{b + 1}" for b in batch],
        "Metadata_Compound": [f"cmpd{c:05d}" for c in comp] + ["DMSO"] * n_dmso,
        "Metadata_Concentration": np.concatenate([dose * 0.1, np.zeros(n_dmso)]),
        "Metadata_MOA": [f"moa{m:02d}" for m in moa_of[comp]] + ["DMSO"] * n_dmso,
        "Metadata_Target": [targets[c] for c in comp] + [None] * n_dmso,
    })
    return pd.concat([meta, df], axis=1)


def child(table: str, metric: str, engine: str, out: str) -> None:
    """One measured run; prints a JSON line with seconds, peak RSS and per-stage seconds."""
    import resource

    from cpvs.evaluate.suite import EvalConfig, evaluate_profiles, results_json
    from cpvs.tables import read_table

    stages: dict[str, list[float]] = {}

    def progress(stage, done, total, info=""):
        now = time.perf_counter()
        stages.setdefault(stage, [now, now])[1] = now

    t = time.perf_counter()
    summary = {}
    if metric == "read table":
        read_table(table)
    else:
        res = evaluate_profiles(EvalConfig(Path(table), map_engine=engine, device="cpu", **METRICS[metric]), progress=progress)
        summary = results_json(res)
        for name, m in res.results.get("map", {}).items():
            m.drop(columns=["indices"]).to_parquet(Path(out) / f"map_{name}_{metric}_{engine}.parquet")
    seconds = time.perf_counter() - t
    usage = resource.getrusage(resource.RUSAGE_SELF)
    rss = usage.ru_maxrss / 2**20  # KiB -> GiB (Linux)
    print(json.dumps({"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_gib": rss,
                      "load": os.getloadavg()[0], "stages": {k: v[1] - v[0] for k, v in stages.items()},
                      "summary": {k: summary[k] for k in ("nsc", "nscb", "target", "map") if k in summary}}, default=float))


def run_child(table: Path, metric: str, engine: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(table), "--metric", metric, "--engine", engine, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _cell(r: dict | None) -> str:
    if r is None:
        return f"{'—':>8} {'—':>7} {'—':>6}"
    if "error" in r:
        return f"{'failed':>8} {'':>7} {'':>6}"
    return f"{r['seconds']:8.1f} {r['cpu']:7.1f} {r['rss_gib']:6.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wells", type=int, nargs="+", default=[10000, 100000])
    ap.add_argument("--features", type=int, default=1000)
    ap.add_argument("--copairs-max", type=int, default=10000, help="largest table copairs runs on")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--metric", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="cpvs", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.metric, args.engine, args.out)
        return
    print(f"machine: {len(os.sched_getaffinity(0))} CPU cores; device cpu; peak RSS = ru_maxrss of a fresh process per row")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for n in args.wells:
            t = time.perf_counter()
            df = synthetic_table(n, args.features)
            table = tmp / f"wells_{n}.parquet"
            df.to_parquet(table)
            n_trt = df.loc[df["Metadata_Compound"] != "DMSO"].groupby(["Metadata_Compound", "Metadata_Concentration"]).ngroups
            print(f"\n{n} wells x {args.features} features ({(df['Metadata_Compound'] == 'DMSO').sum()} DMSO, {n_trt} treatments); "
                  f"table made in {time.perf_counter() - t:.0f} s")
            del df
            print(f"{'':<11} {'---------- cpvs ---------':>23}   {'--------- copairs -------':>23}")
            print(f"{'metric':<11} {'wall s':>8} {'cpu s':>7} {'GiB':>6}   {'wall s':>8} {'cpu s':>7} {'GiB':>6}   load  notes")
            results = {}
            for metric in METRICS:
                ours = run_child(table, metric, "cpvs", tmp)
                ref = None
                if metric == "map" and n <= args.copairs_max:
                    ref = run_child(table, metric, "copairs", tmp)
                results[metric] = (ours, ref)
                note = ""
                if "error" in ours:
                    note = ours["error"][:100]
                elif metric in ("map", "all") and ours.get("stages"):
                    note = "stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in ours["stages"].items())
                load = ours.get("load", float("nan"))
                print(f"{metric:<11} {_cell(ours)}   {_cell(ref)}   {load:4.1f}  {note}", flush=True)
            ours, ref = results["all"]
            if "summary" in ours:
                s = ours["summary"]
                print("results (cpvs): NSC {:.1%}, NSCB {:.1%}, target top-1 {}/{}, mAP ".format(
                    s["nsc"]["score"], s["nscb"]["score"], s["target"]["top1"], s["target"]["n_queries"])
                    + ", ".join(f"{k} {v['mean_mAP']:.3f} ({v['fraction_significant']:.0%} significant)" for k, v in s["map"].items()))
            ref = results["map"][1]
            if ref is not None and "summary" in ref:
                for name in ref["summary"]["map"]:
                    a = pd.read_parquet(tmp / f"map_{name}_map_cpvs.parquet")
                    b = pd.read_parquet(tmp / f"map_{name}_map_copairs.parquet")
                    print(f"cpvs vs copairs, mAP {name}: {len(a)} groups, max |ΔmAP| "
                          f"{np.abs(a['mean_average_precision'] - b['mean_average_precision']).max():.1e}, max |Δp| "
                          f"{np.abs(a['p_value'] - b['p_value']).max():.4f}, same FDR calls "
                          f"{(a['below_corrected_p'] == b['below_corrected_p']).mean():.1%}")


if __name__ == "__main__":
    main()
