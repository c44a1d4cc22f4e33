"""CellProfiler measurements per compartment and channel, with cp_measure.

cp_measure's featurizer computes intensity, size/shape (with Zernike and Feret),
texture, granularity, radial distribution (and its Zernikes) and colocalization
(Pearson, Costes, Manders, RWC); its neighbour measurement adds adjacency counts.
Images are scaled to [0, 1] (16-bit / 65535) as cp_measure requires for
CellProfiler fidelity. Columns are renamed to CellProfiler's
``Compartment_Module_Feature_Channel`` names (``Cells_Intensity_MeanIntensity_DNA``,
``Nuclei_Texture_Contrast_ER_3_00_256``, ``Cytoplasm_Correlation_Correlation_DNA_ER``).
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pandas as pd

from cpvs.errors import CpvsError
from cpvs.profile.segment import Masks

COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
MODULES = ("intensity", "sizeshape", "zernike", "feret", "texture", "granularity", "radial_distribution",
           "radial_zernikes", "correlation", "costes", "neighbors")
_CORR_PAIRS = {"Pearson": ("Correlation", False), "Slope": ("Slope", False), "Costes_1": ("Costes", False),
               "Costes_2": ("Costes", True), "Manders_1": ("Manders", False), "Manders_2": ("Manders", True),
               "RWC_1": ("RWC", False), "RWC_2": ("RWC", True)}
# Neighbour outputs that are object numbers, not measurements.
_NEIGHBOR_IDS = ("FirstClosestObjectNumber", "SecondClosestObjectNumber")
LONE_OBJECT = {"NumberOfNeighbors": 0.0, "FirstClosestDistance": np.nan, "SecondClosestDistance": np.nan,
                "AngleBetweenNeighbors": np.nan, "PercentTouching": 0.0}


ENGINES = ("cpvs", "cp_measure")


def check_engine(engine: str, device: str = "cpu") -> None:
    """A known engine; a device only for the cpvs engine (cp_measure runs on the CPU)."""
    from cpvs.device import check_device

    if engine not in ENGINES:
        raise CpvsError(f"unknown engine {engine!r}; engines are {', '.join(ENGINES)}")
    check_device(device)
    if engine == "cp_measure" and device not in ("cpu", "auto"):
        raise CpvsError(f"--device {device}: the cp_measure engine runs on the CPU only", hint="use --engine cpvs")


def check_skip(skip: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    bad = [s for s in skip if s not in MODULES]
    if bad:
        raise CpvsError(f"unknown module(s) in --skip: {', '.join(bad)}; modules are {', '.join(MODULES)}")
    return tuple(skip)


def cellprofiler_name(compartment: str, key: str) -> str:
    """cp_measure's key (``Intensity_MeanIntensity__DNA``) -> CellProfiler's column name."""
    if "__" not in key:
        return f"{compartment}_AreaShape_{key}"
    base, *chans = key.split("__")
    if len(chans) == 2:
        a, b = chans
        kind = base.removeprefix("Correlation_")
        name, swap = _CORR_PAIRS.get(kind, (kind, False))
        return f"{compartment}_Correlation_{name}_{b}_{a}" if swap else f"{compartment}_Correlation_{name}_{a}_{b}"
    ch = chans[0]
    module, _, rest = base.partition("_")
    if module in ("Intensity", "Location", "Granularity"):
        return f"{compartment}_{module}_{rest}_{ch}"
    if module == "RadialDistribution":
        m = re.match(r"^(FracAtD|MeanFrac|RadialCV)_(\d+of\d+)$", rest)
        if m:
            return f"{compartment}_RadialDistribution_{m.group(1)}_{ch}_{m.group(2)}"
        m = re.match(r"^(ZernikeMagnitude|ZernikePhase)_(\d+_\d+)$", rest)
        if m:
            return f"{compartment}_RadialDistribution_{m.group(1)}_{ch}_{m.group(2)}"
        return f"{compartment}_RadialDistribution_{rest}_{ch}"
    m = re.match(r"^([A-Za-z0-9]+)_(\d+_\d+_\d+)$", base)  # Haralick texture: Contrast_3_00_256
    if m:
        return f"{compartment}_Texture_{m.group(1)}_{ch}_{m.group(2)}"
    return f"{compartment}_{base}_{ch}"


def featurizer_config(channels: list[str], skip: tuple[str, ...] = ()) -> dict:
    from cp_measure.featurizer import make_featurizer_config

    on = lambda m: m not in skip  # noqa: E731
    corr = on("correlation") and len(channels) > 1
    return make_featurizer_config(
        channels, objects=list(COMPARTMENTS), intensity=on("intensity"), sizeshape=on("sizeshape"), zernike=on("zernike"),
        feret=on("feret"), texture=on("texture"), granularity=on("granularity"),
        radial_distribution=on("radial_distribution"), radial_zernikes=on("radial_zernikes"),
        correlation_pearson=corr, correlation_manders_fold=corr, correlation_rwc=corr,
        correlation_costes=corr and on("costes"), correlation_costes_params={"scale_max": 65535},
    )


def measure_field(images: dict[str, np.ndarray], masks: Masks, channels: list[str], skip: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per object (``ObjectNumber``) with every measurement of every compartment and channel.

    images: {channel: (H, W) float in [0, 1]}; masks: nuclei/cells/cytoplasm sharing labels 1..N.
    """
    n = masks.n
    if n == 0:
        return pd.DataFrame({"ObjectNumber": pd.Series([], dtype=np.int64)})
    cols: dict[str, np.ndarray] = {"ObjectNumber": np.arange(1, n + 1)}
    measured = [m for m in MODULES if m not in skip and m not in ("neighbors", "costes", "correlation")]
    if measured or ("correlation" not in skip and len(channels) > 1):
        from cp_measure.featurizer import featurize

        image = np.stack([images[c] for c in channels])[None].astype(np.float64)
        stack = np.stack([masks.nuclei, masks.cells, masks.cytoplasm])[None]
        with warnings.catch_warnings():
            # cp_measure warns about undefined values (e.g. Costes on flat objects); they stay NaN.
            warnings.simplefilter("ignore", RuntimeWarning)
            data, keys, rows = featurize(image, stack, featurizer_config(channels, skip))
        rows_df = pd.DataFrame(rows, columns=["image", "compartment", "label"])
        for comp in COMPARTMENTS:
            sel = (rows_df["compartment"] == comp).to_numpy()
            labels = rows_df.loc[sel, "label"].to_numpy().astype(int)
            block = np.full((n, len(keys)), np.nan)
            block[labels - 1] = data[sel]
            for j, k in enumerate(keys):
                cols[cellprofiler_name(comp, k)] = block[:, j]
    if "neighbors" not in skip:
        from cp_measure.multimask.measureobjectneighbors import measureobjectneighbors

        for comp, lab in (("Nuclei", masks.nuclei), ("Cells", masks.cells)):
            if n >= 2:
                res = measureobjectneighbors(lab, lab, distance_method="Adjacent")
            else:  # cp_measure fails on a lone object; it has no neighbour by definition
                res = {f"Neighbors_{k}_Adjacent": [v] for k, v in LONE_OBJECT.items()}
            for k, v in res.items():
                if not any(i in k for i in _NEIGHBOR_IDS):
                    cols[f"{comp}_{k}"] = np.asarray(v, dtype=np.float64)[:n]
    return pd.DataFrame(cols)
