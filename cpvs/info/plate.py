"""``cpvs info`` on a plate: layout, wells and sites, where each channel name comes from, what
the channel map leaves out, one field's image size and dtype, and the platemap's columns."""

from __future__ import annotations

import difflib
import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError, CpvsWarning
from cpvs.info.record import Info
from cpvs.plate.channels import BRIGHTFIELD, FLUORESCENCE, canonical_channel
from cpvs.plate.discover import LOAD_DATA_NAMES, discover_plates
from cpvs.plate.layout import Plate, StorePlane
from cpvs.plate.loaddata import is_load_data
from cpvs.plate.naming import SCHEMES
from cpvs.plate.tiff import read_image
from cpvs.plate.wells import well_rowcol

KNOWN = FLUORESCENCE + BRIGHTFIELD
SATURATED_WARNING = 0.01  # a few saturated pixels are common; 1 % of a field distorts its intensity features


def describe_plates(path: Path, channel_map: str | None, platemap: str | Path | None, plate_name: str | None) -> Info:
    # Discovery's own warnings (a map leaving file channels out, names models do not use) are part
    # of the answer: collected here into Info.warnings rather than printed on the side.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CpvsWarning)
        plates = discover_plates(path, channel_map=channel_map, platemap=platemap, plate_name=plate_name)
    notes = [str(w.message) for w in caught if issubclass(w.category, CpvsWarning)]
    for w in caught:
        if not issubclass(w.category, CpvsWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if channel_map and path.is_file():
        notes.append("--channel-map is not used for a LoadData CSV: its FileName_Orig<Channel> columns name the channels")
    facts = [_plate_facts(p, path, notes) for p in plates]
    if len(facts) == 1:
        return Info("plate", str(path), facts[0], notes)
    return Info("plates", str(path), {"plates": facts}, notes)


def _plate_facts(plate: Plate, path: Path, notes: list[str]) -> dict[str, Any]:
    sites = Counter(Counter(f.well for f in plate.fields).values())
    wells = sorted({f.well for f in plate.fields}, key=well_rowcol)
    channels = _channel_sources(plate, path)
    unmapped = _unmapped(plate)
    unknown = [c["name"] for c in channels if not c["known"]]
    facts_image = _image(plate)
    cmap = plate.channel_map.source if plate.channel_map is not None else None
    # Discovery of Phenix/CV8000 folders warns about these two itself; OME-Zarr plates and LoadData
    # CSVs are read elsewhere, so info says it for them.
    if plate.layout not in SCHEMES:
        for u in unmapped:
            notes.append(f"{plate.name}: OME-Zarr channel {u['channel']}{_plane(u)} is not in the channel map {cmap}: "
                         "it is left out (name it in --channel-map to use it)")
        if unknown:
            notes.append(f"{plate.name}: channel name(s) {', '.join(unknown)} are not the names cpvs models use "
                         f"({', '.join(KNOWN)}); models and evaluations will not find them under another name")
    for name, frac in facts_image["saturated_fraction"].items():
        if frac >= SATURATED_WARNING:
            notes.append(f"{plate.name}: {frac:.1%} of the {name} pixels of {facts_image['field']} are saturated "
                         "(at the image type's maximum)")
    return {
        "name": plate.name,
        "layout": plate.layout,
        "root": str(plate.root),
        "fields": len(plate.fields),
        "wells": len(wells),
        "well_list": wells,
        "sites_per_well": {str(k): v for k, v in sorted(sites.items())},  # sites -> number of wells with that many
        "channel_map": cmap,
        "channels": channels,
        "unmapped_file_channels": unmapped,
        "unknown_channel_names": unknown,
        "image": facts_image,
        "platemap": _platemap(plate),
    }


def _known(name: str) -> bool:
    return name in KNOWN or (name.endswith("_std") and name[:-4] in KNOWN)


def _plane(d: dict) -> str:
    return f" plane {d['plane']}" if d.get("plane") is not None else ""


def _channel_sources(plate: Plate, path: Path) -> list[dict[str, Any]]:
    """Each channel name with where it comes from: the channel (and plane) number in the file names,
    the 1-based position on an OME-Zarr channel axis, or a LoadData column."""
    first = plate.fields[0]
    columns = _load_data_columns(plate, path) if plate.layout == "loaddata" else {}
    out = []
    for name in plate.channels:
        ref = first.files[name]
        entry: dict[str, Any] = {"name": name, "known": _known(name)}
        if not entry["known"]:
            close = difflib.get_close_matches(name, KNOWN, n=1)
            entry["did_you_mean"] = close[0] if close else None
        if isinstance(ref, StorePlane):
            pos = dict(zip(ref.axes, ref.index))
            entry.update(channel=pos.get("c", 0) + 1, plane=pos["z"] + 1 if "z" in pos else None, source="OME-Zarr channel axis")
        elif plate.layout in SCHEMES and (parsed := SCHEMES[plate.layout](Path(ref).name)):
            entry.update(channel=parsed.channel, plane=parsed.plane, source="file names")
        else:
            entry.update(channel=None, plane=None, source=columns.get(name, "LoadData CSV"))
        out.append(entry)
    return out


def _load_data_columns(plate: Plate, path: Path) -> dict[str, str]:
    """Channel name -> the LoadData column naming its files (``FileName_OrigHoechst`` for DNA)."""
    if path.is_file():
        csv = path
    else:
        found = [path / n for n in LOAD_DATA_NAMES if (path / n).is_file()] or [p for p in sorted(path.glob("*.csv")) if is_load_data(p)]
        csv = found[0] if found else None
    if csv is None:
        return {}
    out = {}
    for col in pd.read_csv(csv, nrows=0).columns:
        if col.startswith("FileName_"):
            try:
                out[canonical_channel(col.removeprefix("FileName_"))] = f"LoadData column {col}"
            except CpvsError:  # a column discovery ignored too
                pass
    return out


def _unmapped(plate: Plate) -> list[dict[str, Any]]:
    """File channels (and planes) present on disk that the channel map does not name: from the
    file names discovery left out, or the positions of an OME-Zarr channel axis no name points at."""
    first = next(iter(plate.fields[0].files.values()))
    if isinstance(first, StorePlane):
        return _unmapped_store_planes(plate)
    out = []
    for text in plate.ignored_channels:
        m = re.fullmatch(r"ch(\d+)p(\d+)", text)
        out.append({"channel": int(m.group(1)), "plane": int(m.group(2))} if m else {"channel": text, "plane": None})
    return out


def _unmapped_store_planes(plate: Plate) -> list[dict[str, Any]]:
    refs = list(plate.fields[0].files.values())
    axes = refs[0].axes
    try:
        meta = json.loads(refs[0].metadata_file().read_text())
    except (OSError, ValueError):
        return []
    sizes = dict(zip(axes, meta.get("shape", [])))  # the lead axes come first in the array's shape
    used = {(dict(zip(r.axes, r.index)).get("c", 0), dict(zip(r.axes, r.index)).get("z", 0)) for r in refs}
    n_z = sizes.get("z", 1)
    return [{"channel": c + 1, "plane": z + 1 if n_z > 1 else None}
            for c in range(sizes.get("c", 1)) for z in range(n_z) if (c, z) not in used]


def _image(plate: Plate) -> dict[str, Any]:
    """Size, dtype and intensity range of the first field, channel by channel (one field is read)."""
    f = plate.fields[0]
    ranges, saturated, shapes, dtypes = {}, {}, set(), set()
    for name in plate.channels:
        img = read_image(f.files[name])
        shapes.add(img.shape)
        dtypes.add(str(img.dtype))
        ranges[name] = [float(np.nanmin(img)), float(np.nanmax(img))]
        # Pixels at the integer type's maximum were clipped by the camera: their intensity is lost.
        saturated[name] = float((img == np.iinfo(img.dtype).max).mean()) if img.dtype.kind in "ui" else 0.0
    (h, w), *more = sorted(shapes)
    return {"field": f"{f.well} site {f.site}", "height": int(h), "width": int(w), "dtype": "/".join(sorted(dtypes)),
            "same_shape": not more, "range": ranges, "saturated_fraction": saturated}


def _platemap(plate: Plate) -> dict[str, Any]:
    meta = plate.metadata if plate.metadata is not None else pd.DataFrame()
    source = (str(plate.platemap_path) if plate.platemap_path else
              (f"inside the OME-Zarr plate ({plate.platemap[0]})" if plate.platemap else None))
    cols = {c: int(meta[c].nunique(dropna=True)) for c in meta.columns
            if c.startswith("Metadata_") and c not in ("Metadata_Plate", "Metadata_Well", "Metadata_Site")}
    return {"file": source, "columns": cols}


__all__ = ["describe_plates"]
