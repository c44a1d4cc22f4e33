"""Normalization and feature selection of a whole profile table (``cpvs profile TABLE``, and
the well tables ``cpvs profile PLATE`` writes)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cpvs.errors import CpvsError
from cpvs.profile.normalize import OPERATIONS, feature_select, normalize
from cpvs.tables import feature_columns, query_mask, read_table


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
        raise CpvsError("the table has no numeric feature columns besides Metadata_ ones", source)
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
