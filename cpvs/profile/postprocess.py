"""Normalization and feature selection of a whole profile table (``cpvs profile TABLE``, and
the well tables ``cpvs profile PLATE`` writes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cpvs.errors import CpvsError
from cpvs.profile.normalize import OPERATIONS, feature_select, normalize
from cpvs.runinfo import atomic_path
from cpvs.tables import canonical_metadata, feature_columns, join_metadata, query_mask, read_table, to_perturbations


@dataclass
class PostprocessConfig:
    normalize: str | None = None  # standardize | robustize | mad_robustize | spherize
    control_query: str | None = None  # fit rows; None = all samples
    by_plate: bool = False
    select: bool = False
    operations: list[str] = field(default_factory=lambda: list(OPERATIONS))
    features_from: Path | None = None
    na_cutoff: float = 0.05
    corr_threshold: float = 0.9
    freq_cut: float = 0.05
    unique_cut: float = 0.01
    outlier_cutoff: float = 15.0

    @property
    def active(self) -> bool:
        return bool(self.normalize or self.select or self.features_from)

    def check(self) -> None:
        bad = [o for o in self.operations if o not in OPERATIONS]
        if bad:
            raise CpvsError(f"unknown --select-ops {', '.join(bad)}; use {', '.join(OPERATIONS)}")

    def suffix(self) -> str:
        parts = (["normalized"] if self.normalize else []) + (["feature_select"] if self.select or self.features_from else [])
        return "_".join(parts)


@dataclass
class PostprocessReport:
    n_rows: int
    n_features_in: int
    n_features_out: int
    normalization: dict = field(default_factory=dict)
    selection: dict = field(default_factory=dict)


def postprocess(df: pd.DataFrame, cfg: PostprocessConfig, source=None) -> tuple[pd.DataFrame, PostprocessReport]:
    """Normalize, then select features (fitted here, or taken from ``features_from``)."""
    features = feature_columns(df)
    if not features:
        raise CpvsError("the table has no numeric feature columns besides Metadata_ ones", source,
                        "pass a profile table (features as numeric columns, metadata as Metadata_ columns)")
    report = PostprocessReport(len(df), len(features), len(features))
    controls = query_mask(df, cfg.control_query, "--control-query", source) if cfg.control_query else None
    if cfg.normalize:
        by = None
        if cfg.by_plate:
            if "Metadata_Plate" not in df.columns:
                raise CpvsError("--by-plate needs a Metadata_Plate column", source)
            by = "Metadata_Plate"
        df, nrep = normalize(df, features, cfg.normalize, controls, by)
        report.normalization = {"method": nrep.method, "reference_rows": nrep.reference_rows, "by_plate": cfg.by_plate,
                                "zero_mad_features_set_to_nan": nrep.zero_mad_features,
                                "constant_features_set_to_nan": nrep.constant_features}
    kept = features
    if cfg.features_from is not None:
        ref = read_table(cfg.features_from)
        kept = [c for c in feature_columns(ref)]
        missing = [c for c in kept if c not in df.columns]
        if missing:
            raise CpvsError(f"{len(missing)} selected feature(s) of {cfg.features_from} are missing here, e.g. {', '.join(missing[:3])}",
                            source, "measure both tables with the same channels and modules")
        report.selection = {"from": str(cfg.features_from), "n": len(kept)}
    elif cfg.select:
        sel = feature_select(df, features, cfg.operations, cfg.na_cutoff, cfg.corr_threshold, cfg.freq_cut, cfg.unique_cut,
                             cfg.outlier_cutoff, controls)
        kept = sel.kept
        report.selection = {"operations": cfg.operations, "dropped": {k: len(v) for k, v in sel.dropped.items()}}
    if not kept:
        raise CpvsError("feature selection left no feature", source, "relax --na-cutoff / --corr-threshold / --outlier-cutoff")
    meta = [c for c in df.columns if c not in set(features)]
    report.n_features_out = len(kept)
    return df[meta + kept].copy(), report


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """CSV (optionally gzipped) by the name's suffix, else Parquet; written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
            df.to_csv(tmp, index=False, compression="gzip" if path.name.lower().endswith(".gz") else None)
        else:
            df.to_parquet(tmp, index=False)
    return path


def postprocess_table(table: Path, cfg: PostprocessConfig, out: Path, joins: list[Path] | None = None) -> tuple[Path, PostprocessReport]:
    """``cpvs profile TABLE``: join metadata, normalize and select; ``out`` is a table path or a folder."""
    cfg.check()
    if not cfg.active:
        raise CpvsError("nothing to do with a table", hint="pass --normalize and/or --feature-select (or --features-from)")
    df = canonical_metadata(read_table(table))
    for j in joins or []:
        df = join_metadata(df, j)
    result, report = postprocess(df, cfg, table)
    stem = table.name.split(".")[0]
    target = out if out.suffix.lower() in (".parquet", ".csv", ".gz") else out / f"{stem}_{cfg.suffix()}.parquet"
    return write_table(result, target), report


def postprocess_wells(well_tables: list[Path], cfg: PostprocessConfig, out: Path, method: str = "median") -> tuple[dict[str, Path], PostprocessReport]:
    """The well tables of profiled plates, normalized and selected together, and their perturbations."""
    cfg.check()
    wells = pd.concat([pd.read_parquet(p) for p in well_tables], ignore_index=True)
    result, report = postprocess(wells, cfg, out)
    suffix = cfg.suffix()
    paths = {"well": write_table(result, out / f"well_{suffix}.parquet")}
    paths["perturbation"] = write_table(to_perturbations(result, feature_columns(result), method), out / f"perturbation_{suffix}.parquet")
    return paths, report
