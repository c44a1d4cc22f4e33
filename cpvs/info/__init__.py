"""What cpvs sees in a path: a plate, a preprocessed store, a checkpoint or run folder, or a profile table.

``describe(path)`` recognizes the kind of ``path`` and returns an :class:`Info`: plain,
JSON-ready facts (what ``cpvs info --json`` prints) and warnings about things a new user
would otherwise find out later, such as channels on disk that the channel map leaves out.
Each kind has its own module; only what the kind needs is imported (no torch for a plate).
"""

from __future__ import annotations

import json
from pathlib import Path

from cpvs.errors import CpvsError
from cpvs.info.record import KINDS, Info

TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".parquet", ".pq")
WHAT_CPVS_READS = ("pass a plate (folder of TIFFs, LoadData CSV or OME-Zarr plate), a store of `cpvs preprocess`, "
                   "a run folder or .pt checkpoint of `cpvs train`, or a profile table (CSV/TSV/Parquet)")


def _is_cpvs_store(path: Path) -> bool:
    """A zarr group whose attributes carry the cpvs store format (read as JSON: no zarr import)."""
    from cpvs.preprocess.store import FORMAT

    meta = path / "zarr.json"
    if not meta.is_file():
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (ValueError, OSError):
        return False
    return isinstance(attrs, dict) and attrs.get("format") == FORMAT


def _is_run_folder(path: Path) -> bool:
    return any((path / "checkpoints" / n).is_file() for n in ("best.pt", "last.pt"))


def _looks_like_plate(path: Path) -> bool:
    """A folder worth handing to plate discovery: TIFFs (also under Images/), a LoadData CSV,
    an OME-Zarr group, or OME-Zarr plates inside."""
    from cpvs.plate.discover import LOAD_DATA_NAMES
    from cpvs.plate.loaddata import is_load_data
    from cpvs.plate.omezarr import is_zarr_group, plate_stores

    if is_zarr_group(path):
        return True
    for folder in (path, path / "Images"):
        if folder.is_dir() and any(p.suffix.lower() in {".tif", ".tiff"} for p in folder.iterdir()):
            return True
    if any((path / n).is_file() for n in LOAD_DATA_NAMES) or any(is_load_data(p) for p in path.glob("*.csv")):
        return True
    return bool(plate_stores(path))


def _is_torch_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def _recognized_children(folder: Path, limit: int = 12) -> list[str]:
    """``name (kind)`` for what cpvs reads directly inside ``folder`` (a simulate output, a project folder)."""
    found = []
    for child in sorted(folder.iterdir())[:200]:
        if child.name.startswith("."):
            continue
        try:
            kind = kind_of(child, look_inside=False)
        except (CpvsError, OSError):
            continue
        found.append(f"{child.name} ({'run folder' if kind == 'checkpoint' and child.is_dir() else kind})")
        if len(found) == limit:
            found.append("...")
            break
    return found


def kind_of(path: str | Path, look_inside: bool = True) -> str:
    """``plate``, ``store``, ``checkpoint`` or ``table``; one error naming what cpvs reads otherwise
    (and, with ``look_inside``, what it reads inside an unrecognized folder)."""
    path = Path(path)
    if not path.exists():
        raise CpvsError("nothing at this path", path, f"check the path; {WHAT_CPVS_READS}")
    if path.is_dir():
        if _is_cpvs_store(path):
            return "store"
        if _is_run_folder(path):
            return "checkpoint"
        if _looks_like_plate(path):
            return "plate"
        inside = _recognized_children(path) if look_inside else []
        raise CpvsError("cpvs recognizes nothing in this folder itself: no TIFFs, LoadData CSV, OME-Zarr plate, cpvs store "
                        "(zarr.json with the cpvs format) or run folder (checkpoints/best.pt or last.pt)"
                        + (f"; inside it: {', '.join(inside)}" if inside else ""), path,
                        "run `cpvs info` on one of those" if inside else WHAT_CPVS_READS)
    name = path.name.lower()
    if name.endswith(".pt") or _is_torch_file(path):
        return "checkpoint"
    if name.endswith(TABLE_SUFFIXES):
        from cpvs.plate.loaddata import is_load_data

        return "plate" if name.endswith(".csv") and is_load_data(path) else "table"
    raise CpvsError(f"cpvs does not read {path.suffix or 'extension-less'} files", path, WHAT_CPVS_READS)


def describe(path: str | Path, channel_map: str | None = None, platemap: str | Path | None = None,
             plate_name: str | None = None) -> Info:
    """What cpvs sees in ``path``. ``channel_map``, ``platemap`` and ``plate_name`` are read
    as every verb reading plates reads them, and are refused for other kinds."""
    path = Path(path)
    kind = kind_of(path)
    if kind != "plate":
        given = [o for o, v in (("--channel-map", channel_map), ("--platemap", platemap), ("--plate-name", plate_name)) if v]
        if given:
            raise CpvsError(f"{', '.join(given)} applies to plates, and this is a {kind}", path, f"drop {', '.join(given)}")
    if kind == "plate":
        from cpvs.info.plate import describe_plates

        return describe_plates(path, channel_map, platemap, plate_name)
    if kind == "store":
        from cpvs.info.store import describe_store

        return describe_store(path)
    if kind == "checkpoint":
        from cpvs.info.checkpoint import describe_checkpoint

        return describe_checkpoint(path)
    from cpvs.info.table import describe_table

    return describe_table(path)


__all__ = ["Info", "KINDS", "describe", "kind_of"]
