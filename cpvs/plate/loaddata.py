"""CellProfiler LoadData CSVs: read any layout through one, write one for every plate cpvs writes."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from cpvs.errors import CpvsError
from cpvs.plate.channels import canonical_channel, order_channels
from cpvs.plate.layout import Field, Plate
from cpvs.plate.wells import normalize_well
from cpvs.runinfo import atomic_path

PLATE_COLS = ("Metadata_Plate", "Image_Metadata_Plate")
WELL_COLS = ("Metadata_Well", "Image_Metadata_Well")
SITE_COLS = ("Metadata_Site", "Metadata_Field", "Image_Metadata_Site")


def _pick(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    for n in names:
        if n in df.columns:
            return n
    return None


def _read_table(path: Path) -> pd.DataFrame:
    sep = "\t" if path.suffix.lower() in {".tsv", ".txt"} else ","
    try:
        return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise CpvsError("LoadData CSV not found", path, "check the path") from None
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as e:
        raise CpvsError(f"cannot parse LoadData CSV ({e})", path, "pass a CellProfiler LoadData CSV (FileName_Orig<Ch>, PathName_Orig<Ch>, Metadata_Plate/Well/Site columns)") from None


def is_load_data(path: Path) -> bool:
    """True when a CSV has CellProfiler ``FileName_*`` columns."""
    try:
        header = pd.read_csv(path, nrows=0).columns
    except Exception:
        return False
    return any(c.startswith("FileName_") for c in header)


def read_load_data(path: str | Path, channels: list[str] | None = None) -> list[Plate]:
    """Plates described by a LoadData CSV (``FileName_Orig<Ch>`` / ``PathName_Orig<Ch>``).

    Relative ``PathName`` values are resolved against the CSV's folder. When any
    ``FileName_Orig*`` column exists only those are read (``Illum*`` columns are
    CellProfiler's own intermediate images).
    """
    path = Path(path)
    df = _read_table(path)
    if df.empty:
        raise CpvsError("the LoadData CSV has no rows", path, "list one row per field (plate, well, site and one file per channel)")
    file_cols = [c for c in df.columns if c.startswith("FileName_")]
    if not file_cols:
        raise CpvsError(
            "no FileName_<Channel> columns: this is not a CellProfiler LoadData CSV",
            path,
            "add FileName_OrigDNA / PathName_OrigDNA style columns",
        )
    orig = [c for c in file_cols if c.startswith("FileName_Orig")]
    file_cols = orig or file_cols
    chan_of = {c: canonical_channel(c.removeprefix("FileName_")) for c in file_cols}
    available = list(chan_of.values())
    col_of = {v: k for k, v in chan_of.items()}
    if channels:
        missing = [c for c in channels if c not in available]
        if missing:
            raise CpvsError(
                f"channel(s) {', '.join(missing)} not in the LoadData CSV; it has {', '.join(available)}",
                path,
                "pass --channels with names from that list",
            )
        file_cols = [col_of[c] for c in channels]
    else:
        file_cols = [col_of[c] for c in order_channels(available)]
    wcol, scol, pcol = _pick(df, WELL_COLS), _pick(df, SITE_COLS), _pick(df, PLATE_COLS)
    if wcol is None:
        raise CpvsError("LoadData CSV has no Metadata_Well column", path, "add a Metadata_Well column (A01 style)")
    plates: dict[str, list[Field]] = {}
    for i, row in df.iterrows():
        plate = row[pcol] if pcol else path.parent.name
        site = int(row[scol]) if scol and str(row[scol]).strip() else 1
        files = {}
        for c in file_cols:
            suffix = c.removeprefix("FileName_")
            folder = row.get(f"PathName_{suffix}", "") or ""
            fname = row[c]
            if not fname:
                raise CpvsError(f"row {i + 2} has an empty {c}", path, "fill in the file name, or remove the row")
            folder_path = Path(folder) if folder else path.parent
            if not folder_path.is_absolute():
                folder_path = path.parent / folder_path
            files[chan_of[c]] = folder_path / fname
        plates.setdefault(plate, []).append(Field(plate, normalize_well(row[wcol]), site, files))
    out = []
    chans = [chan_of[c] for c in file_cols]
    for name, fields in plates.items():
        fields.sort(key=Field.sort_key)
        keys = [f.key for f in fields]
        dup = sorted({k for k in keys if keys.count(k) > 1})
        if dup:
            raise CpvsError(f"field(s) listed more than once: {', '.join(dup[:5])}", path,
                            "keep one row per plate, well and site")
        out.append(Plate(name, path.parent, "loaddata", chans, fields))
    return out


def load_data_frame(plate: Plate, relative_to: Path | None = None) -> pd.DataFrame:
    """The LoadData table of a plate (``FileName_Orig<Ch>``, ``PathName_Orig<Ch>``, metadata)."""
    table = plate.table()
    for ch in plate.channels:
        names, folders = [], []
        for f in plate.fields:
            p = Path(f.files[ch])
            names.append(p.name)
            folder = p.parent
            if relative_to is not None:
                folder = Path(os.path.relpath(folder.resolve(), relative_to.resolve()))
            folders.append(str(folder))
        table[f"FileName_Orig{ch}"] = names
        table[f"PathName_Orig{ch}"] = folders
    return table


def write_load_data(plate: Plate, path: str | Path, relative: bool = True) -> Path:
    """Write a LoadData CSV for ``plate``; path names relative to the CSV's folder by default,
    so the plate folder can be moved as a whole."""
    path = Path(path)
    df = load_data_frame(plate, relative_to=path.parent if relative else None)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path
