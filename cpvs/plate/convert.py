"""``cpvs convert``: a plate from one format to the other (TIFFs or LoadData <-> OME-Zarr HCS).

What cpvs uses of a plate survives the round trip: plate name, wells, sites, channel names,
pixels (same dtype, same values) and the platemap (kept as text in the store's ``cpvs``
attributes). A Phenix plate read through a channel map keeps its channel numbering: the store
lists channels in that order (so the same map names them by position) and records it, and
the way back writes the same Phenix names with a ``channel_map.csv``. Other plates come back
as ``PLATE_WELL_sSITE_CH.tiff`` with a ``load_data.csv``.

Resumable like every writer: finished fields are skipped on a rerun.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cpvs import __version__
from cpvs.errors import CpvsError
from cpvs.plate.channels import ChannelMap
from cpvs.plate.discover import CHANNEL_MAP_NAME, discover_plates
from cpvs.plate.layout import Field, Plate
from cpvs.plate.loaddata import write_load_data
from cpvs.plate.naming import plate_tiff_names, source_numbering
from cpvs.plate.omezarr import is_zarr_group
from cpvs.plate.omezarr_write import PlateStoreWriter, validate_store
from cpvs.plate.tiff import read_image, write_image
from cpvs.runinfo import atomic_path

FORMATS = ("ome-zarr", "tiff")
Progress = Callable[..., None]


@dataclass
class ConvertResult:
    out: Path
    plate: str
    format: str
    channels: list[str]
    n_fields: int
    n_written: int
    n_resumed: int
    validated: str | None = None  # the NGFF version the written store was validated against
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def read_stack(f: Field, channels: list[str]) -> np.ndarray:
    """(C, H, W) of one field in the images' own dtype (a common one if they differ)."""
    planes = [read_image(f.files[c]) for c in channels]
    shapes = {p.shape for p in planes}
    if len(shapes) > 1:
        raise CpvsError(f"the channels of field {f.well} site {f.site} differ in shape: {sorted(shapes)}", f.files[channels[0]],
                        "re-export the field, or rerun with --on-error skip")
    return np.stack(planes)


def _store_channels(plate: Plate, numbering: tuple[str, ChannelMap] | None) -> list[str]:
    if numbering is None:
        return list(plate.channels)
    key = {name: (k[0], k[1] or 0) for k, name in numbering[1].entries}
    return sorted(plate.channels, key=lambda c: key.get(c, (1 << 30, 0)))


def convert_plate(plate: Plate, out: str | Path, fmt: str = "ome-zarr", version: str = "0.5", workers: int = 2,
                  on_error: str = "raise", progress: Progress | None = None, validate: bool = True) -> ConvertResult:
    """Write ``plate`` as an OME-Zarr HCS plate at ``out`` (``fmt='ome-zarr'``) or as a TIFF
    folder (``'tiff'``); the store is validated with ome-zarr-models once every field is in
    (about 17 ms per field)."""
    t0 = time.perf_counter()
    progress = progress or (lambda *a, **k: None)
    if fmt not in FORMATS:
        raise CpvsError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.resolve() == Path(plate.root).resolve():
        raise CpvsError("the output is the input plate", out, "choose another output path")
    numbering = source_numbering(plate)
    if fmt == "ome-zarr":
        channels = _store_channels(plate, numbering)
        attrs: dict = {"written_by": f"cpvs {__version__}"}
        if plate.platemap is not None:
            attrs["platemap"] = {"name": plate.platemap[0], "text": plate.platemap[1]}
        if numbering is not None:
            attrs["source"] = {"layout": numbering[0], "channel_map": {k: v for k, v in numbering[1].to_dict().items() if v in channels}}
        store = PlateStoreWriter(out, plate.name, [(f.well, f.site) for f in plate.fields], channels, version, attrs)
        store.create()
        is_done = lambda f: store.is_complete(f.well, f.site)  # noqa: E731
        write = lambda f: store.write_field(f.well, f.site, read_stack(f, channels))  # noqa: E731
    else:
        if is_zarr_group(out):
            raise CpvsError("the output is a Zarr store; TIFFs go to a folder", out, "choose a folder for --format tiff")
        channels = list(plate.channels)
        name_of, out_map = plate_tiff_names(plate, channels)
        _write_tiff_plate_files(plate, out, channels, name_of, out_map)
        is_done = lambda f: all((out / name_of(f, c)).exists() for c in channels)  # noqa: E731

        def write(f: Field) -> None:
            for c, img in zip(channels, read_stack(f, channels)):
                write_image(out / name_of(f, c), img)

    done = [f for f in plate.fields if is_done(f)]
    todo = [f for f in plate.fields if not is_done(f)]
    skipped = list(plate.skipped)

    def one(f: Field) -> str | None:
        try:
            write(f)
            return None
        except CpvsError as e:
            if on_error != "skip":
                raise
            return e.render()

    written = 0
    with ThreadPoolExecutor(max(1, workers)) as ex:
        for k, (f, err) in enumerate(zip(todo, ex.map(one, todo))):
            if err is None:
                written += 1
            else:
                skipped.append({"field": f.key, "reason": err})
            progress("fields", len(done) + k + 1, len(plate.fields))
    validated = validate_store(out) if fmt == "ome-zarr" and validate and not skipped else None
    return ConvertResult(out, plate.name, fmt, channels, len(plate.fields), written, len(done), validated, skipped,
                         time.perf_counter() - t0)


def _write_tiff_plate_files(plate: Plate, out: Path, channels: list[str], name_of, out_map: ChannelMap | None) -> None:
    """load_data.csv (every field), channel_map.csv (Phenix names) and the platemap."""
    out.mkdir(parents=True, exist_ok=True)
    written = Plate(plate.name, out, "converted", channels,
                    [Field(f.plate, f.well, f.site, {c: out / name_of(f, c) for c in channels}) for f in plate.fields],
                    metadata=plate.metadata)
    write_load_data(written, out / "load_data.csv")
    if out_map is not None:
        with atomic_path(out / CHANNEL_MAP_NAME) as tmp:
            tmp.write_text("channel,name\n" + "".join(f"{k},{v}\n" for k, v in out_map.to_dict().items()))
    if plate.platemap is not None:
        with atomic_path(out / f"platemap{Path(plate.platemap[0]).suffix}") as tmp:
            tmp.write_text(plate.platemap[1])


def convert(path: str | Path, out: str | Path, fmt: str = "ome-zarr", channel_map: str | None = None,
            channels: list[str] | None = None, platemap: str | Path | None = None, plate_name: str | None = None,
            version: str = "0.5", workers: int = 2, on_error: str = "raise", progress: Progress | None = None,
            validate: bool = True) -> list[ConvertResult]:
    """Every plate at ``path`` (a folder, LoadData CSV or OME-Zarr plate) converted: to ``out``
    itself for one plate, to ``out/<plate>.zarr`` (or ``out/<plate>/``) for several."""
    plates = discover_plates(path, channel_map=channel_map, channels=channels, plate_name=plate_name, platemap=platemap,
                             on_error=on_error)
    out = Path(out)
    suffix = ".zarr" if fmt == "ome-zarr" else ""
    return [convert_plate(p, out if len(plates) == 1 else out / f"{p.name}{suffix}", fmt, version, workers, on_error, progress,
                          validate) for p in plates]
