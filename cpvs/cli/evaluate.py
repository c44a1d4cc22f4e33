"""``cpvs evaluate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from cpvs.cli.common import choices, Average, channels as parse_channels, cli_errors, csv_list, is_table, out_console, progress_bar, state
from cpvs.errors import CpvsError


CorrMethod = choices("CorrMethod", "spearman pearson")
MapEngine = choices("MapEngine", "cpvs copairs")


@cli_errors
def evaluate(
    ctx: typer.Context,
    profiles: Annotated[Optional[Path], typer.Argument(metavar="PROFILES", help="Profile table (CSV/TSV/Parquet with Metadata_ columns): cpvs profile/embed output or any CellProfiler/pycytominer table.")] = None,
    nsc: Annotated[bool, typer.Option("--nsc", help="MOA matching: nearest neighbour (cosine) among treatments of other compounds.")] = False,
    nscb: Annotated[bool, typer.Option("--nscb", help="MOA matching among treatments of other compounds and other batches.")] = False,
    target: Annotated[bool, typer.Option("--target", help="Target matching: top-1 and top-k neighbours sharing a target, and MTdist.")] = False,
    cpcor: Annotated[bool, typer.Option("--cpcor", help="Per-feature correlation of PROFILES with --truth profiles of the same images/wells.")] = False,
    toxicity: Annotated[bool, typer.Option("--toxicity", help="k-NN toxicity calls trained on controls (needs --positive-query).")] = False,
    active: Annotated[bool, typer.Option("--active", help="Active subset: PCA, distance to negative controls, 1-D k-means (k = 3).")] = False,
    map_: Annotated[bool, typer.Option("--map", help="Mean average precision of replicate, MOA and target retrieval, with p-values and FDR (copairs' definitions; see --map-engine).")] = False,
    images: Annotated[bool, typer.Option("--images", help="Image metrics (MAE, MSE, SSIM, PSNR, PCC per channel) of --pred against the truth plate.")] = False,
    fid: Annotated[bool, typer.Option("--fid", help="Fréchet distance per channel of --pred images against the truth plate (needs --fid-network).")] = False,
    truth: Annotated[Optional[Path], typer.Option(metavar="TABLE|PLATE", help="Ground truth: a profile table (for --cpcor, --toxicity) or a plate (for --images, --fid).")] = None,
    truth_plate: Annotated[Optional[Path], typer.Option(metavar="PLATE", help="Ground-truth plate when --truth is a profile table.")] = None,
    pred: Annotated[Optional[Path], typer.Option(metavar="PLATE", help="Predicted plate folder (from predict-plate) for --images, --fid and the report's image grids.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="DIR", help="Folder for results.json and Parquet tables of every evaluation.")] = None,
    report: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Folder for a self-contained HTML report (report.html).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout instead of tables.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace results in -o made by another evaluation (other tables or options).")] = False,
    moa_col: Annotated[str, typer.Option(metavar="COLUMN", help="MOA column (matched case-insensitively).")] = "Metadata_MOA",
    compound_col: Annotated[str, typer.Option(metavar="COLUMN", help="Compound column: same-compound neighbours are excluded.")] = "Metadata_Compound",
    batch_col: Annotated[str, typer.Option(metavar="COLUMN", help="Batch column for NSCB (see --derive to make one).")] = "Metadata_Batch",
    perturbation_cols: Annotated[str, typer.Option(metavar="COL,...", help="Comma-separated columns defining a treatment/perturbation.")] = "Metadata_Compound,Metadata_Concentration",
    target_col: Annotated[str, typer.Option(metavar="COLUMN", help="Target column; several targets separated by |.")] = "Metadata_Target",
    control_col: Annotated[str, typer.Option(metavar="COLUMN", help="Control-type column (negcon / poscon / trt), used for the default --negative-query.")] = "Metadata_ControlType",
    derive: Annotated[Optional[list[str]], typer.Option(metavar="NEW=SRC:REGEX", help="Add a column from a regex group of another, e.g. 'Metadata_Batch=Metadata_Plate:^(Week\\d+)'. Repeatable.")] = None,
    negative_query: Annotated[Optional[str], typer.Option(metavar="QUERY", help="Rows that are negative controls (default: control column == 'negcon', else MOA or compound == 'DMSO').")] = None,
    positive_query: Annotated[Optional[str], typer.Option(metavar="QUERY", help="Rows that are positive (toxic) controls, e.g. \"Metadata_ControlType == 'poscon'\".")] = None,
    aggregate: Annotated[Average, typer.Option(help="How wells are aggregated to treatments.")] = Average("median"),
    match_cols: Annotated[Optional[str], typer.Option(metavar="COL,...", help="--cpcor: comma-separated columns matching prediction and truth rows (default: plate, well, site).")] = None,
    method: Annotated[CorrMethod, typer.Option(help="--cpcor correlation.")] = CorrMethod("spearman"),
    cellprofiler_names: Annotated[bool, typer.Option("--cellprofiler-names/--no-cellprofiler-names", help="--cpcor: match features whose CellProfiler pipeline named its images CorrDNA, OrigER, ... with cpvs's DNA, ER, ... (applied when it matches more features).")] = True,
    k: Annotated[int, typer.Option("--k", "--top-k", help="--target: neighbours counted for the top-k match.")] = 5,
    rounds: Annotated[int, typer.Option(help="--toxicity: resampling rounds of the majority vote.")] = 100,
    null_size: Annotated[int, typer.Option(help="--map: null APs sampled per (positives, candidates) configuration for p-values.")] = 10000,
    map_engine: Annotated[MapEngine, typer.Option(help="--map: who computes mAP: cpvs (block-wise, bounded memory; the same APs and mAPs as copairs, p-values within Monte-Carlo error) or copairs (the reference; much slower and larger at scale).")] = MapEngine("cpvs"),
    seed: Annotated[int, typer.Option(help="Seed of resampling, null distributions and embeddings.")] = 0,
    fid_network: Annotated[Optional[Path], typer.Option(metavar="FILE", help="--fid: local Inception-v3 weights (torchvision layout) or a cpvs dino/ws-dino checkpoint; never downloaded.")] = None,
    channels: Annotated[Optional[str], typer.Option(metavar="CH,...", help="--images/--fid: channels to compare (default: the predicted stains).")] = None,
    truth_channel_map: Annotated[Optional[str], typer.Option(metavar="MAP", help="Channel map of the truth plate (default: its channel_map.csv, else jump).")] = None,
    truth_illum_size: Annotated[int, typer.Option(help="Illumination-correct the truth images per plate and channel with this median filter size in px (0: raw).")] = 249,
    workers: Annotated[int, typer.Option(help="Threads reading images.")] = 2,
) -> None:
    """Evaluate profiles and predicted images the way the field does.

    Profiles (PROFILES): NSC / NSCB MOA matching, target matching with MTdist, CPcor against
    ground-truth profiles, k-NN toxicity calls (with sensitivity and specificity against the truth),
    the active subset, and mAP. Images (--pred against --truth): MAE, MSE, SSIM, PSNR and PCC
    per channel, and FID. --report writes one self-contained HTML page with every computed metric.
    """
    from cpvs.evaluate.run import EvaluateRequest, evaluate as run
    from cpvs.evaluate.suite import EvalConfig

    st = state(ctx)
    profile_evals = nsc or nscb or target or cpcor or toxicity or active or map_
    if not (profile_evals or images or fid):
        raise CpvsError("nothing to evaluate", hint="pass --nsc, --nscb, --target, --cpcor, --toxicity, --active, --map, --images or --fid")
    if profile_evals and profiles is None:
        raise CpvsError("profile evaluations need a PROFILES table", hint="cpvs evaluate PROFILES --nsc ...")
    truth_table = truth if truth is not None and is_table(truth) else None
    if cpcor and truth is not None and truth_table is None:
        raise CpvsError("--cpcor needs --truth to be a profile table (CSV/TSV/Parquet)", truth)
    cfg = None
    if profile_evals:
        cfg = EvalConfig(
            profiles=profiles, truth=truth_table, nsc=nsc, nscb=nscb, target=target, cpcor=cpcor, toxicity=toxicity,
            active=active, map=map_, moa_col=moa_col, compound_col=compound_col, batch_col=batch_col,
            perturbation_cols=csv_list(perturbation_cols), target_col=target_col, control_col=control_col, derive=derive or [],
            negative_query=negative_query, positive_query=positive_query, aggregate=aggregate.value,
            match_cols=csv_list(match_cols) or None, method=method.value, k=k, rounds=rounds, null_size=null_size, seed=seed,
            map_engine=map_engine.value, device=st.device, cellprofiler_names=cellprofiler_names,
        )
    req = EvaluateRequest(cfg, images=images, fid=fid, pred=pred,
                          truth_plate=truth_plate or (truth if truth is not None and truth_table is None else None),
                          channels=parse_channels(channels), truth_channel_map=truth_channel_map, truth_illum_size=truth_illum_size,
                          fid_network=fid_network, workers=workers, device=st.device, out=out, report=report,
                          overwrite=overwrite)
    with progress_bar(st.quiet or json_out) as cb:
        ev = run(req, progress=cb)
    if json_out:
        print(json.dumps(ev.summary, indent=2, default=float))
    elif not st.quiet:
        print_evaluation(ev.summary, ev.extras)
        for where in ev.written:
            out_console.print(f"written to {where}")
    elif not ev.written:  # --quiet with nowhere else to go: the results must not be lost
        print_evaluation(ev.summary, ev.extras, brief=True)


def print_evaluation(summary: dict, extras: dict, brief: bool = False) -> None:
    """The results; ``brief``: one line per evaluation, no tables or notes."""
    for note in [] if brief else summary.get("notes", []):
        out_console.print(f"[yellow]note:[/] {note}")
    for key in ("nsc", "nscb"):
        if key in summary:
            m = summary[key]
            out_console.print(f"[bold]{key.upper()}[/] {m['score']:.1%} ({m['n_correct']}/{m['n_queries']} treatments)"
                              + (f"; left out (single batch): {', '.join(m['excluded_moas'])}" if m["excluded_moas"] else "")
                              + (f"; not queried (one compound): {', '.join(m['single_compound_moas'])}" if m["single_compound_moas"] else ""))
    for key in () if brief else ("nsc", "nscb"):
        if key in summary:
            t = Table(title=f"{key.upper()} per MOA", title_justify="left")
            for c in ("MOA", "n", "correct", "accuracy"):
                t.add_column(c, justify="left" if c == "MOA" else "right")
            for row in summary[key]["per_moa"]:
                t.add_row(str(row["label"]), str(row["n"]), str(row["correct"]), f"{row['accuracy']:.0%}")
            out_console.print(t)
            if summary[key]["confusion"]:
                pairs = "; ".join(f"{c['label']} -> {c['neighbor_label']} ({c['count']})" for c in summary[key]["confusion"][:8])
                out_console.print(f"  confusion pairs: {pairs}")
    if "target" in summary:
        t = summary["target"]
        kk = [k for k in t if k.startswith("top") and not k.endswith("fraction") and k != "top1"][0]
        out_console.print(f"[bold]target matching[/] top-1 {t['top1']}/{t['n_queries']} ({t['top1_fraction']:.1%}, chance "
                          f"{t['chance_top1']:.2%}), {kk} {t[kk]}/{t['n_queries']}; MTdist {t['mtdist']:.3f} "
                          f"(other pairs {t['mean_distance_other_pairs']:.3f})")
    if "cpcor" in summary:
        c = summary["cpcor"]
        out_console.print(f"[bold]CPcor[/] ({c['method']}) mean {c['mean']:.3f} over {c['n_valid']} features, "
                          f"{c['n_above_0.8']} above 0.8, top 10 % {c['top10_mean']:.3f}, top 50 % {c['top50_mean']:.3f}")
        out_console.print("  by compartment: " + ", ".join(f"{k} {v:.2f}" for k, v in c["by_compartment"].items()))
        out_console.print("  by module: " + ", ".join(f"{k} {v:.2f}" for k, v in c["by_module"].items()))
        out_console.print("  by channel: " + ", ".join(f"{k} {v:.2f}" for k, v in c["by_channel"].items()))
    if "toxicity" in summary:
        t = summary["toxicity"]
        line = f"[bold]toxicity[/] {t['n_toxic']}/{t['n_called']} perturbations called toxic (k={t['k']}, {t['rounds']} rounds)"
        if "agreement_with_truth" in t:
            a = t["agreement_with_truth"]
            line += f"; vs truth: sensitivity {a['sensitivity']:.1%}, specificity {a['specificity']:.1%}"
        out_console.print(line)
    if "active" in summary:
        out_console.print(f"[bold]active subset[/] {summary['active']['n_active']}/{summary['active']['n']} perturbations")
    if "map" in summary:
        for name, m in summary["map"].items():
            out_console.print(f"[bold]mAP {name}[/] {m['mean_mAP']:.3f} ({m['fraction_significant']:.0%} of {m['n']} significant after FDR)")
    if "image_metrics" in extras and not brief:
        ev = extras["image_metrics"]
        t = Table(title=f"image metrics over {summary['images']['n_fields']} fields (mean ± std)", title_justify="left")
        t.add_column("channel")
        cols = ("mae", "mse", "ssim", "psnr", "pcc") + (("std_spearman",) if "std_spearman_mean" in ev else ())
        for m in cols:
            t.add_column({"pcc": "PCC", "std_spearman": "std~|err| ρ"}.get(m, m.upper()), justify="right")
        for _, r in ev.iterrows():
            t.add_row(r["channel"], *[f"{r[m + '_mean']:.3f} ± {r[m + '_std']:.3f}" for m in cols])
        out_console.print(t)
    if "fid" in extras:
        out_console.print("[bold]FID[/] " + ", ".join(f"{k} {v:.2f}" for k, v in extras["fid"].items()))
