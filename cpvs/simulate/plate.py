"""``cpvs simulate``: write synthetic plates as a microscope would (Phenix-named 16-bit TIFFs).

Every plate folder holds the TIFFs (JUMP channel numbering, so the default
channel map reads them), ``platemap.csv``, ``load_data.csv``, ground-truth
label images under ``masks/`` and ``cpvs-run.json``. A field's pixels depend
only on (seed, plate, well, site), so runs are reproducible, resumable and
parallel without changing a byte.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cpvs.errors import CpvsError
from cpvs.jobs import OutputLock, claim_identity, process_pool
from cpvs.plate.channels import PRESETS
from cpvs.plate.discover import discover_plate
from cpvs.plate.loaddata import write_load_data
from cpvs.plate.naming import phenix_name
from cpvs.plate.tiff import write_image
from cpvs.runinfo import atomic_path, write_run_record
from cpvs.simulate.design import MOAS, effect_of, platemap
from cpvs.simulate.render import BF_PLANES, FLUO, plate_optics, render_field

CHANNEL_NUMBER = {name: int(num) for num, name in PRESETS["jump"].items()}
CHANNELS = FLUO + tuple(n for n, _ in BF_PLANES)


@dataclass
class SimulateResult:
    out: Path
    plates: list[Path]
    n_fields: int
    n_written: int
    seconds: float


def plate_name(seed: int, index: int) -> str:
    return f"SIM{seed}-P{index + 1:02d}"


def _field_files(folder: Path, well: str, site: int) -> list[Path]:
    return [folder / phenix_name(well, site, CHANNEL_NUMBER[c]) for c in CHANNELS]


def _render_and_write(job: tuple) -> bool:
    folder, seed, p_index, w_index, well, site, size, effects, strength, optics, compression, masks = job
    files = _field_files(folder, well, site)
    mask_files = [folder / "masks" / f"{well}_s{site}_{k}.tiff" for k in ("nuclei", "cells")] if masks else []
    if all(f.exists() for f in files + mask_files):
        return False  # finished by an earlier run
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(p_index, w_index, site)))
    images, nuclei, cells = render_field(rng, (size, size), effects, strength, optics)
    for c, f in zip(CHANNELS, files):
        write_image(f, images[c], compression=compression)
    if masks:
        write_image(mask_files[0], nuclei.astype(np.uint16), compression="zlib")
        write_image(mask_files[1], cells.astype(np.uint16), compression="zlib")
    return True


def simulate(
    out: str | Path,
    plates: int = 2,
    wells: int = 24,
    sites: int = 4,
    size: int = 998,
    seed: int = 0,
    moas: int = 6,
    batches: int | None = None,
    workers: int = 1,
    compression: str | None = None,
    masks: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> SimulateResult:
    """Write ``plates`` simulated plates of ``wells`` x ``sites`` fields of ``size``² pixels under ``out``."""
    t0 = time.perf_counter()
    if not 1 <= moas <= len(MOAS):
        raise CpvsError(f"--moas must be between 1 and {len(MOAS)}, got {moas}")
    if not 4 <= wells <= 384:
        raise CpvsError(f"--wells must be between 4 and 384, got {wells}")
    if size < 64:
        raise CpvsError(f"--size must be at least 64 px, got {size}")
    if plates < 1 or sites < 1:
        raise CpvsError("--plates and --sites must be at least 1")
    batches = batches or plates
    out = Path(out)
    with OutputLock(out, "simulate"):
        return _simulate(out, plates, wells, sites, size, seed, moas, batches, workers, compression, masks,
                         progress or (lambda *_: None), t0)


def _simulate(out, plates, wells, sites, size, seed, moas, batches, workers, compression, masks, progress, t0) -> SimulateResult:
    params = dict(plates=plates, wells=wells, sites=sites, size=size, seed=seed, moas=moas, batches=batches, compression=compression)
    jobs, folders = [], []
    for p in range(plates):
        name = plate_name(seed, p)
        folder = out / name
        folder.mkdir(exist_ok=True)
        # A rerun resumes a plate only with the parameters it was started with (other seeds are other folders).
        claim_identity(folder, "simulate", {k: v for k, v in params.items() if k != "plates"} | {"masks": masks},
                       can_overwrite=False)
        folders.append(folder)
        prng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(p,)))
        b = p % batches
        pm = platemap(wells, moas, prng, batch=f"SIMB{b + 1}")
        optics = plate_optics(prng, b)
        with atomic_path(folder / "platemap.csv") as tmp:
            pm.to_csv(tmp, index=False)
        for w_index, row in pm.iterrows():
            effects, strength = effect_of(row)
            for site in range(1, sites + 1):
                jobs.append((folder, seed, p, w_index, row["well"], site, size, effects, strength, optics, compression, masks))
    written = 0
    progress("fields", 0, len(jobs))
    if workers > 1:
        with process_pool(workers) as ex:
            for i, w in enumerate(ex.map(_render_and_write, jobs, chunksize=1)):
                written += w
                progress("fields", i + 1, len(jobs))
    else:
        for i, job in enumerate(jobs):
            written += _render_and_write(job)
            progress("fields", i + 1, len(jobs))
    for folder in folders:
        plate = discover_plate(folder, channels=list(CHANNELS))
        write_load_data(plate, folder / "load_data.csv")
        write_run_record(folder, "simulate", params)
    write_run_record(out, "simulate", params, plates=[f.name for f in folders])
    return SimulateResult(out, folders, len(jobs), written, time.perf_counter() - t0)
