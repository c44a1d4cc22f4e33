"""``cpvs info`` on a store of ``cpvs preprocess``: progress, channels, how it was normalized,
field size and dtype, plates, metadata columns and size on disk."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cpvs.info.record import Info
from cpvs.preprocess.store import Store

NORMALIZATION_KEYS = ("illum_size", "size", "resize_method", "clip", "dtype", "chunk")


def disk_size(path: Path) -> int:
    """Bytes of every file under ``path`` (what ``du --apparent-size`` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:  # a file removed while walking (a running preprocess)
                pass
    return total


def describe_store(path: Path) -> Info:
    store = Store(path)
    done = store.done_mask()
    params = store.attrs.get("params", {})
    table = store.table
    plates = table["Metadata_Plate"].astype(str).value_counts(sort=False).to_dict() if "Metadata_Plate" in table else {}
    meta = {c: int(table[c].nunique(dropna=True)) for c in table.columns
            if c.startswith("Metadata_") and c not in ("Metadata_Plate", "Metadata_Well", "Metadata_Site")}
    skipped = store.attrs.get("skipped") or []
    facts: dict[str, Any] = {
        "fields": {"done": int(done.sum()), "total": len(store)},
        "complete": store.complete,
        "channels": store.channels,
        "field_size": list(store.shape),
        "dtype": str(store.images.dtype),
        "normalization": {k: params[k] for k in NORMALIZATION_KEYS if k in params}
        | {"zscore": "per image and channel", "illumination": "per plate and channel" if params.get("illum_size") else "none"},
        "channel_stats": store.attrs.get("channel_stats", {}),
        "plates": {str(k): int(v) for k, v in plates.items()},
        "metadata_columns": meta,
        "skipped_fields": len(skipped),
        "size_on_disk": disk_size(path),
        "cpvs_version": store.attrs.get("cpvs_version"),
    }
    warnings = []
    if not store.complete:
        warnings.append(f"the store is not finished ({int(done.sum())} of {len(store)} fields done): "
                        "rerun the same `cpvs preprocess` command to finish it")
    return Info("store", str(path), facts, warnings)
