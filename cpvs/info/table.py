"""``cpvs info`` on a profile table: rows, metadata columns, features by compartment and module
(CellProfiler names ``Compartment_Module_...``), embedding features (``Emb_<Channel>_<i>``), NaNs."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cpvs.info.record import Info
from cpvs.tables import feature_columns, is_metadata, read_table

_CELLPROFILER = re.compile(r"^([A-Za-z][A-Za-z0-9]*)_([A-Za-z][A-Za-z0-9]*)_.+")
_EMBEDDING = re.compile(r"^emb_([^_]+)_\d+$", re.IGNORECASE)


def _spelled(counts: Counter, spellings: dict[str, Counter]) -> dict[str, int]:
    """Counts keyed case-insensitively, each shown in its most frequent spelling (``cells`` and
    ``Cells`` are one compartment)."""
    return {spellings[k].most_common(1)[0][0]: n for k, n in counts.most_common()}


def feature_groups(features: list[str]) -> dict[str, Any]:
    """Features by compartment and by compartment/module, embedding features by channel, the rest."""
    compartments: Counter = Counter()
    modules: Counter = Counter()
    emb: Counter = Counter()
    spell: dict[str, Counter] = {}
    other = []
    for f in features:
        if m := _EMBEDDING.match(f):
            emb[m.group(1)] += 1
        elif m := _CELLPROFILER.match(f):
            comp, mod = m.group(1), f"{m.group(1)}_{m.group(2)}"
            compartments[comp.lower()] += 1
            modules[mod.lower()] += 1
            spell.setdefault(comp.lower(), Counter())[comp] += 1
            spell.setdefault(mod.lower(), Counter())[mod] += 1
        else:
            other.append(f)
    by_module: dict[str, dict[str, int]] = {}
    for mod, n in _spelled(modules, spell).items():
        comp, name = mod.split("_", 1)
        by_module.setdefault(spell[comp.lower()].most_common(1)[0][0], {})[name] = n
    return {
        "by_compartment": _spelled(compartments, spell),
        "by_module": by_module,
        "embedding": {"total": sum(emb.values()), "by_channel": dict(emb.most_common())},
        "other": {"total": len(other), "examples": other[:10]},
    }


def _level(meta: list[str]) -> str:
    """Single cells, images, wells or perturbations, from the metadata columns present."""
    low = [c.lower() for c in meta]
    if any(c.endswith(("_objectnumber", "_cellid")) for c in low):
        return "single cells"
    if any(c.endswith("_site") for c in low):
        return "images (fields)"
    if any(c.endswith("_well") for c in low):
        return "wells"
    return "perturbations (no well column)"


def describe_table(path: Path) -> Info:
    df = read_table(path)
    meta = [c for c in df.columns if is_metadata(c)]
    features = feature_columns(df)
    ignored = [c for c in df.columns if c not in meta and c not in features]
    values = df[features].to_numpy(dtype=float) if features else np.zeros((len(df), 0))
    nan = np.isnan(values)
    facts: dict[str, Any] = {
        "rows": len(df),
        "level": _level(meta),
        "metadata": {c: int(df[c].nunique(dropna=True)) for c in meta},
        "features": {"total": len(features), **feature_groups(features)},
        "non_numeric_columns": ignored,
        "nan": {"fraction": float(nan.mean()) if nan.size else 0.0,
                "features_with_nan": int(nan.any(axis=0).sum()),
                "all_nan_features": int(nan.all(axis=0).sum()) if len(df) else 0,
                "rows_with_nan": int(nan.any(axis=1).sum()),
                "all_nan_rows": int(nan.all(axis=1).sum()) if features else 0},
    }
    warnings = []
    if not features:
        warnings.append("no numeric feature columns: cpvs profile/evaluate need some")
    if not meta:
        warnings.append("no Metadata_ columns: evaluations need plate, well, compound or MOA columns "
                        "(`cpvs profile TABLE --join METADATA` adds them)")
    if ignored:
        warnings.append(f"{len(ignored)} column(s) are neither Metadata_ nor numeric and are ignored: {', '.join(ignored[:5])}")
    if facts["nan"]["all_nan_rows"]:
        warnings.append(f"{facts['nan']['all_nan_rows']} row(s) have no value in any feature (e.g. wells without cells)")
    if facts["nan"]["all_nan_features"]:
        warnings.append(f"{facts['nan']['all_nan_features']} feature(s) are NaN in every row")
    return Info("table", str(path), facts, warnings)
