"""Find the fields of a plate: Phenix or CV8000 file names, or a LoadData CSV."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from cpvs.errors import CpvsError, warn
from cpvs.plate.channels import BRIGHTFIELD, FLUORESCENCE, ChannelMap, load_channel_map, order_channels
from cpvs.plate.layout import Field, Plate
from cpvs.plate.loaddata import is_load_data, read_load_data
from cpvs.plate.naming import SCHEMES, ParsedName, phenix_name
from cpvs.plate.omezarr import is_zarr_group, plate_stores, read_plate_store
from cpvs.plate.platemap import find_platemap, join_platemap

LOAD_DATA_NAMES = ("load_data.csv", "loaddata.csv", "load_data.tsv")
CHANNEL_MAP_NAME = "channel_map.csv"


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in {".tif", ".tiff"} and not p.name.startswith(".")]
    images = folder / "Images"  # Phenix/Harmony exports keep TIFFs here
    if images.is_dir():
        files += [p for p in images.iterdir() if p.suffix.lower() in {".tif", ".tiff"} and not p.name.startswith(".")]
    return sorted(files)


def _find_load_data(folder: Path) -> Path | None:
    for n in LOAD_DATA_NAMES:
        if (folder / n).exists():
            return folder / n
    cands = [p for p in sorted(folder.glob("*.csv")) if is_load_data(p)]
    return cands[0] if len(cands) == 1 else None


def _plate_name_from_folder(folder: Path) -> str:
    """The plate named by the folder's LoadData CSV (plates cpvs writes, e.g. predictions, keep
    their source plate's name), else the folder's name (its parent's for ``Images/``)."""
    ld = _find_load_data(folder)
    if ld is not None:
        import pandas as pd

        try:
            names = pd.read_csv(ld, usecols=["Metadata_Plate"], dtype=str)["Metadata_Plate"].unique()
        except (ValueError, KeyError):
            names = []
        if len(names) == 1:
            return str(names[0])
    return folder.parent.name if folder.name == "Images" else folder.name


def discover_plates(
    path: str | Path,
    channel_map: ChannelMap | str | None = None,
    channels: list[str] | None = None,
    plate_name: str | None = None,
    platemap: str | Path | None = None,
    on_error: str = "raise",
    level: int = 0,
) -> list[Plate]:
    """The plates at ``path``: a plate folder (Phenix/CV8000 names, or a LoadData CSV in it),
    a LoadData CSV file, an OME-Zarr HCS plate (:mod:`cpvs.plate.omezarr`; ``level``: its
    resolution level, 0 = full), or a folder holding OME-Zarr plates and no TIFFs.

    ``channels`` selects and orders channels by name (default: all the map names).
    A platemap is joined from ``platemap`` or, when absent, from ``platemap.csv`` in
    the plate folder (or the one an OME-Zarr plate carries). ``on_error='skip'`` drops
    fields with missing files or no platemap row and records them in ``Plate.skipped``
    instead of stopping.
    """
    path = Path(path)
    if not path.exists():
        raise CpvsError("plate folder or LoadData CSV not found", path, "check the path: a plate is a folder of TIFFs, an OME-Zarr plate or a LoadData CSV")
    if path.is_file():
        plates = read_load_data(path, channels)
        folder = path.parent
    elif is_zarr_group(path):
        plates = [read_plate_store(path, channel_map, channels, plate_name, on_error, level)]
        folder = None
    else:
        folder = path
        stores = plate_stores(path) if not _image_files(path) and _find_load_data(path) is None else []
        plates = ([read_plate_store(s, channel_map, channels, None, on_error, level) for s in stores] if stores
                  else _discover_folder(path, channel_map, channels, plate_name, on_error))
    if plate_name and len(plates) == 1:
        old = plates[0].name
        plates[0].name = plate_name
        for f in plates[0].fields:
            f.plate = plate_name
        del old
    pm = Path(platemap) if platemap else (find_platemap(folder) if folder else None)
    for p in plates:
        if pm is not None:
            join_platemap(p, pm, on_error)
        elif p.platemap is not None:  # an OME-Zarr plate's own platemap
            join_platemap(p, p.root / p.platemap[0], on_error, text=p.platemap[1])
        if not p.fields:
            raise CpvsError(f"no usable fields left in plate {p.name}", path, "see the skipped fields in the run folder")
    return plates


def discover_plate(path: str | Path, **kwargs) -> Plate:
    plates = discover_plates(path, **kwargs)
    if len(plates) != 1:
        raise CpvsError(f"expected one plate, found {len(plates)}: {', '.join(p.name for p in plates)}", path)
    return plates[0]


def _discover_folder(folder: Path, channel_map, channels, plate_name, on_error) -> list[Plate]:
    files = _image_files(folder)
    best: tuple[str, list[tuple[Path, ParsedName]]] = ("", [])
    for scheme, parse in SCHEMES.items():
        parsed = [(p, n) for p in files if (n := parse(p.name))]
        if len(parsed) > len(best[1]):
            best = (scheme, parsed)
    scheme, parsed = best
    if not parsed:
        ld = _find_load_data(folder)
        if ld is not None:
            return read_load_data(ld, channels)
        raise CpvsError(
            "no microscope images found: expected Phenix names (r01c01f01p01-ch1sk1fk1fl1.tiff), "
            "CV8000 names (PLATE_A01_T0001F001L01A01Z01C01.tif) or a LoadData CSV (load_data.csv)",
            folder,
            "point cpvs at the folder holding the TIFFs, or write a LoadData CSV for this layout",
        )
    timepoints = sorted({n.timepoint for _, n in parsed})
    if len(timepoints) > 1:
        raise CpvsError(
            f"found {len(timepoints)} timepoints ({timepoints[:5]}); time-lapse plates are not supported",
            folder,
            "move one timepoint's files to their own folder",
        )
    if channel_map is None and (folder / CHANNEL_MAP_NAME).exists():
        channel_map = folder / CHANNEL_MAP_NAME  # plates cpvs writes carry their own map
    cmap = channel_map if isinstance(channel_map, ChannelMap) else load_channel_map(channel_map)
    planes_of: dict[int, set[int]] = defaultdict(set)
    for _, n in parsed:
        planes_of[n.channel].add(n.plane)
    wanted = list(channels) if channels else order_channels(cmap.names)
    by_name = {name: key for key, name in cmap.entries}
    unknown = [c for c in wanted if c not in by_name]
    if unknown:
        raise CpvsError(
            f"channel(s) {', '.join(unknown)} are not in channel map {cmap.source} (it names {', '.join(cmap.names)})",
            folder,
            "pass --channels with names from the channel map, or a channel map that names them",
        )
    found = ", ".join(
        f"ch{c}" + (f" (planes {sorted(planes_of[c])})" if len(planes_of[c]) > 1 else "") for c in sorted(planes_of)
    )
    for name in wanted:
        ch, plane = by_name[name]
        if ch not in planes_of or (plane is not None and plane not in planes_of[ch]):
            raise CpvsError(
                f"channel map {cmap.source} names {name} = ch{ch}{'' if plane is None else f' plane {plane}'}, "
                f"but no file in the folder has it; found {found}",
                folder,
                "pass a channel map for this plate's numbering (--channel-map), or --channels to use a subset",
            )
        if plane is None and len(planes_of[ch]) > 1:
            raise CpvsError(
                f"ch{ch} ({name}) has planes {sorted(planes_of[ch])}; the channel map must say which",
                folder,
                f"name each plane in the channel map, e.g. '{ch}:1=BF_low,{ch}:2=BF,{ch}:3=BF_high'",
            )
    name_of = {}
    for _, n in parsed:
        nm = cmap.lookup(n.channel, n.plane)
        if nm is not None and nm in wanted:
            name_of[(n.channel, n.plane)] = nm
    ignored = sorted({f"ch{n.channel}p{n.plane}" for _, n in parsed if (n.channel, n.plane) not in name_of})
    if not channels:  # the user asked for the whole map: say what it leaves out or misnames
        unmapped = sorted({n.channel for _, n in parsed if cmap.lookup(n.channel, n.plane) is None})
        if unmapped:
            warn(f"the files have channel(s) {', '.join(f'ch{c}' for c in unmapped)} that channel map {cmap.source} does not name; "
                 "they are left out", folder, "name them in the channel map (e.g. '6=RNA'), or pass --channels to choose on purpose")
        # <stain>_std: the uncertainty maps predict-plate --samples K writes beside the stains
        odd = [n for n in cmap.names if n not in FLUORESCENCE + BRIGHTFIELD and n.removesuffix("_std") not in FLUORESCENCE
               and n in wanted]
        if odd:
            warn(f"channel name(s) {', '.join(odd)} of channel map {cmap.source} are not the names cpvs models use "
                 f"({', '.join(FLUORESCENCE + BRIGHTFIELD)}); models and evaluations will not find them under another name",
                 folder, "check the spelling in the channel map")
    plates: dict[str, dict[tuple[str, int], dict[str, Path]]] = defaultdict(lambda: defaultdict(dict))
    default_name = None if (scheme == "cv8000" or plate_name) else _plate_name_from_folder(folder)
    for p, n in parsed:
        nm = name_of.get((n.channel, n.plane))
        if nm is None:
            continue
        plate = n.plate if (scheme == "cv8000" and n.plate) else (plate_name or default_name)
        plates[plate][(n.well, n.site)][nm] = p
    out = []
    for pname, fields in plates.items():
        plate = Plate(pname, folder, scheme, list(wanted), [], ignored_channels=ignored, channel_map=cmap)
        for (well, site), chans in fields.items():
            missing = [c for c in wanted if c not in chans]
            if missing:
                ch, plane = by_name[missing[0]]
                expected = (
                    phenix_name(well, site, ch, plane or 1)
                    if scheme == "phenix"
                    else f"{pname}_{well}_T0001F{site:03d}L01A01Z{(plane or 1):02d}C{ch:02d}.tif"
                )
                msg = f"field {well} site {site} has no file for channel(s) {', '.join(missing)}: expected {folder / expected}"
                if on_error != "skip":
                    raise CpvsError(msg, folder / expected, "restore the file, or rerun with --on-error skip to leave the field out")
                plate.skipped.append({"field": f"{pname}/{well}/{site}", "reason": msg})
                continue
            plate.fields.append(Field(pname, well, site, {c: chans[c] for c in wanted}))
        plate.fields.sort(key=Field.sort_key)
        out.append(plate)
    return out
