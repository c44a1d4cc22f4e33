"""OME-Zarr HCS plates (NGFF 0.4 and 0.5) read as cpvs plates.

A plate store holds plate -> row -> well -> field groups (NGFF "plate" and "well" metadata);
each field is an image group whose multiscale arrays hold the channels on their ``c`` axis.
cpvs reads the groups' metadata as JSON (``zarr.json`` for Zarr v3 / NGFF 0.5, ``.zattrs`` for
Zarr v2 / NGFF 0.4) and points every channel of every field at a :class:`StorePlane`, which
``read_image`` reads like a TIFF path; only pixels go through ``zarr``.

Channel names come from the ``omero`` channel labels, spelled the cpvs way (``Hoechst`` ->
``DNA``); a channel map renames them, its numbers being 1-based positions on the ``c`` axis
(``1:2`` = channel 1, z-plane 2), as for the channel numbers in microscope file names, so
z-planes of one channel become ``BF_low``/``BF``/``BF_high`` when the map says so.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from cpvs.errors import CpvsError
from cpvs.plate.channels import ChannelMap, canonical_channel, load_channel_map, order_channels
from cpvs.plate.layout import Field, Plate, StorePlane
from cpvs.plate.wells import row_number, well_name

NGFF_VERSIONS = ("0.4", "0.5")
CPVS_ATTRS = "cpvs"  # plate attributes cpvs adds: platemap text, the source's channel numbering
_SKIP_HINT = "restore it, or rerun with --on-error skip to leave the field out"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CpvsError(f"cannot read Zarr metadata ({type(e).__name__}: {e})", path, "re-copy the store") from None
    if not isinstance(data, dict):
        raise CpvsError("Zarr metadata is not a JSON object", path, "re-copy the store")
    return data


def group_attrs(path: Path) -> tuple[dict, int] | None:
    """``(attributes, zarr_format)`` of the Zarr group at ``path``; None when there is none."""
    if (path / "zarr.json").is_file():
        meta = _json(path / "zarr.json")
        if meta.get("node_type") != "group":
            return None
        return meta.get("attributes") or {}, 3
    if (path / ".zgroup").is_file():
        return (_json(path / ".zattrs") if (path / ".zattrs").is_file() else {}), 2
    return None


def ome_attrs(attrs: dict, zarr_format: int) -> dict:
    """The NGFF metadata of a group: under ``ome`` in 0.5 (Zarr v3), top level in 0.4 (Zarr v2)."""
    return (attrs.get("ome") or {}) if zarr_format == 3 else attrs


def is_zarr_group(path: Path) -> bool:
    return path.is_dir() and ((path / "zarr.json").is_file() or (path / ".zgroup").is_file())


def is_plate_store(path: Path) -> bool:
    """True for the root of an OME-Zarr HCS plate."""
    try:
        found = group_attrs(Path(path)) if Path(path).is_dir() else None
    except CpvsError:
        return False
    return found is not None and "plate" in ome_attrs(*found)


def plate_stores(folder: Path) -> list[Path]:
    """The OME-Zarr plates directly inside ``folder`` (``predict-plate --format ome-zarr`` output)."""
    return sorted(p for p in folder.iterdir() if p.suffix == ".zarr" and is_plate_store(p))


def store_plate_name(store: Path, plate_meta: dict) -> str:
    name = plate_meta.get("name")
    return str(name) if name else store.name.removesuffix(".zarr").removesuffix(".ome")


def _array_shape(path: Path) -> tuple[int, ...] | None:
    for meta in ("zarr.json", ".zarray"):
        if (path / meta).is_file():
            shape = _json(path / meta).get("shape")
            return tuple(int(s) for s in shape) if isinstance(shape, list) else None
    return None


def _axes(ms: dict, ndim: int, where: Path) -> list[tuple[str, str]]:
    """(name, type) of each axis; NGFF 0.3 lists names only, older stores none (t, c, z, y, x)."""
    axes = ms.get("axes")
    if axes is None:
        names = "tczyx"[-ndim:]
        return [(n, "channel" if n == "c" else "time" if n == "t" else "space") for n in names]
    out = [(a, "channel" if a == "c" else "time" if a == "t" else "space") if isinstance(a, str)
           else (str(a.get("name", "")), str(a.get("type", ""))) for a in axes]
    if len(out) != ndim:
        raise CpvsError(f"multiscales lists {len(out)} axes but the array has {ndim} dimensions", where, "re-export the field")
    return out


def well_of(plate_meta: dict, well: dict, store: Path) -> str:
    """``A01``-style name of a well of the plate metadata (row and column names, else indices)."""
    try:
        row = plate_meta["rows"][well["rowIndex"]]["name"]
        col = plate_meta["columns"][well["columnIndex"]]["name"]
    except (KeyError, IndexError, TypeError):
        row, _, col = str(well.get("path", "")).partition("/")
    try:
        r = int(row) if str(row).isdigit() else row_number(str(row))
        return well_name(r, int(col))
    except (ValueError, TypeError):
        raise CpvsError(f"well {well.get('path')!r}: row {row!r} / column {col!r} are not a plate position", store) from None


def site_paths(images: list[dict]) -> list[tuple[int, str]]:
    """(site, field group path) of a well's images: numeric paths ``0, 1, …`` are sites 1, 2, …
    (the convention of cpvs and of ome-zarr-py); other names number the fields in order."""
    paths = [str(im.get("path", "")) for im in images]
    numeric = all(p.isdigit() for p in paths)
    return [(int(p) + 1 if numeric else i + 1, p) for i, p in enumerate(paths)]


class _Image:
    """What one field's image group says: its array at the chosen level, axes, channel labels."""

    def __init__(self, store: Path, group: str, level: int):
        where = store / group
        found = group_attrs(where)
        ome = ome_attrs(*found) if found else {}
        mss = ome.get("multiscales")
        if not mss:
            raise CpvsError("field image group is missing or has no multiscales metadata (not written, or not finished)",
                            where, _SKIP_HINT)
        datasets = mss[0].get("datasets") or []
        if level >= len(datasets):
            raise CpvsError(f"no resolution level {level}: the image has {len(datasets)}", where)
        self.group, self.dataset = group, str(datasets[level]["path"])
        self.shape = _array_shape(where / self.dataset)
        if self.shape is None:
            raise CpvsError("the array of this field is missing", where / self.dataset, _SKIP_HINT)
        self.axes = _axes(mss[0], len(self.shape), where)
        channels = ((ome.get("omero") or {}).get("channels")) or []
        self.labels = [str(c.get("label", "")) for c in channels] or None
        self.lead = self.axes[:-2]  # the axes indexed to select a plane (t, c, z, ...)
        if len(self.shape) < 2 or [t for _, t in self.axes[-2:]] != ["space", "space"]:
            raise CpvsError(f"the last two axes must be y and x, found {[n for n, _ in self.axes]}", where)

    def size(self, kind: str) -> int:
        """Size of the channel axis (``c``) or of the third space axis (``z``); 1 when absent."""
        for (name, typ), n in zip(self.lead, self.shape):
            if (kind == "c" and (typ == "channel" or name == "c")) or (kind == "z" and typ == "space"):
                return n
        return 1

    def plane(self, store: Path, c: int, z: int) -> StorePlane:
        index = []
        for (name, typ), n in zip(self.lead, self.shape):
            if typ == "channel" or name == "c":
                index.append(c)
            elif typ == "space":
                index.append(z)
            else:
                if n != 1:
                    raise CpvsError(f"axis {name!r} has {n} entries; time-lapse and other extra axes are not supported",
                                    store / self.group / self.dataset, "export one timepoint per plate")
                index.append(0)
        return StorePlane(store, self.group, self.dataset, tuple(index), "".join(n[:1] for n, _ in self.lead))


def _channel_names(img: _Image, cmap: ChannelMap | None, store: Path) -> dict[str, tuple[int, int]]:
    """Channel name -> (c, z) index, from the channel map or the omero labels."""
    n_c, n_z = img.size("c"), img.size("z")
    where = store / img.group
    if cmap is not None:
        found: dict[str, tuple[int, int]] = {}
        for c in range(n_c):
            for z in range(n_z):
                name = cmap.lookup(c + 1, z + 1)
                if name is not None and n_z > 1 and (c + 1, z + 1) not in dict(cmap.entries):
                    raise CpvsError(f"channel {c + 1} has {n_z} z-planes; the channel map {cmap.source} must say which",
                                    where, f"name each plane, e.g. '{c + 1}:1=BF_low,{c + 1}:2=BF,{c + 1}:3=BF_high'")
                if name is not None:
                    found[name] = (c, z)
        return found
    if not img.labels or len(img.labels) != n_c or not all(img.labels):
        raise CpvsError(f"the image has {n_c} channels but no omero channel labels naming them", where,
                        "pass --channel-map with 1-based channel positions, e.g. '1=DNA,2=ER'")
    if n_z > 1:
        raise CpvsError(f"the image has {n_z} z-planes; a channel map must name the ones to use", where,
                        "pass --channel-map naming channel:plane, e.g. '1:1=BF_low,1:2=BF,1:3=BF_high'")
    try:
        names = [canonical_channel(label) for label in img.labels]
    except CpvsError as e:
        raise CpvsError(f"{e.message} (an omero channel label)", where, "pass --channel-map to name the channels, e.g. '1=DNA,2=ER'") from None
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CpvsError(f"omero labels name several channels {', '.join(dup)}", where, "pass --channel-map to name them")
    return {n: (c, 0) for c, n in enumerate(names)}


def read_plate_store(
    path: str | Path,
    channel_map: ChannelMap | str | None = None,
    channels: list[str] | None = None,
    plate_name: str | None = None,
    on_error: str = "raise",
    level: int = 0,
) -> Plate:
    """The plate of an OME-Zarr HCS store, its fields pointing at planes of resolution ``level``
    (0: full resolution). ``channels`` selects and orders channels by name (default: all)."""
    store = Path(path)
    found = group_attrs(store)
    if found is None:
        raise CpvsError("not a Zarr store (no zarr.json or .zgroup)", store, "pass an OME-Zarr HCS plate, a plate folder or a LoadData CSV")
    attrs, fmt = found
    ome = ome_attrs(attrs, fmt)
    meta_file = store / ("zarr.json" if fmt == 3 else ".zattrs")
    if "plate" not in ome:
        what = ("an OME-Zarr image" if "multiscales" in ome else "an OME-Zarr well" if "well" in ome
                else "a cpvs preprocessing store" if attrs.get("format", "").startswith("cpvs-store") else "no OME-Zarr metadata")
        raise CpvsError(f"a Zarr store but not an OME-Zarr HCS plate: no 'plate' metadata in {meta_file.name} ({what})", store,
                        "pass the plate's root group (the one whose metadata has 'plate'), or convert the images with `cpvs convert`")
    plate_meta = ome["plate"]
    version = str(ome.get("version") or plate_meta.get("version") or "")
    if version not in NGFF_VERSIONS:
        raise CpvsError(f"OME-Zarr version {version or '(none)'} is not supported (cpvs reads {' and '.join(NGFF_VERSIONS)})", meta_file,
                        "convert the plate with a current OME-Zarr writer")
    if not isinstance(plate_meta.get("wells"), list) or not plate_meta["wells"]:
        raise CpvsError("the plate metadata lists no wells", meta_file)
    name = plate_name or store_plate_name(store, plate_meta)
    cmap = channel_map if isinstance(channel_map, ChannelMap) or channel_map is None else load_channel_map(channel_map)
    plate = Plate(name, store, "ome-zarr", [], [], channel_map=cmap)
    skip = on_error == "skip"

    def fail(msg: str, where: Path, key: str, hint: str = _SKIP_HINT) -> None:
        if not skip:
            raise CpvsError(msg, where, hint)
        plate.skipped.append({"field": key, "reason": f"{where}: {msg}"})

    candidates: list[tuple[str, int, str]] = []  # well, site, image group
    for w in plate_meta["wells"]:
        wpath = str(w.get("path", ""))
        well = well_of(plate_meta, w, store)
        wfound = group_attrs(store / wpath)
        images = (ome_attrs(*wfound).get("well") or {}).get("images") if wfound else None
        if wfound is None or not images:
            what = "its group is missing" if wfound is None else "it has no 'well' metadata listing its fields"
            fail(f"well {well} is listed in the plate metadata but {what}", store / wpath, f"{name}/{well}",
                 "restore the well, or rerun with --on-error skip to leave it out")
            continue
        candidates += [(well, site, f"{wpath}/{p}") for site, p in site_paths(images)]
    ref: _Image | None = None
    wanted: list[str] = []
    index: dict[str, tuple[int, int]] = {}
    for well, site, group in sorted(candidates, key=lambda t: (t[0], t[1])):
        key = f"{name}/{well}/{site}"
        try:
            img = _Image(store, group, level)
        except CpvsError as e:
            fail(e.message, Path(e.path or store / group), key, e.hint or _SKIP_HINT)
            continue
        if ref is None:
            ref, index = img, _channel_names(img, cmap, store)
            wanted = list(channels) if channels else order_channels(list(index))
            unknown = [c for c in wanted if c not in index]
            if unknown:
                source = f"channel map {cmap.source}" if cmap else "the omero labels"
                raise CpvsError(f"channel(s) {', '.join(unknown)} not in the plate: {source} name(s) {', '.join(index) or 'none'}",
                                store / group, "pass --channels with names from that list, or a channel map (--channel-map) naming them")
            plate.ignored_channels = [c for c in index if c not in wanted]
        problem = None
        if img.shape[:-2] != ref.shape[:-2] or [n for n, _ in img.axes] != [n for n, _ in ref.axes]:
            problem = f"array shape {img.shape} (axes {''.join(n for n, _ in img.axes)}) differs from the plate's {ref.shape}"
        elif img.shape[-2:] != ref.shape[-2:]:
            problem = (f"image is {img.shape[-2]}x{img.shape[-1]} but the plate's fields are {ref.shape[-2]}x{ref.shape[-1]}")
        elif cmap is None and img.labels != ref.labels:
            problem = f"channel labels {img.labels} differ from the plate's {ref.labels}"
        if problem:
            fail(problem, store / group / img.dataset, key, "remove or re-export the odd field, or rerun with --on-error skip")
            continue
        plate.fields.append(Field(name, well, site, {c: img.plane(store, *index[c]) for c in wanted}))
    if ref is None:
        raise CpvsError("no readable field in the plate", store, "see the messages above, or rerun without --on-error skip")
    plate.channels = wanted
    plate.fields.sort(key=Field.sort_key)
    cp = attrs.get(CPVS_ATTRS) or {}
    if isinstance(cp.get("platemap"), dict):
        plate.platemap = (str(cp["platemap"].get("name", "platemap.csv")), str(cp["platemap"].get("text", "")))
    return plate


def cpvs_attrs(store: Path) -> dict:
    """The attributes cpvs keeps on a plate it wrote (empty for other plates)."""
    found = group_attrs(Path(store))
    return (found[0].get(CPVS_ATTRS) or {}) if found else {}


@lru_cache(maxsize=64)
def _open(array: Path, stamp: int):
    """An open array; ``stamp`` (its metadata's mtime) makes a rewritten array open anew."""
    import zarr

    return zarr.open_array(str(array), mode="r")


def read_plane(ref: StorePlane) -> np.ndarray:
    """The 2-D image ``ref`` names, in its stored dtype."""
    if not ref.exists():
        raise CpvsError("image array is missing from the store", ref, "check the plate store, or rerun with --on-error skip")
    try:
        arr = _open(ref.array, ref.metadata_file().stat().st_mtime_ns)
        plane = np.asarray(arr[ref.index + (slice(None), slice(None))])
    except (ValueError, KeyError, IndexError, OSError, RuntimeError) as e:
        _open.cache_clear()
        raise CpvsError(f"cannot read this plane ({type(e).__name__}: {e})", ref, "re-copy the store, or rerun with --on-error skip") from None
    if plane.ndim != 2:
        raise CpvsError(f"expected a 2-D plane, found shape {plane.shape}", ref)
    return plane


@lru_cache(maxsize=8)
def field_groups(store: Path) -> dict[tuple[str, int], str]:
    """(well, site) -> image group path of every field a plate store lists."""
    attrs, fmt = group_attrs(store) or ({}, 3)
    plate_meta = ome_attrs(attrs, fmt).get("plate") or {}
    out = {}
    for w in plate_meta.get("wells", []):
        found = group_attrs(store / w["path"])
        images = (ome_attrs(*found).get("well") or {}).get("images", []) if found else []
        out.update({(well_of(plate_meta, w, store), site): f"{w['path']}/{p}" for site, p in site_paths(images)})
    return out


def label_plane(store: Path, well: str, site: int, name: str) -> StorePlane:
    """The NGFF label image ``name`` (e.g. ``nuclei``) of a field of a plate store, full resolution."""
    group = field_groups(Path(store)).get((well, site))
    where = Path(store) / (group or f"{well} site {site}") / "labels" / name
    found = group_attrs(where) if group else None
    mss = ome_attrs(*found).get("multiscales") if found else None
    if not mss:
        raise CpvsError(f"no '{name}' labels for field {well} site {site}", where,
                        "profile the plate with --masks-format ome-zarr first, or point --masks-from at TIFF masks")
    ds = str(mss[0]["datasets"][0]["path"])
    shape = _array_shape(where / ds) or (1, 1)
    return StorePlane(Path(store), f"{group}/labels/{name}", ds, (0,) * (len(shape) - 2), "cz"[: len(shape) - 2])
