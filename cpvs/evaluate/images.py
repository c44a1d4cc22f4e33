"""``cpvs evaluate --images``: image metrics of a predicted plate against the real stains.

Fields are paired by (well, site). The ground truth is illumination-corrected per
plate and channel the way ``cpvs preprocess`` does it (predictions are made in
that corrected space), unless ``truth_illum_size`` is 0.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.evaluate.image_metrics import METRICS, image_metrics
from cpvs.plate.channels import FLUORESCENCE
from cpvs.plate.discover import discover_plate
from cpvs.plate.tiff import read_image
from cpvs.preprocess.illumination import illumination_function


@dataclass
class ImageEvaluation:
    per_field: pd.DataFrame  # one row per field and channel
    summary: pd.DataFrame  # per channel (and "all"): mean and std of each metric
    channels: list[str]
    n_fields: int


def summarize(per_field: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for ch, g in list(per_field.groupby("channel", sort=False)) + [("all", per_field)]:
        row = {"channel": ch, "n": len(g)}
        for m in METRICS:
            row[f"{m}_mean"] = float(g[m].mean())
            row[f"{m}_std"] = float(g[m].std(ddof=0))
        rows.append(row)
    return pd.DataFrame(rows)


def evaluate_images(pred: str | Path, truth: str | Path, channels: list[str] | None = None,
                    truth_channel_map: str | None = None, pred_channel_map: str | None = None,
                    truth_illum_size: int = 249, workers: int = 2, progress=None) -> ImageEvaluation:
    progress = progress or (lambda *a, **k: None)
    pplate = discover_plate(pred, channel_map=pred_channel_map)
    if channels is None:
        channels = [c for c in pplate.channels if c in FLUORESCENCE] or pplate.channels
    missing = [c for c in channels if c not in pplate.channels]
    if missing:
        raise CpvsError(f"prediction has no channel(s) {', '.join(missing)} (it has {', '.join(pplate.channels)})", pred)
    tplate = discover_plate(truth, channel_map=truth_channel_map, channels=channels)
    truth_of = {(f.well, f.site): f for f in tplate.fields}
    pairs = [(p, truth_of.get((p.well, p.site))) for p in pplate.fields]
    lacking = [f"{p.well}/s{p.site}" for p, t in pairs if t is None]
    if lacking:
        raise CpvsError(f"ground truth has no field for {', '.join(lacking[:5])}{' …' if len(lacking) > 5 else ''}", truth,
                        "point --truth at the plate the prediction was made from")
    illum = None
    if truth_illum_size > 1:
        mean = None
        for f in tplate.fields:
            stack = np.stack([read_image(f.files[c]).astype(np.float64) for c in channels])
            mean = stack if mean is None else mean + stack
        illum = np.stack([illumination_function(m, truth_illum_size) for m in mean / len(tplate.fields)])

    def one(pair):
        p, t = pair
        rows = []
        for i, c in enumerate(channels):
            y = read_image(t.files[c]).astype(np.float64)
            if illum is not None:
                y = y / illum[i]
            x = read_image(p.files[c]).astype(np.float64)
            if x.shape != y.shape:
                raise CpvsError(f"prediction is {x.shape[0]}x{x.shape[1]} px, ground truth {y.shape[0]}x{y.shape[1]}", p.files[c])
            rows.append({"Metadata_Plate": t.plate, "Metadata_Well": t.well, "Metadata_Site": t.site, "channel": c,
                         **image_metrics(y, x)})
        return rows

    rows = []
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for k, r in enumerate(ex.map(one, pairs)):
            rows += r
            progress("fields", k + 1, len(pairs))
    per_field = pd.DataFrame(rows)
    return ImageEvaluation(per_field, summarize(per_field), channels, len(pairs))
