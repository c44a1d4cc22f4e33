"""Feature correlation between predicted and ground-truth profiles (CPcor, METHODS §8).

For each feature, the correlation (Spearman by default) across matched
images/wells between its predicted and ground-truth values; summaries over
all features, by compartment, by module (feature type) and by channel parsed
from CellProfiler-style names, the count above 0.8, and the means of the top 10 %
and 50 %.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from cpvs.errors import CpvsError
from cpvs.plate.channels import BRIGHTFIELD, FLUORESCENCE

COMPARTMENTS = ("Cells", "Cytoplasm", "Nuclei", "Image")
MODULE_GROUPS = {
    "AreaShape": "area/shape", "Correlation": "colocalization", "Granularity": "granularity",
    "Intensity": "intensity", "Neighbors": "neighbors", "RadialDistribution": "radial distribution",
    "Texture": "texture", "Location": "location", "Number": "count", "Count": "count",
}
KNOWN_CHANNELS = FLUORESCENCE + BRIGHTFIELD + ("Brightfield", "DAPI", "Actin", "Tubulin", "Hoechst", "Phalloidin")
PREFIXES = ("RescaleIntensity", "Orig", "Corr", "Illum", "Masked")
_COMPARTMENTS = {c.lower(): c for c in COMPARTMENTS}
_MODULES = {k.lower(): v for k, v in MODULE_GROUPS.items()}


def _channel_of(token: str, channels: dict[str, str]) -> str | None:
    t = token.lower()
    for p in PREFIXES:
        if t.startswith(p.lower()) and len(t) > len(p):
            t = t[len(p):]
            break
    return channels.get(t)


def parse_feature(name: str, channels: list[str] | None = None) -> dict:
    """Compartment, module and channel(s) of a CellProfiler-style feature name.

    ``Cells_Intensity_MeanIntensity_OrigDNA`` -> Cells, intensity, [DNA];
    ``Nuclei_Correlation_Correlation_DNA_ER`` -> Nuclei, colocalization, [DNA, ER].
    Compartments, modules and channel names match case-insensitively (exports write
    ``NUCLEI_AREASHAPE_AREA`` too), channels with or without ``Orig``/``Corr``/
    ``RescaleIntensity`` prefixes.
    """
    lookup = {c.lower(): c for c in (channels or KNOWN_CHANNELS)}
    parts = name.split("_")
    compartment = _COMPARTMENTS.get(parts[0].lower(), "other")
    module_raw = parts[1] if len(parts) > 1 else ""
    module = _MODULES.get(module_raw.lower(), module_raw.lower() or "other")
    found = []
    for tok in parts[2:]:
        ch = _channel_of(tok, lookup)
        if ch and ch not in found:
            found.append(ch)
    return {"compartment": compartment, "module": module, "channels": found}


@dataclass
class CPcorResult:
    per_feature: pd.DataFrame  # feature, r, compartment, module, channel
    summary: dict
    by_compartment: pd.Series
    by_module: pd.Series
    by_channel: pd.Series
    heatmap: pd.DataFrame  # channel x module mean r
    n_matched: int


def feature_correlation(pred: pd.DataFrame, truth: pd.DataFrame, keys: list[str], features: list[str] | None = None,
                        method: str = "spearman", channels: list[str] | None = None) -> CPcorResult:
    """Per-feature correlation of ``pred`` and ``truth`` rows matched on ``keys``."""
    if method not in ("spearman", "pearson"):
        raise CpvsError(f"--method must be spearman or pearson, got {method!r}")
    missing = [k for k in keys if k not in pred.columns or k not in truth.columns]
    if missing:
        raise CpvsError(f"matching column(s) {', '.join(missing)} are missing from the prediction or the truth",
                        hint="pass --match-cols with columns both tables have")
    if features is None:
        from cpvs.tables import feature_columns

        features = [f for f in feature_columns(truth) if f in set(feature_columns(pred))]
    if not features:
        raise CpvsError("the prediction and the truth share no feature column")
    if pred.duplicated(keys).any() or truth.duplicated(keys).any():
        raise CpvsError(f"{', '.join(keys)} do not identify rows uniquely", hint="match on image or well keys (--match-cols)")
    m = pred[keys + features].merge(truth[keys + features], on=keys, suffixes=("_pred", "_truth"))
    if len(m) < 3:
        raise CpvsError(f"only {len(m)} rows match on {', '.join(keys)}: need at least 3 to correlate")
    rows = []
    for f in features:
        a, b = m[f + "_pred"].to_numpy(float), m[f + "_truth"].to_numpy(float)
        ok = np.isfinite(a) & np.isfinite(b)
        if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
            r = np.nan
        elif method == "spearman":
            r = stats.spearmanr(a[ok], b[ok]).statistic
        else:
            r = stats.pearsonr(a[ok], b[ok]).statistic
        info = parse_feature(f, channels)
        rows.append({"feature": f, "r": float(r), "compartment": info["compartment"], "module": info["module"],
                     "channel": "|".join(info["channels"]) or "none"})
    per = pd.DataFrame(rows)
    valid = per.dropna(subset=["r"])
    r_sorted = np.sort(valid["r"].to_numpy())[::-1]
    top = lambda frac: float(r_sorted[: max(1, int(round(frac * len(r_sorted))))].mean()) if len(r_sorted) else float("nan")  # noqa: E731
    exploded = valid.assign(channel=valid["channel"].str.split("|")).explode("channel")
    summary = {
        "method": method, "n_features": len(per), "n_valid": len(valid), "n_matched_rows": len(m),
        "mean": float(valid["r"].mean()) if len(valid) else float("nan"),
        "n_above_0.8": int((valid["r"] > 0.8).sum()), "top10_mean": top(0.1), "top50_mean": top(0.5),
    }
    heat = exploded.pivot_table(index="channel", columns="module", values="r", aggfunc="mean")
    return CPcorResult(per, summary, valid.groupby("compartment")["r"].mean(), valid.groupby("module")["r"].mean(),
                       exploded.groupby("channel")["r"].mean(), heat, len(m))

