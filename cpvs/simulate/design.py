"""The experimental design of simulated plates: MOA classes, compounds, doses, platemaps.

Each MOA changes a set of cell parameters by a dose-dependent amount (a Hill
curve); two compounds per MOA share a target gene (the positives of target
matching) and differ in potency. DMSO wells are the negative controls and a
toxic compound the positive control; some MOAs (DNA damage, microtubule
destabilizers, protein synthesis) also kill cells at high doses, so toxicity
calls have real positives among the treatments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cpvs.plate.wells import well_name

# Cell parameters an MOA can change. Effects are log-fold changes at full effect,
# except the probability terms (nuc_frag) which shift a logit.
PARAMS = (
    "size", "round", "nuc_size", "nuc_frag", "dna", "chromatin", "rna", "nucleoli", "er", "er_coarse",
    "mito", "mito_punct", "agp_fiber", "agp_membrane", "golgi", "count",
)


@dataclass(frozen=True)
class MOA:
    name: str
    short: str
    target: str
    effects: dict[str, float] = field(default_factory=dict)


MOAS: tuple[MOA, ...] = (
    MOA("Aurora kinase inhibitors", "AUR", "AURKA", {"size": 0.45, "nuc_size": 0.6, "dna": 0.35, "chromatin": 0.5, "count": -0.3}),
    MOA("Actin disruptors", "ACT", "ACTB", {"agp_fiber": -2.0, "round": -1.2, "size": -0.3, "agp_membrane": 0.6, "golgi": 0.4}),
    MOA("Microtubule destabilizers", "MTD", "TUBB", {"round": -1.5, "size": -0.5, "nuc_size": -0.35, "dna": 0.7, "mito_punct": 1.5, "chromatin": -0.6, "count": -0.7}),
    MOA("DNA damage", "DDR", "TOP2A", {"nuc_frag": 5.0, "nuc_size": 0.3, "rna": -0.4, "nucleoli": -0.8, "chromatin": 0.8, "count": -0.9}),
    MOA("Protein synthesis", "PSI", "RPL3", {"rna": -1.0, "nucleoli": -1.2, "er": -0.6, "size": -0.2, "count": -0.5}),
    MOA("Mitochondrial uncouplers", "MIT", "ATP5F1A", {"mito": -1.2, "mito_punct": 2.5, "size": 0.1}),
    MOA("ER stress inducers", "ERS", "ATP2A2", {"er": 1.0, "er_coarse": 2.5, "size": 0.3, "rna": 0.25}),
    MOA("HDAC inhibitors", "HDA", "HDAC1", {"nuc_size": 0.35, "dna": -0.35, "chromatin": -1.2, "agp_membrane": -0.5}),
)
TOXIC = MOA("Toxic control", "TOX", "PRKCA", {
    "count": -1.3, "size": -0.7, "nuc_frag": 3.5, "dna": 0.9, "round": -1.8, "mito": -0.9, "rna": -0.5, "nuc_size": -0.4,
})
DOSES_UM = (10.0, 3.0, 1.0, 0.3, 0.1)
NEGCON, POSCON, TREATMENT = "negcon", "poscon", "trt"


@dataclass(frozen=True)
class Compound:
    name: str
    moa: MOA
    ec50_um: float


def compounds(n_moas: int) -> list[Compound]:
    """Two compounds per MOA (a potent and a weaker one), sharing the MOA's target."""
    out = []
    for moa in MOAS[:n_moas]:
        out.append(Compound(f"SIM-{moa.short}-1", moa, 0.5))
        out.append(Compound(f"SIM-{moa.short}-2", moa, 1.5))
    return out


def hill(conc_um: float, ec50_um: float, slope: float = 1.5) -> float:
    """Fraction of the full effect at a concentration (0 at 0, 0.5 at EC50, -> 1)."""
    if conc_um <= 0:
        return 0.0
    return float(conc_um**slope / (conc_um**slope + ec50_um**slope))


def platemap(n_wells: int, n_moas: int, rng: np.random.Generator, batch: str) -> pd.DataFrame:
    """Platemap of one plate: controls, then each compound at the highest doses
    first until the wells are used up; wells shuffled so layout and treatment
    are not confounded."""
    if n_wells < 4:
        raise ValueError("a simulated plate needs at least 4 wells (negative, positive and treatment wells)")
    n_neg = max(2, n_wells // 8)
    n_pos = max(1, n_wells // 16)
    cpds = compounds(n_moas)
    rows: list[dict] = []
    for _ in range(n_neg):
        rows.append(dict(perturbation="DMSO", compound="DMSO", concentration=0.0, control_type=NEGCON, moa="DMSO", target=""))
    for _ in range(n_pos):
        rows.append(dict(perturbation=f"SIM-TOX@{DOSES_UM[1]:g}", compound="SIM-TOX", concentration=DOSES_UM[1],
                         control_type=POSCON, moa=TOXIC.name, target=TOXIC.target))
    slots = n_wells - n_neg - n_pos
    plan = [(c, d) for d in DOSES_UM for c in cpds]
    while len(plan) < slots:  # more wells than treatments: replicate
        plan = plan + plan
    for c, d in plan[:slots]:
        rows.append(dict(perturbation=f"{c.name}@{d:g}", compound=c.name, concentration=d, control_type=TREATMENT,
                         moa=c.moa.name, target=c.moa.target))
    order = rng.permutation(n_wells)
    wells = [well_name(1 + k // 24, 1 + k % 24) for k in range(n_wells)]
    df = pd.DataFrame([rows[i] for i in order])
    df.insert(0, "well", wells)
    df["batch"] = batch
    return df


def effect_of(row: pd.Series) -> tuple[dict[str, float], float]:
    """(log-fold effects at full strength, strength in [0, 1]) for a platemap row."""
    if row["control_type"] == NEGCON:
        return {}, 0.0
    if row["control_type"] == POSCON:
        return TOXIC.effects, hill(float(row["concentration"]), 0.5)
    for c in compounds(len(MOAS)):
        if c.name == row["compound"]:
            return c.moa.effects, hill(float(row["concentration"]), c.ec50_um)
    raise KeyError(row["compound"])
