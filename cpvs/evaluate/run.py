"""``cpvs evaluate``: one request -> profile evaluations, image metrics, FID, report figures,
and the files (results.json, Parquet tables, report.html). Returns data; the CLI prints."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cpvs.errors import CpvsError
from cpvs.evaluate.suite import EvalConfig, EvalResults

Progress = Callable[..., None]


@dataclass
class EvaluateRequest:
    profile: EvalConfig | None  # None: no profile evaluation
    images: bool = False
    fid: bool = False
    pred: Path | None = None  # predicted plate
    truth_plate: Path | None = None  # real plate (for --images, --fid, the report's grids)
    channels: list[str] | None = None
    truth_channel_map: str | None = None
    truth_illum_size: int = 249
    fid_network: Path | None = None
    workers: int = 2
    device: str = "auto"
    out: Path | None = None
    report: Path | None = None
    overwrite: bool = False  # replace results made by another request


@dataclass
class Evaluation:
    summary: dict  # the JSON document (results.json, --json)
    profiles: EvalResults | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # image metrics, FID, figures
    written: list[Path] = field(default_factory=list)


def identity(req: EvaluateRequest) -> dict:
    """What determines the results: the request and the bytes of its tables and plates' file lists."""
    from dataclasses import asdict

    from cpvs.runinfo import file_digest, fingerprint

    d = {k: v for k, v in asdict(req).items() if k not in ("workers", "device", "out", "report", "overwrite", "profile")}
    if req.profile is not None:
        d["profile"] = asdict(req.profile)
        for key, path in (("profiles_digest", req.profile.profiles), ("truth_digest", req.profile.truth)):
            if path is not None and Path(path).is_file():  # a missing table is reported when it is read
                d[key] = file_digest(path)
    for key in ("pred", "truth_plate"):
        folder = getattr(req, key)
        if folder is not None and Path(folder).is_dir():
            d[f"{key}_files"] = fingerprint([p for p in Path(folder).rglob("*.tif*")])
    return d


def evaluate(req: EvaluateRequest, progress: Progress | None = None) -> Evaluation:
    """Run the request; results in ``req.out`` are written under a lock, and a folder holding the
    results of another request is refused unless ``overwrite``."""
    from contextlib import ExitStack

    from cpvs.jobs import OutputLock, claim_identity, clear_outputs

    with ExitStack() as stack:
        if req.out is not None:
            stack.enter_context(OutputLock(req.out, "evaluate"))
            if req.overwrite:
                clear_outputs(req.out)
            claim_identity(req.out, "evaluate", identity(req), req.overwrite)
        return _evaluate(req, progress)


def _evaluate(req: EvaluateRequest, progress: Progress | None) -> Evaluation:
    ev = Evaluation({})
    if req.profile is not None:
        from cpvs.evaluate.suite import evaluate_profiles, results_json

        ev.profiles = evaluate_profiles(req.profile, progress=progress)
        ev.summary.update(results_json(ev.profiles))
    if req.images or req.fid:
        if req.pred is None or req.truth_plate is None:
            raise CpvsError("--images and --fid need --pred (a predicted plate) and --truth or --truth-plate (the real plate)")
    if req.images:
        from cpvs.evaluate.images import evaluate_images

        im = evaluate_images(req.pred, req.truth_plate, channels=req.channels, truth_channel_map=req.truth_channel_map,
                             truth_illum_size=req.truth_illum_size, workers=req.workers, progress=progress)
        ev.summary["images"] = {"n_fields": im.n_fields, "channels": im.channels,
                                "summary": json.loads(im.summary.to_json(orient="records"))}
        ev.extras["image_metrics"] = im.summary
        ev.extras["image_metrics_per_field"] = im.per_field
    if req.fid:
        if req.fid_network is None:
            raise CpvsError("--fid needs --fid-network FILE (local weights; cpvs never downloads any)")
        from cpvs.evaluate.images import fid_of_plates

        ev.extras["fid"] = fid_of_plates(req.pred, req.truth_plate, req.fid_network, channels=req.channels,
                                         truth_channel_map=req.truth_channel_map, device=req.device)
        ev.summary["fid"] = ev.extras["fid"]
    if req.report is not None and req.pred is not None and req.truth_plate is not None:
        from cpvs.evaluate.images import image_grids

        ev.extras["grids"] = image_grids(req.pred, req.truth_plate, channels=req.channels, truth_channel_map=req.truth_channel_map)
    ev.written = write_evaluation(req, ev)
    return ev


def result_tables(ev: Evaluation) -> dict:
    """Every table worth a Parquet file, by name."""
    tables = {"image_metrics_per_field": ev.extras.get("image_metrics_per_field")}
    if ev.profiles is not None:
        r = ev.profiles.results
        tables["treatments"] = ev.profiles.treatments
        for key in ("nsc", "nscb"):
            if key in r:
                tables[f"{key}_neighbors"] = r[key].neighbors
                tables[f"{key}_per_moa"] = r[key].per_class
        if "target" in r:
            tables["target_neighbors"] = r["target"].neighbors
        if "cpcor" in r:
            tables["cpcor_per_feature"] = r["cpcor"].per_feature
        if "toxicity" in r:
            tables["toxicity_calls"] = r["toxicity"]["pred"].calls
            if "truth" in r["toxicity"]:
                tables["toxicity_calls_truth"] = r["toxicity"]["truth"].calls
        if "active" in r:
            tables["active"] = r["active"]
        for name, m in r.get("map", {}).items():
            tables[f"map_{name}"] = m
    return tables


def write_evaluation(req: EvaluateRequest, ev: Evaluation) -> list[Path]:
    from cpvs.runinfo import atomic_path, write_json_atomic, write_run_record

    written = []
    if req.out is not None:
        req.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(req.out / "results.json", ev.summary)
        for name, df in result_tables(ev).items():
            if df is not None and len(df):
                with atomic_path(req.out / f"{name}.parquet") as tmp:
                    df.to_parquet(tmp, index=False)
        profiles = req.profile.profiles if req.profile else None
        truth = req.profile.truth if req.profile and req.profile.truth else req.truth_plate
        write_run_record(req.out, "evaluate", {"profiles": str(profiles), "truth": str(truth), "pred": str(req.pred)})
        written.append(req.out)
    if req.report is not None:
        from cpvs.evaluate.report import build_report

        build_report(req.report / "report.html", ev.profiles, req.profile, ev.extras)
        written.append(req.report)
    return written
