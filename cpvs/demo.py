"""``cpvs demo``: the whole chain built so far, on a small simulated example.

It grows with each capability: simulate -> preprocess -> (predict-plate ->
profile -> evaluate). Every step writes real outputs under the demo folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cpvs.plate.discover import discover_plates
from cpvs.preprocess.illumination import large_scale_variation
from cpvs.preprocess.pipeline import preprocess_plates
from cpvs.simulate import simulate


@dataclass
class Step:
    name: str
    result: str
    seconds: float


@dataclass
class DemoSummary:
    out: Path
    steps: list[Step] = field(default_factory=list)


def run_demo(
    out: str | Path,
    size: int = 512,
    wells: int = 16,
    sites: int = 2,
    workers: int = 2,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoSummary:
    out = Path(out)
    summary = DemoSummary(out)

    t = time.perf_counter()
    sim = simulate(out / "plates", plates=2, wells=wells, sites=sites, size=size, seed=seed, workers=workers, progress=progress)
    summary.steps.append(Step("simulate", f"{len(sim.plates)} plates, {sim.n_fields} fields of {size}² px, 8 channels",
                              time.perf_counter() - t))

    t = time.perf_counter()
    plates = [p for folder in sim.plates for p in discover_plates(folder)]
    pre = preprocess_plates(plates, out / "store.zarr", workers=workers, progress=progress)
    # How much illumination correction flattened the brightfield (in-focus plane) of one field.
    from cpvs.plate.tiff import read_image
    from cpvs.preprocess.store import Store

    store = Store(pre.store)
    bf = store.channels.index("BF")
    before = large_scale_variation(read_image(plates[0].fields[0].files["BF"]).astype(float))
    after = large_scale_variation(store.read_field(0)[bf] * pre.channel_stats["BF"]["std"] + pre.channel_stats["BF"]["mean"])
    summary.steps.append(Step(
        "preprocess",
        f"{pre.n_fields} fields -> {pre.store.name} ({', '.join(pre.channels)}); "
        f"brightfield large-scale variation {before:.1%} -> {after:.1%}",
        time.perf_counter() - t,
    ))
    return summary
