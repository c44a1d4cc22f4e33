"""Profile tables shared by profile and evaluate: reading, feature and metadata columns, aggregation.

Any table with ``Metadata_`` columns works: what cpvs writes, pycytominer/CytoTable
output, or an external CSV/Parquet. Column names given by the user are matched
exactly, else case-insensitively (``Metadata_MOA`` finds ``Metadata_moa``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError

METADATA_PREFIXES = ("Metadata_", "Image_Metadata_")


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV (optionally gzipped), TSV or Parquet table."""
    path = Path(path)
    if not path.exists():
        raise CpvsError("profile table not found", path, "check the path (CSV, TSV or Parquet)")
    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            df = pd.read_parquet(path)
        elif name.endswith((".tsv", ".tsv.gz", ".txt")):
            df = pd.read_csv(path, sep="\t")
        else:
            df = pd.read_csv(path)
    except Exception as e:  # parsers raise many types for a damaged file
        raise CpvsError(f"cannot read the table ({type(e).__name__}: {str(e).splitlines()[0][:200]})", path,
                        "pass a CSV, TSV or Parquet file") from None
    if df.empty:
        raise CpvsError("the table has no rows", path, "pass a table with one row per image, well or perturbation")
    return df


def is_metadata(col: str) -> bool:
    return col.startswith(METADATA_PREFIXES)


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns that are not metadata."""
    return [c for c in df.columns if not is_metadata(c) and pd.api.types.is_numeric_dtype(df[c])]


def resolve_column(df: pd.DataFrame, name: str, option: str, source: str | Path | None = None) -> str:
    """The column ``name`` (exact, else case-insensitive), or one error listing the metadata columns."""
    if name in df.columns:
        return name
    matches = [c for c in df.columns if c.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    meta = [c for c in df.columns if is_metadata(c)]
    raise CpvsError(
        f"no column {name!r} for {option}; metadata columns are: {', '.join(meta) or '(none)'}",
        source, f"pass {option} with one of those names",
    )


def derive_column(df: pd.DataFrame, spec: str, source: str | Path | None = None) -> tuple[pd.DataFrame, str]:
    """``NEW=SOURCE:REGEX`` adds column NEW from the first regex group of SOURCE
    (e.g. ``Metadata_Batch=Metadata_Plate:^(Week\\d+)``)."""
    m = re.match(r"^([^=]+)=([^:]+):(.+)$", spec)
    if not m:
        raise CpvsError(f"cannot parse {spec!r}: expected NEW=SOURCE:REGEX, e.g. Metadata_Batch=Metadata_Plate:^(Week\\d+)")
    new, src, pattern = m.group(1).strip(), m.group(2).strip(), m.group(3)
    src = resolve_column(df, src, "--derive", source)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise CpvsError(f"bad regular expression {pattern!r} ({e})") from None
    values = df[src].astype(str).map(lambda v: (m.group(1) if m.groups() else m.group(0)) if (m := rx.search(v)) else None)
    if values.isna().any():
        bad = df.loc[values.isna(), src].astype(str).unique()[:3]
        raise CpvsError(f"--derive: {pattern!r} does not match {src} values such as {', '.join(bad)}", source)
    df = df.copy()
    df[new] = values
    return df, new


def clean_features(df: pd.DataFrame, features: list[str]) -> list[str]:
    """Features usable for distances: finite everywhere and not constant."""
    if df.empty:
        return []
    x = df[features].to_numpy(dtype=np.float64)
    finite = np.isfinite(x).all(axis=0)
    ok = finite & (np.where(finite, x, 0).std(axis=0) > 0)
    return [f for f, k in zip(features, ok) if k]


def aggregate(df: pd.DataFrame, by: list[str], features: list[str], method: str = "median",
              keep: list[str] | None = None) -> pd.DataFrame:
    """One row per group of ``by``: the median (or mean) of ``features``, plus ``keep``
    columns (their first value in the group) and ``n_profiles``."""
    if method not in ("median", "mean"):
        raise CpvsError(f"aggregation must be median or mean, got {method!r}")
    groups = df.groupby(by, sort=True, dropna=False)
    agg = groups[features].median() if method == "median" else groups[features].mean()
    extra = groups[[k for k in (keep or []) if k not in by]].first() if keep else None
    parts = [groups.size().rename("n_profiles")] + ([] if extra is None or extra.empty else [extra]) + [agg]
    return pd.concat(parts, axis=1).copy().reset_index()  # copy() consolidates the blocks first


def perturbation_columns(table: pd.DataFrame) -> list[str]:
    """The columns that define a perturbation: ``Metadata_Perturbation``, else compound and
    concentration, else the well itself."""
    if "Metadata_Perturbation" in table.columns:
        return ["Metadata_Perturbation"]
    cols = [c for c in ("Metadata_Compound", "Metadata_Concentration") if c in table.columns]
    return cols or ["Metadata_Well"]


WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]


def _carried(df: pd.DataFrame, drop: list[str]) -> list[str]:
    """Metadata carried up a level: everything but the keys below it and the counts of lower levels."""
    return [c for c in df.columns if is_metadata(c) and c not in drop and not c.startswith("Metadata_Count_")]


def to_wells(df: pd.DataFrame, features: list[str], method: str = "median", count: str = "Metadata_Count_Images") -> pd.DataFrame:
    """Images (or fields) -> one row per plate and well, with the number of rows aggregated in ``count``."""
    keep = _carried(df, WELL_KEYS + ["Metadata_Site"])
    return aggregate(df, WELL_KEYS, features, method, keep).rename(columns={"n_profiles": count})


def to_perturbations(wells: pd.DataFrame, features: list[str], method: str = "median") -> pd.DataFrame:
    """Wells -> one row per perturbation (:func:`perturbation_columns`), with ``Metadata_Count_Wells``."""
    keys = perturbation_columns(wells)
    keep = _carried(wells, keys + WELL_KEYS + ["Metadata_Site"])
    return aggregate(wells, keys, features, method, keep).rename(columns={"n_profiles": "Metadata_Count_Wells"})


def query_mask(df: pd.DataFrame, expr: str, option: str, source=None) -> np.ndarray:
    """Rows matching a pandas query expression, or one error listing the metadata columns."""
    try:
        mask = df.eval(expr)
    except Exception as e:  # pandas raises UndefinedVariableError, SyntaxError, ...
        meta = [c for c in df.columns if is_metadata(c)]
        raise CpvsError(f"{option} {expr!r} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                        f"metadata columns are: {', '.join(meta)}", source,
                        "write the query with those column names, e.g. \"Metadata_ControlType == 'negcon'\"") from None
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (len(df),):
        raise CpvsError(f"{option} {expr!r} is not a row condition", source)
    return mask


def canonical_metadata(df: pd.DataFrame) -> pd.DataFrame:
    """``Image_Metadata_X`` columns renamed ``Metadata_X`` (CellProfiler per-image exports)."""
    return df.rename(columns={c: "Metadata_" + c[len("Image_Metadata_"):] for c in df.columns
                              if c.startswith("Image_Metadata_") and "Metadata_" + c[len("Image_Metadata_"):] not in df.columns})


def join_metadata(df: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Add the columns of a metadata table (e.g. plate, well -> compound, MOA) on the
    ``Metadata_`` columns both share. Plain column names get the platemap renames
    (``moa`` -> ``Metadata_MOA``, ``compound`` -> ``Metadata_Compound``, others ``Metadata_<name>``)."""
    from cpvs.plate.platemap import PLATE_SYNONYMS, RENAME, WELL_SYNONYMS

    def rename(c: str) -> str:
        low = c.lower()
        if low in PLATE_SYNONYMS:
            return "Metadata_Plate"
        if low in WELL_SYNONYMS:
            return "Metadata_Well"
        if low in ("site", "field", "metadata_site"):
            return "Metadata_Site"
        return c if c.startswith("Metadata_") else RENAME.get(low, f"Metadata_{c}")

    right = canonical_metadata(read_table(path))
    right = right.rename(columns={c: rename(c) for c in right.columns})
    if "Metadata_Well" in right.columns:
        from cpvs.plate.wells import normalize_well

        right["Metadata_Well"] = right["Metadata_Well"].map(normalize_well)
    keys = [c for c in right.columns if c in df.columns and c.startswith("Metadata_")]
    if not keys:
        raise CpvsError(f"--join table shares no Metadata_ column with the profiles (it has {', '.join(right.columns[:8])})", path)
    if right.duplicated(keys).any():
        raise CpvsError(f"--join table lists the same {', '.join(keys)} more than once", path)
    left = df.copy()
    for k in keys:  # join on values, whatever dtype each file parsed them as
        left[k], right[k] = left[k].astype(str), right[k].astype(str)
    out = left.merge(right, on=keys, how="left", validate="many_to_one")
    for k in keys:
        out[k] = df[k].values
    return out


IMAGE_PREFIXES = ("RescaleIntensity", "Orig", "Corr", "Illum", "Masked")  # how CellProfiler pipelines name image versions
_CHANNEL_WORDS = {"dna": "DNA", "hoechst": "DNA", "dapi": "DNA", "er": "ER", "rna": "RNA", "agp": "AGP", "mito": "Mito",
                  "mitochondria": "Mito", "brightfield": "BF", "bf": "BF"}


def _cpvs_channel(token: str) -> str | None:
    t = token
    for p in IMAGE_PREFIXES:
        if t.startswith(p) and len(t) > len(p):
            t = t[len(p):]
            break
    low = t.lower()
    if low in _CHANNEL_WORDS:
        return _CHANNEL_WORDS[low]
    if low.startswith("brightf"):  # CellProfiler pipelines often shorten it (Brightfild, Brightfld)
        return "BF"
    return None


def cpvs_feature_names(columns: list[str]) -> dict[str, str]:
    """CellProfiler feature names as cpvs writes them: the image names of the user's pipeline
    (``Cells_Intensity_MeanIntensity_CorrDNA``, ``…_OrigBrightfield``) become cpvs channel names
    (``Cells_Intensity_MeanIntensity_DNA``). Returns {old: new} for the columns that change."""
    out = {}
    for c in columns:
        if is_metadata(c) or "_" not in c:
            continue
        parts = c.split("_")
        new = parts[:2] + [_cpvs_channel(p) or p for p in parts[2:]]
        name = "_".join(new)
        if name != c:
            out[c] = name
    return out
