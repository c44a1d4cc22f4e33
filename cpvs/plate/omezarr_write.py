"""Writing OME-Zarr HCS plates (NGFF 0.5 on Zarr v3, or 0.4 on Zarr v2) and NGFF labels.

Layout::

    PLATE.zarr/                    plate metadata; cpvs attributes (platemap, source channel numbering)
      C/3/                         row C, column 3: well metadata listing its fields
        2/                         field (site 3): multiscales + omero channel labels and colours
          0, 1, …                  (C, H, W) arrays, full resolution first, each level the 2x2 mean of the last
          labels/nuclei/0, …       NGFF label images (``profile --masks-format ome-zarr``)

Shards and resume: the plate, row and well metadata depend only on the whole plate, so every
shard writes the same files (each replaced atomically). A field's arrays are written first
and its image group's metadata, the only thing that makes the field part of the plate, last:
a field is complete exactly when that metadata exists, readers never see half a field, and
shards writing disjoint fields of one store never touch the same file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from cpvs.errors import CpvsError
from cpvs.plate.layout import StorePlane
from cpvs.plate.omezarr import CPVS_ATTRS, field_groups, group_attrs, ome_attrs
from cpvs.plate.wells import row_letters, well_rowcol
from cpvs.runinfo import write_json_atomic

VERSIONS = ("0.5", "0.4")
COLORS = {"DNA": "0000FF", "ER": "00FF00", "RNA": "FFFF00", "AGP": "FF0000", "Mito": "FF00FF"}
LABEL_COLORS = {"nuclei": (255, 255, 0, 255), "cells": (255, 64, 64, 255)}
MAX_LOW_RES = 256  # the pyramid goes down until a field fits in this many pixels


def write_group(path: Path, ome: dict, version: str = "0.5", extra: dict | None = None) -> None:
    """Group metadata, replaced atomically: ``zarr.json`` with ``ome`` (0.5), or ``.zgroup`` + ``.zattrs`` (0.4)."""
    if version == "0.5":
        attrs = ({"ome": {"version": "0.5", **ome}} if ome else {}) | (extra or {})
        write_json_atomic(path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
    else:
        write_json_atomic(path / ".zgroup", {"zarr_format": 2})
        write_json_atomic(path / ".zattrs", dict(ome) | (extra or {}))


def _remove_group_metadata(path: Path) -> None:
    for name in ("zarr.json", ".zattrs"):
        (path / name).unlink(missing_ok=True)


def _remove_levels(group: Path, keep: int) -> None:
    """Arrays of levels a rewritten image no longer has (its size changed)."""
    if group.is_dir():
        for p in group.iterdir():
            if p.is_dir() and p.name.isdigit() and int(p.name) >= keep:
                shutil.rmtree(p)


def write_array(path: Path, data: np.ndarray, version: str, dims: tuple[str, ...]) -> None:
    """One array, one chunk per plane (at most 2048² px), Blosc-zstd compressed; replaces what is there."""
    import zarr

    chunks = (1,) * (data.ndim - 2) + tuple(min(s, 2048) for s in data.shape[-2:])
    kw = dict(shape=data.shape, dtype=data.dtype, chunks=chunks, fill_value=0, overwrite=True)
    if version == "0.5":
        from zarr.codecs import BloscCodec

        arr = zarr.create_array(str(path), compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
                                dimension_names=dims, **kw)
    else:
        from numcodecs import Blosc

        arr = zarr.create_array(str(path), zarr_format=2, compressors=Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE),
                                chunk_key_encoding={"name": "v2", "separator": "/"}, **kw)
    arr[...] = data


def downsample(a: np.ndarray, labels: bool = False) -> np.ndarray:
    """Half the size in y and x: the mean of each 2x2 block (labels: its top-left pixel); an odd last row or column is dropped."""
    h, w = a.shape[-2] // 2 * 2, a.shape[-1] // 2 * 2
    a = a[..., :h, :w]
    if labels:
        return a[..., ::2, ::2].copy()
    m = (a[..., ::2, ::2].astype(np.float64) + a[..., 1::2, ::2] + a[..., ::2, 1::2] + a[..., 1::2, 1::2]) / 4
    return np.rint(m).astype(a.dtype) if np.issubdtype(a.dtype, np.integer) else m.astype(a.dtype)


def pyramid(a: np.ndarray, labels: bool = False) -> list[np.ndarray]:
    """Full resolution, then halves until the field fits in MAX_LOW_RES px (at least one half, unless tiny)."""
    levels = [a]
    while (max(levels[-1].shape[-2:]) > MAX_LOW_RES or len(levels) == 1) and min(levels[-1].shape[-2:]) >= 32:
        levels.append(downsample(levels[-1], labels))
    return levels


def multiscales(n_levels: int, dims: tuple[str, ...], name: str, labels: bool, version: str) -> list[dict]:
    lead = len(dims) - 2
    axes = [{"name": d, "type": "channel" if d == "c" else "space"} for d in dims]
    datasets = []
    for k in range(n_levels):
        f = float(2**k)
        shift = 0.0 if labels else (f - 1) / 2  # a 2x2 mean sits between the pixels it averages
        datasets.append({"path": str(k), "coordinateTransformations": [
            {"type": "scale", "scale": [1.0] * lead + [f, f]},
            {"type": "translation", "translation": [0.0] * lead + [shift, shift]}]})
    ms = {"name": name, "axes": axes, "datasets": datasets, "type": "nearest" if labels else "mean"}
    return [ms | ({"version": "0.4"} if version == "0.4" else {})]


def omero(names: list[str], stack: np.ndarray) -> dict:
    """Channel labels and display settings (colour; contrast from the 0.1–99.9th percentiles)."""
    info = np.iinfo(stack.dtype) if np.issubdtype(stack.dtype, np.integer) else None
    chans = []
    for name, plane in zip(names, stack):
        sample = plane[::4, ::4]
        sample = sample[np.isfinite(sample)] if not info else sample.ravel()
        lo, hi = (float(v) for v in np.percentile(sample, [0.1, 99.9])) if sample.size else (0.0, 1.0)
        base = name.removesuffix("_std")
        color = COLORS.get(base, "FFFFFF")
        chans.append({"label": name, "color": color, "active": not name.endswith("_std"), "window": {
            "min": float(info.min) if info else (float(sample.min()) if sample.size else 0.0),
            "max": float(info.max) if info else (float(sample.max()) if sample.size else 1.0),
            "start": lo, "end": max(hi, lo + 1e-6)}})
    return {"channels": chans, "rdefs": {"model": "color"}}


def field_group(well: str, site: int) -> str:
    """``C03`` site 3 -> ``C/3/2``: row letters, column number, field index from 0."""
    r, c = well_rowcol(well)
    return f"{row_letters(r)}/{c}/{site - 1}"


class PlateStoreWriter:
    """An OME-Zarr HCS plate being written: :meth:`create` (every shard, idempotent), then
    :meth:`write_field` per field, in any order and from any process."""

    def __init__(self, path: str | Path, name: str, fields: list[tuple[str, int]], channels: list[str],
                 version: str = "0.5", cpvs: dict | None = None):
        if version not in VERSIONS:
            raise CpvsError(f"OME-Zarr version must be one of {', '.join(VERSIONS)}, got {version!r}")
        self.path, self.name, self.fields, self.channels, self.version = Path(path), name, fields, list(channels), version
        self.cpvs = cpvs or {}

    def create(self) -> None:
        if self.path.is_dir():  # dot files: another shard's metadata being renamed into place
            entries = [p for p in self.path.iterdir() if not p.name.startswith(".")]
            existing = group_attrs(self.path)
            plate = ome_attrs(*existing).get("plate") if existing else None
            if entries and plate is None:
                raise CpvsError("the output exists and is not an OME-Zarr plate", self.path, "choose a new output path, or remove it")
            if plate is not None and plate.get("name") not in (None, self.name):
                raise CpvsError(f"the output holds plate {plate.get('name')}, not {self.name}", self.path, "choose a new output path")
            if existing is not None and existing[1] != (3 if self.version == "0.5" else 2):
                raise CpvsError(f"the output is an OME-Zarr plate of another version (not {self.version})", self.path,
                                "write to a new path, or pass the version it has")
        rows = sorted({well_rowcol(w)[0] for w, _ in self.fields})
        cols = sorted({well_rowcol(w)[1] for w, _ in self.fields})
        sites: dict[str, list[int]] = {}
        for w, s in self.fields:
            sites.setdefault(w, []).append(s)
        wells = sorted(sites, key=well_rowcol)
        plate = {"name": self.name, "rows": [{"name": row_letters(r)} for r in rows], "columns": [{"name": str(c)} for c in cols],
                 "wells": [{"path": field_group(w, 1).rsplit("/", 1)[0], "rowIndex": rows.index(well_rowcol(w)[0]),
                            "columnIndex": cols.index(well_rowcol(w)[1])} for w in wells],
                 "field_count": max(len(v) for v in sites.values()), "version": self.version}
        write_group(self.path, {"plate": plate}, self.version, {CPVS_ATTRS: self.cpvs} if self.cpvs else None)
        for r in rows:
            write_group(self.path / row_letters(r), {}, self.version)
        for w in wells:
            images = [{"path": field_group(w, s).rsplit("/", 1)[1]} for s in sorted(sites[w])]
            well_meta = {"images": images} | ({"version": "0.4"} if self.version == "0.4" else {})
            write_group(self.path / field_group(w, 1).rsplit("/", 1)[0], {"well": well_meta}, self.version)

    def is_complete(self, well: str, site: int) -> bool:
        """The field's image metadata is there (written last) and names this writer's channels."""
        found = group_attrs(self.path / field_group(well, site))
        ome = ome_attrs(*found) if found else {}
        labels = [c.get("label") for c in (ome.get("omero") or {}).get("channels", [])]
        return "multiscales" in ome and labels == self.channels

    def write_field(self, well: str, site: int, stack: np.ndarray) -> None:
        """``stack`` (C, H, W) in ``channels`` order: arrays of every level, then the image metadata."""
        if stack.ndim != 3 or len(stack) != len(self.channels):
            raise ValueError(f"expected ({len(self.channels)}, H, W), got {stack.shape}")
        where = self.path / field_group(well, site)
        _remove_group_metadata(where)  # rewriting a field makes it incomplete until it is done
        levels = pyramid(stack)
        _remove_levels(where, len(levels))
        for k, a in enumerate(levels):
            write_array(where / str(k), a, self.version, ("c", "y", "x"))
        write_group(where, {"multiscales": multiscales(len(levels), ("c", "y", "x"), f"{self.name} {well} site {site}", False,
                                                       self.version),
                            "omero": omero(self.channels, stack)}, self.version)


def write_labels(image_group: Path, labels: dict[str, np.ndarray]) -> None:
    """NGFF label images (``labels/<name>``, 2-D, with their pyramid) in an image group of a
    plate store, in the store's version; each label image's metadata is written last."""
    found = group_attrs(image_group)
    if found is None or "multiscales" not in ome_attrs(*found):
        raise CpvsError("not an OME-Zarr image group: cannot hold labels", image_group)
    version = "0.5" if found[1] == 3 else "0.4"
    for name, lab in labels.items():
        where = image_group / "labels" / name
        _remove_group_metadata(where)
        levels = pyramid(lab, labels=True)
        _remove_levels(where, len(levels))
        for k, a in enumerate(levels):
            write_array(where / str(k), a, version, ("y", "x"))
        values = [int(v) for v in np.unique(lab) if v]
        color = LABEL_COLORS.get(name)
        image_label = {"source": {"image": "../../"}} | ({"version": "0.4"} if version == "0.4" else {})
        if color and values:
            image_label["colors"] = [{"label-value": v, "rgba": list(color)} for v in values]
        write_group(where, {"multiscales": multiscales(len(levels), ("y", "x"), name, True, version), "image-label": image_label},
                    version)
    write_group(image_group / "labels", {"labels": sorted(set(labels) | set(_existing_labels(image_group)))}, version)


def write_field_labels(f, labels: dict[str, np.ndarray]) -> None:
    """NGFF labels of field ``f`` of a plate read from OME-Zarr, written into its image group."""
    ref = next(iter(f.files.values()))
    if not isinstance(ref, StorePlane):
        raise CpvsError("labels can be written only into an OME-Zarr plate", ref)
    write_labels(ref.store / ref.group, labels)


def _existing_labels(image_group: Path) -> list[str]:
    found = group_attrs(image_group / "labels")
    return list(ome_attrs(*found).get("labels", [])) if found else []


def validate_store(path: str | Path) -> str:
    """Validate a plate store with ome-zarr-models (every group and array of plate, wells,
    fields and labels); returns the NGFF version, raises CpvsError naming the problem."""
    import warnings

    import zarr
    from ome_zarr_models.exceptions import ValidationWarning

    path = Path(path)
    found = group_attrs(path)
    if found is None:
        raise CpvsError("not a Zarr store", path)
    version = "0.5" if found[1] == 3 else "0.4"
    if version == "0.5":
        from ome_zarr_models.v05.hcs import HCS
    else:
        from ome_zarr_models.v04.hcs import HCS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ValidationWarning)
            HCS.from_zarr(zarr.open_group(str(path), mode="r"))  # plate, wells, their images and labels
    except Exception as e:  # pydantic's ValidationError, or a missing or malformed node
        raise CpvsError(f"not a valid OME-Zarr {version} HCS plate ({type(e).__name__}: {e})", path) from None
    # ome-zarr-models passes over listed wells and fields that do not exist; a finished plate has them all.
    for (well, site), group in field_groups(path).items():
        found = group_attrs(path / group)
        if found is None or "multiscales" not in ome_attrs(*found):
            raise CpvsError(f"field {well} site {site} is listed but missing or unfinished", path / group)
    return version
