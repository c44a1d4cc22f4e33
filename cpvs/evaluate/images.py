"""``cpvs evaluate --images``: image metrics of a predicted plate against the real stains.

Fields are paired by (well, site). The ground truth is illumination-corrected per
plate and channel the way ``cpvs preprocess`` does it (predictions are made in
that corrected space), unless ``truth_illum_size`` is 0. A prediction with
``<channel>_std`` maps (diffusion, ``--samples K``) also gets ``std_spearman``: the
Spearman correlation of the std map with the absolute error, per field and channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.evaluate.uncertainty import std_error_spearman
from cpvs.jobs import thread_pool
from cpvs.image_metrics import METRICS, image_metrics
from cpvs.plate.channels import FLUORESCENCE
from cpvs.plate.discover import discover_plate
from cpvs.plate.tiff import read_image
from cpvs.preprocess.illumination import plate_illumination


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
        for m in METRICS + (("std_spearman",) if "std_spearman" in per_field else ()):
            row[f"{m}_mean"] = float(g[m].mean())
            row[f"{m}_std"] = float(g[m].std(ddof=0))
        rows.append(row)
    return pd.DataFrame(rows)


def _pair_plates(pred, truth, channels, truth_channel_map, pred_channel_map=None):
    """Predicted and truth plates with their fields paired by (well, site)."""
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
    return pplate, tplate, pairs, channels


def evaluate_images(pred: str | Path, truth: str | Path, channels: list[str] | None = None,
                    truth_channel_map: str | None = None, pred_channel_map: str | None = None,
                    truth_illum_size: int = 249, workers: int = 2, progress=None) -> ImageEvaluation:
    progress = progress or (lambda *a, **k: None)
    _, tplate, pairs, channels = _pair_plates(pred, truth, channels, truth_channel_map, pred_channel_map)
    progress("illumination", 0, 1, info="of the truth plate")
    illum = plate_illumination(tplate, channels, truth_illum_size, len(tplate.fields), workers=workers) if truth_illum_size > 1 else None
    progress("illumination", 1, 1)
    progress("fields", 0, len(pairs))

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
            row = {"Metadata_Plate": t.plate, "Metadata_Well": t.well, "Metadata_Site": t.site, "channel": c,
                   **image_metrics(y, x)}
            if f"{c}_std" in p.files:  # uncertainty maps: do they rank pixels by error?
                row["std_spearman"] = std_error_spearman(read_image(p.files[f"{c}_std"]), x, y)
            rows.append(row)
        return rows

    rows = []
    with thread_pool(workers) as ex:
        for k, r in enumerate(ex.map(one, pairs)):
            rows += r
            progress("fields", k + 1, len(pairs))
    per_field = pd.DataFrame(rows)
    return ImageEvaluation(per_field, summarize(per_field), channels, len(pairs))


def fid_of_plates(pred, truth, network_path, channels=None, truth_channel_map=None, device: str = "auto") -> dict[str, float]:
    """FID per channel between the predicted and the real images of the paired fields."""
    from cpvs.device import resolve_device
    from cpvs.evaluate.fid import fid_per_channel, load_feature_network

    _, _, pairs, channels = _pair_plates(pred, truth, channels, truth_channel_map)
    net = load_feature_network(network_path, resolve_device(device))
    pred_images = {c: [read_image(p.files[c]).astype(np.float32) for p, _ in pairs] for c in channels}
    truth_images = {c: [read_image(t.files[c]).astype(np.float32) for _, t in pairs] for c in channels}
    return fid_per_channel(pred_images, truth_images, net)


def image_grids(pred, truth, channels=None, truth_channel_map=None, n_fields: int = 3, crop: int = 384) -> list:
    """Figures for the report: per sample field, rows brightfield / ground truth / prediction /
    uncertainty (when the prediction has ``<channel>_std`` maps), one column per channel; a
    centre crop of ``crop`` px keeps cells visible."""
    from cpvs.evaluate.figures import image_grid
    from cpvs.plate.channels import is_brightfield

    pplate, tplate, pairs, channels = _pair_plates(pred, truth, channels, truth_channel_map)
    try:
        bf_plate = discover_plate(truth, channel_map=truth_channel_map)
        bf_names = [c for c in bf_plate.channels if is_brightfield(c)]
        bf_of = {(f.well, f.site): f for f in bf_plate.fields}
    except CpvsError:
        bf_names, bf_of = [], {}
    figs = []
    for p, t in pairs[:: max(1, len(pairs) // n_fields)][:n_fields]:
        def cut(img):
            h, w = img.shape
            y0, x0 = max(0, (h - crop) // 2), max(0, (w - crop) // 2)
            return img[y0 : y0 + crop, x0 : x0 + crop].astype(np.float32)

        rows = []
        if bf_names and (t.well, t.site) in bf_of:
            bf = cut(read_image(bf_of[(t.well, t.site)].files[bf_names[len(bf_names) // 2]]))
            rows.append((f"brightfield ({bf_names[len(bf_names) // 2]})", [bf] + [None] * (len(channels) - 1)))
        rows.append(("ground truth", [cut(read_image(t.files[c])) for c in channels]))
        rows.append(("prediction", [cut(read_image(p.files[c])) for c in channels]))
        std = [f"{c}_std" for c in channels]
        if all(s in p.files for s in std):
            rows.append(("uncertainty (std)", [cut(read_image(p.files[s])) for s in std]))
        figs.append(image_grid(rows, channels, f"{t.plate} {t.well} site {t.site}"))
    return figs
