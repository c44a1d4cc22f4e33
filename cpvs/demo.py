"""``cpvs demo``: the whole chain built so far, on a small simulated example.

simulate two plates -> preprocess plate 1 -> train a small U-Net and the linear
baseline on it -> predict plate 2 (another batch; the U-Net's prediction as TIFFs and
as an OME-Zarr plate) -> image metrics against its
real stains -> profile the real and the predicted plate 2 in the same cells ->
NSC and target matching on both, feature correlation, an HTML report. Every step
writes real outputs under the demo folder; rerunning resumes what is there.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cpvs.evaluate.images import evaluate_images, image_grids
from cpvs.evaluate.report import build_report
from cpvs.evaluate.suite import EvalConfig, evaluate_profiles
from cpvs.plate.discover import discover_plate, discover_plates
from cpvs.plate.omezarr_write import validate_store
from cpvs.plate.tiff import read_image
from cpvs.predict.runner import PredictConfig, predict_plate
from cpvs.preprocess.illumination import large_scale_variation
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.preprocess.store import Store
from cpvs.profile.pipeline import ProfileConfig, profile_plate
from cpvs.profile.postprocess import PostprocessConfig, postprocess
from cpvs.simulate import simulate
from cpvs.train.staining import StainingConfig, train_staining


@dataclass
class Step:
    name: str
    result: str
    seconds: float


@dataclass
class DemoSummary:
    out: Path
    steps: list[Step] = field(default_factory=list)
    evaluations: dict = field(default_factory=dict)


# Small enough for a laptop CPU in about a minute; `cpvs train` defaults are the published ones.
DEMO_UNET = dict(depth=4, width=8, crop=128, batch_size=8, epochs=4, steps_per_epoch=25, pixels=300_000)
DEMO_SKIP = ("costes", "granularity", "radial_distribution", "radial_zernikes", "zernike")


def same_pixels(a: Path, b: Path) -> int:
    """Fields of two plates (paired by well and site) whose every channel holds the same pixels."""
    pa, pb = discover_plate(a), discover_plate(b)
    of = {(f.well, f.site): f for f in pb.fields}
    return sum(all(np.array_equal(read_image(f.files[c]), read_image(of[(f.well, f.site)].files[c])) for c in pa.channels)
               for f in pa.fields if (f.well, f.site) in of and pa.channels == pb.channels)


def run_demo(
    out: str | Path,
    size: int = 512,
    wells: int = 16,
    sites: int = 2,
    workers: int = 2,
    seed: int = 0,
    device: str = "auto",
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoSummary:
    out = Path(out)
    summary = DemoSummary(out)

    t = time.perf_counter()
    sim = simulate(out / "plates", plates=2, wells=wells, sites=sites, size=size, seed=seed, workers=workers, progress=progress)
    summary.steps.append(Step("simulate", f"{len(sim.plates)} plates, {sim.n_fields} fields of {size}² px, 8 channels",
                              time.perf_counter() - t))

    t = time.perf_counter()
    plates = [p for folder in sim.plates for p in discover_plates(folder)]
    pre = preprocess_plates(plates[:1], out / "train.zarr", workers=workers, progress=progress)
    # How much illumination correction flattened the brightfield (in-focus plane) of one field.
    store = Store(pre.store)
    bf = store.channels.index("BF")
    before = large_scale_variation(read_image(plates[0].fields[0].files["BF"]).astype(float))
    after = large_scale_variation(store.read_field(0)[bf] * pre.channel_stats["BF"]["std"] + pre.channel_stats["BF"]["mean"])
    summary.steps.append(Step(
        "preprocess",
        f"{pre.n_fields} fields -> {pre.store.name} ({', '.join(pre.channels)}); "
        f"brightfield large-scale variation {before:.1%} -> {after:.1%}",
        time.perf_counter() - t,
    ))

    evals = {}
    for family in ("linear", "unet"):
        t = time.perf_counter()
        run = out / f"run-{family}"
        if not (run / "checkpoints" / "best.pt").exists():
            shutil.rmtree(run, ignore_errors=True)  # a demo killed mid-training starts its model again
            cfg = StainingConfig(family, pre.store, run, device=device, workers=workers, **DEMO_UNET)
            train_staining(cfg, progress=progress)
        pred = predict_plate(PredictConfig(sim.plates[1], out / f"pred-{family}", run, device=device, workers=workers,
                                           batch_size=8), progress=progress)
        evals[family] = evaluate_images(pred.out, sim.plates[1], workers=workers, progress=progress)
        pcc = evals[family].summary.set_index("channel")["pcc_mean"]
        summary.steps.append(Step(
            f"{family}: train, predict-plate, evaluate",
            "plate 2 (held out): PCC " + ", ".join(f"{c} {pcc[c]:.2f}" for c in evals[family].channels),
            time.perf_counter() - t,
        ))
    summary.evaluations = evals

    # The U-Net's prediction once more, as an OME-Zarr HCS plate (open it in napari: see README).
    t = time.perf_counter()
    zpred = predict_plate(PredictConfig(sim.plates[1], out / "pred-unet-zarr", out / "run-unet", device=device, workers=workers,
                                        batch_size=8, format="ome-zarr"), progress=progress)
    store = zpred.out / f"{plates[1].name}.zarr"
    summary.steps.append(Step("unet: predict-plate --format ome-zarr",
                              f"{store.relative_to(out)}: valid OME-Zarr {validate_store(store)} HCS plate, "
                              f"{same_pixels(out / 'pred-unet', store)} of {zpred.n_fields} fields identical to the TIFFs",
                              time.perf_counter() - t))

    # Profiles of the real plate 2 and of the U-Net's prediction of it, measured in the same
    # (real) cells; then MOA matching on both and the feature correlation between them.
    t = time.perf_counter()
    post = PostprocessConfig(normalize="mad_robustize", control_query="Metadata_ControlType == 'negcon'", select=True)
    truth = profile_plate(ProfileConfig(sim.plates[1], out / "profiles-truth", skip=DEMO_SKIP, workers=workers), progress)
    pred = profile_plate(ProfileConfig(out / "pred-unet", out / "profiles-unet", skip=DEMO_SKIP, workers=workers,
                                       masks_from=out / "profiles-truth"), progress)
    truth_wells, rep = postprocess(pd.read_parquet(truth.tables["well"]), post)
    selected = out / "profiles-truth" / "well_normalized_feature_select.parquet"
    truth_wells.to_parquet(selected, index=False)
    pred_post = PostprocessConfig(normalize=post.normalize, control_query=post.control_query, features_from=selected)
    pred_wells, _ = postprocess(pd.read_parquet(pred.tables["well"]), pred_post)
    pred_path = out / "profiles-unet" / "well_normalized_feature_select.parquet"
    pred_wells.to_parquet(pred_path, index=False)
    summary.steps.append(Step(
        "profile", f"{truth.n_cells} real cells, {rep.n_features_in} -> {rep.n_features_out} features per well; "
        f"the prediction measured in the same cells", time.perf_counter() - t))

    t = time.perf_counter()
    scores = {}
    for name, path in (("real", selected), ("U-Net", pred_path)):
        cfg = EvalConfig(path, nsc=True, target=True, cpcor=name == "U-Net", truth=selected if name == "U-Net" else None,
                         match_cols=["Metadata_Plate", "Metadata_Well"])
        res = evaluate_profiles(cfg)
        scores[name] = res
        if name == "U-Net":
            grids = image_grids(out / "pred-unet", sim.plates[1])
            build_report(out / "report" / "report.html", res, cfg, {"image_metrics": evals["unet"].summary, "grids": grids})
    nsc = {k: v.results["nsc"] for k, v in scores.items()}
    cpcor = scores["U-Net"].results["cpcor"].summary
    summary.steps.append(Step(
        "evaluate", f"NSC real {nsc['real'].score:.0%}, U-Net {nsc['U-Net'].score:.0%} ({nsc['real'].n_queries} treatments); "
        f"CPcor mean {cpcor['mean']:.2f} over {cpcor['n_valid']} features; report: report/report.html",
        time.perf_counter() - t))
    return summary
