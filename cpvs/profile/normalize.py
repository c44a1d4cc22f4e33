"""Normalization and feature selection of profile tables, with pycytominer's semantics and names.

Normalization (``standardize``, ``robustize``, ``mad_robustize``, ``spherize``) is
fitted on all samples or on the rows of a query (e.g. the negative controls),
optionally per plate, and applied to every row.

``mad_robustize`` is (x − median) / (1.4826 · MAD) as in pycytominer, which adds
1e-18 to the MAD: a feature whose MAD is zero in the reference (typically a
count, such as children per cell, that controls nearly never vary) then explodes
to ±1e18 and dominates any distance unless a later outlier filter happens to
catch it. cpvs sets such features to NaN instead, so feature selection drops
them deterministically, and reports them; the same holds for any method whose
reference scale (std, IQR) is zero.

Feature selection runs pycytominer's operations (``drop_na_columns``,
``variance_threshold``, ``correlation_threshold``, ``blocklist``, with its Way 2020
CellProfiler blocklist) plus ``drop_outliers``: features reaching
``outlier_cutoff`` (15) standard deviations in the control rows after
normalization (METHODS §7).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError

METHODS = ("standardize", "robustize", "mad_robustize", "spherize")
OPERATIONS = ("drop_na_columns", "variance_threshold", "blocklist", "correlation_threshold", "drop_outliers")
MAD_SCALE = 1.4826  # MAD of a normal distribution -> its standard deviation


@dataclass
class NormalizeReport:
    method: str
    reference_rows: int
    zero_mad_features: list[str] = field(default_factory=list)
    constant_features: list[str] = field(default_factory=list)


def _fit_transform(x: np.ndarray, ref: np.ndarray, method: str, names: list[str], report: NormalizeReport) -> np.ndarray:
    with warnings.catch_warnings():
        # A feature that is NaN throughout the reference yields NaN statistics: it is
        # reported as constant below, no need for numpy's warnings.
        warnings.simplefilter("ignore", RuntimeWarning)
        return _fit_transform_quiet(x, ref, method, names, report)


def _fit_transform_quiet(x, ref, method, names, report) -> np.ndarray:
    if method == "standardize":
        center, scale = np.nanmean(ref, axis=0), np.nanstd(ref, axis=0)
    elif method == "robustize":
        center = np.nanmedian(ref, axis=0)
        q1, q3 = np.nanpercentile(ref, [25, 75], axis=0)
        scale = q3 - q1
    elif method == "mad_robustize":
        center = np.nanmedian(ref, axis=0)
        scale = MAD_SCALE * np.nanmedian(np.abs(ref - center), axis=0)
        varies = np.nanstd(ref, axis=0) > 0
        report.zero_mad_features += [n for n, z in zip(names, (scale == 0) & varies) if z]
    elif method == "spherize":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pycytominer.operations.transform import Spherize

        sph = Spherize(method="ZCA-cor").fit(pd.DataFrame(ref))
        return sph.transform(pd.DataFrame(x)).to_numpy()
    else:
        raise CpvsError(f"--normalize must be one of {', '.join(METHODS)}, got {method!r}")
    const = ~(scale > 0)
    report.constant_features += [n for n, c in zip(names, const) if c and n not in report.zero_mad_features]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (x - center) / np.where(const, np.nan, scale)
    return out


def normalize(df: pd.DataFrame, features: list[str], method: str = "mad_robustize", reference: np.ndarray | None = None,
              by: str | None = None) -> tuple[pd.DataFrame, NormalizeReport]:
    """Normalize ``features`` of ``df``; ``reference`` (bool mask) selects the fitting rows
    (default: all), ``by`` fits separately within each value of a column (e.g. per plate)."""
    if method not in METHODS:
        raise CpvsError(f"--normalize must be one of {', '.join(METHODS)}, got {method!r}")
    ref_mask = np.ones(len(df), bool) if reference is None else np.asarray(reference, bool)
    if ref_mask.sum() == 0:
        raise CpvsError("the normalization reference is empty: no row matches --control-query")
    out = df.copy()
    report = NormalizeReport(method, int(ref_mask.sum()))
    groups = [np.ones(len(df), bool)] if by is None else [(df[by] == v).to_numpy() for v in df[by].unique()]
    x_all = df[features].to_numpy(dtype=np.float64)
    result = np.empty_like(x_all)
    for g in groups:
        ref = x_all[g & ref_mask]
        if len(ref) == 0:
            name = df.loc[g, by].iloc[0]
            raise CpvsError(f"{by} = {name!r} has no reference rows to fit the normalization",
                            hint="check --control-query, or normalize without --by-plate")
        if method == "spherize" and len(ref) < 3:
            raise CpvsError("spherize needs at least 3 reference rows per group")
        result[g] = _fit_transform(x_all[g], ref, method, features, report)
    out[features] = result
    report.zero_mad_features = sorted(set(report.zero_mad_features))
    report.constant_features = sorted(set(report.constant_features))
    return out, report


@dataclass
class SelectionReport:
    kept: list[str]
    dropped: dict[str, list[str]]  # operation -> features it removed


def feature_select(df: pd.DataFrame, features: list[str], operations: list[str], na_cutoff: float = 0.05,
                   corr_threshold: float = 0.9, freq_cut: float = 0.05, unique_cut: float = 0.01,
                   outlier_cutoff: float = 15.0, controls: np.ndarray | None = None) -> SelectionReport:
    """Run the operations in order; each sees only the features that survived the previous ones."""
    with warnings.catch_warnings():  # pycytominer sets a pandas option that pandas 3 deprecates
        warnings.simplefilter("ignore")
        from pycytominer import feature_select as pcm_select

    bad = [o for o in operations if o not in OPERATIONS]
    if bad:
        raise CpvsError(f"unknown feature-selection operation(s) {', '.join(bad)}; use {', '.join(OPERATIONS)}")
    kept = list(features)
    dropped: dict[str, list[str]] = {}
    for op in operations:
        if not kept:
            break
        if op == "drop_outliers":
            rows = df if controls is None else df[np.asarray(controls, bool)]
            x = rows[kept].to_numpy(dtype=np.float64)
            with np.errstate(invalid="ignore"):
                extreme = (np.abs(x) > outlier_cutoff).any(axis=0)
            new = [f for f, e in zip(kept, extreme) if not e]
        else:
            kwargs = {"na_cutoff": na_cutoff} if op == "drop_na_columns" else {}
            if op == "correlation_threshold":
                kwargs = {"corr_threshold": corr_threshold}
            if op == "variance_threshold":
                kwargs = {"freq_cut": freq_cut, "unique_cut": unique_cut}
            sub = df[kept]
            selected = pcm_select(sub, features=kept, operation=op, **kwargs)
            new = [f for f in kept if f in selected.columns]
        dropped[op] = [f for f in kept if f not in new]
        kept = new
    return SelectionReport(kept, dropped)
