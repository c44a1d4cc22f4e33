"""Platemaps: well -> perturbation, compound, concentration, control type, MOA, target, batch.

A platemap is a CSV or TSV with a well column and any number of annotation
columns. Known columns are renamed to the cpvs/pycytominer ``Metadata_`` names;
everything else is kept as ``Metadata_<column>``.
"""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd

from cpvs.errors import CpvsError
from cpvs.plate.layout import Plate
from cpvs.plate.wells import normalize_well

WELL_SYNONYMS = ("metadata_well", "well", "well_position", "wellname", "well_name", "image_metadata_well")
PLATE_SYNONYMS = ("metadata_plate", "plate", "plate_id", "image_metadata_plate")
RENAME = {
    "perturbation": "Metadata_Perturbation",
    "treatment": "Metadata_Perturbation",
    "compound": "Metadata_Compound",
    "compound_name": "Metadata_Compound",
    "concentration": "Metadata_Concentration",
    "conc": "Metadata_Concentration",
    "dose": "Metadata_Concentration",
    "control_type": "Metadata_ControlType",
    "controltype": "Metadata_ControlType",
    "moa": "Metadata_MOA",
    "target": "Metadata_Target",
    "targets": "Metadata_Target",
    "target_list": "Metadata_Target",
    "batch": "Metadata_Batch",
}
PLATEMAP_NAMES = ("platemap.csv", "platemap.tsv", "platemap.txt")


def find_platemap(folder: Path) -> Path | None:
    """The platemap that sits in a plate folder (``platemap.csv``/``.tsv``), if any."""
    for n in PLATEMAP_NAMES:
        if (folder / n).exists():
            return folder / n
    return None


def read_platemap(path: str | Path, text: str | None = None) -> pd.DataFrame:
    """A platemap as a DataFrame with ``Metadata_Well`` (A01 style), optional
    ``Metadata_Plate``, and ``Metadata_`` annotation columns.

    ``text``: the platemap's contents when they do not come from the file at ``path`` (an
    OME-Zarr plate keeps its platemap in its attributes); ``path`` then names it in messages.
    """
    path = Path(path)
    if text is None and not path.exists():
        raise CpvsError("platemap not found", path, "pass an existing CSV/TSV with a well column (or leave --platemap out)")
    sep = "\t" if path.suffix.lower() in {".tsv", ".txt"} else ","
    try:
        df = pd.read_csv(path if text is None else io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise CpvsError(f"cannot parse platemap ({e})", path, "pass a CSV or TSV file with a header row and a well column") from None
    lower = {c.lower(): c for c in df.columns}
    well_col = next((lower[s] for s in WELL_SYNONYMS if s in lower), None)
    if well_col is None:
        raise CpvsError(
            f"platemap has no well column; columns are: {', '.join(df.columns)}",
            path,
            "name the well column 'well' or 'Metadata_Well' (A01 style)",
        )
    plate_col = next((lower[s] for s in PLATE_SYNONYMS if s in lower), None)
    out = pd.DataFrame({"Metadata_Well": [normalize_well(w) for w in df[well_col]]})
    if plate_col is not None:
        out["Metadata_Plate"] = df[plate_col].astype(str)
    for c in df.columns:
        if c in (well_col, plate_col):
            continue
        name = c if c.startswith("Metadata_") else RENAME.get(c.lower(), f"Metadata_{c}")
        if name in out.columns:
            continue  # first spelling wins: e.g. both 'target' and 'target_list'
        out[name] = df[c].values
    if "Metadata_Concentration" in out.columns:
        conc = pd.to_numeric(out["Metadata_Concentration"].replace("", None), errors="coerce")
        if conc.notna().sum() == (out["Metadata_Concentration"] != "").sum():
            out["Metadata_Concentration"] = conc
    if "Metadata_Perturbation" not in out.columns and "Metadata_Compound" in out.columns:
        conc = out.get("Metadata_Concentration")
        out["Metadata_Perturbation"] = (
            out["Metadata_Compound"].astype(str) if conc is None else out["Metadata_Compound"].astype(str) + "@" + conc.astype(str)
        )
    keys = ["Metadata_Plate", "Metadata_Well"] if plate_col else ["Metadata_Well"]
    dup = out.duplicated(keys)
    if dup.any():
        raise CpvsError(f"platemap lists well(s) {', '.join(out.loc[dup, 'Metadata_Well'].head(5))} more than once", path,
                        "keep one row per well (a platemap describes one plate)")
    return out


def join_platemap(plate: Plate, path: str | Path, on_error: str = "raise", text: str | None = None) -> Plate:
    """Attach platemap rows to the plate's fields (``plate.metadata``).

    Fields whose well the platemap lacks stop the run (``on_error='raise'``) or
    are dropped and recorded in ``plate.skipped`` (``'skip'``). ``text``: see :func:`read_platemap`.
    """
    path = Path(path)
    if text is None and path.exists():
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise CpvsError(f"cannot parse platemap ({e})", path, "pass a CSV or TSV file with a header row and a well column") from None
    pm = read_platemap(path, text)
    if "Metadata_Plate" in pm.columns:
        sub = pm[pm["Metadata_Plate"] == plate.name]
        if sub.empty:
            raise CpvsError(
                f"platemap has no rows for plate {plate.name!r} (it lists {', '.join(sorted(pm['Metadata_Plate'].unique())[:5])})",
                path,
                "pass --plate-name to name the plate as in the platemap",
            )
        pm = sub.drop(columns="Metadata_Plate")
    rows = pm.set_index("Metadata_Well")
    wells = [f.well for f in plate.fields]
    missing = sorted({w for w in wells if w not in rows.index})
    if missing and on_error != "skip":
        raise CpvsError(
            f"platemap has no row for well(s) {', '.join(missing[:10])}{' …' if len(missing) > 10 else ''} of plate {plate.name}",
            path,
            "add the wells to the platemap, or rerun with --on-error skip to leave those fields out",
        )
    keep = [w in rows.index for w in wells]
    for f, k in zip(plate.fields, keep):
        if not k:
            plate.skipped.append({"field": f.key, "reason": f"well {f.well} not in platemap {path}"})
    plate.drop_fields(keep)
    plate.metadata = rows.loc[[f.well for f in plate.fields]].reset_index(drop=True)
    plate.platemap_path = path if path.exists() else None
    plate.platemap = (path.name, text) if text is not None else None
    return plate
