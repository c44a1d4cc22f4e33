"""File-name schemes of high-content microscopes.

* Phenix / Opera (JUMP): ``r03c03f03p01-ch1sk1fk1fl1.tiff`` = row 3, column 3,
  field 3, plane 1, channel 1, timepoint (sk) 1.
* Yokogawa CV8000 / CV7000: ``PLATE_C03_T0001F003L01A01Z01C01.tif`` = well C03,
  timepoint 1, field 3, timeline 1, action 1, plane 1, channel 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from cpvs.plate.channels import ChannelMap, channel_map_from_dict
from cpvs.plate.layout import Field, Plate
from cpvs.plate.omezarr import cpvs_attrs
from cpvs.plate.wells import normalize_well, well_name

PHENIX = re.compile(r"^r(\d{2})c(\d{2})f(\d{2,3})p(\d{2})-ch(\d+)sk(\d+)fk(\d+)fl(\d+)\.tiff?$", re.IGNORECASE)
CV8000 = re.compile(
    r"^(?P<plate>.+?)_(?P<well>[A-Za-z]{1,2}\d{2})_T(?P<t>\d{4})F(?P<f>\d{3})L(?P<l>\d{2})A(?P<a>\d{2})Z(?P<z>\d{2})C(?P<c>\d{2})\.tiff?$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedName:
    well: str
    site: int
    plane: int
    channel: int
    timepoint: int
    plate: str | None = None  # CV8000 names carry the plate; Phenix names do not


def parse_phenix(name: str) -> ParsedName | None:
    m = PHENIX.match(name)
    if not m:
        return None
    r, c, f, p, ch, sk = (int(m.group(i)) for i in range(1, 7))
    return ParsedName(well_name(r, c), f, p, ch, sk)


def parse_cv8000(name: str) -> ParsedName | None:
    m = CV8000.match(name)
    if not m:
        return None
    return ParsedName(
        normalize_well(m.group("well")), int(m.group("f")), int(m.group("z")), int(m.group("c")), int(m.group("t")), m.group("plate")
    )


def phenix_name(well: str, site: int, channel: int, plane: int = 1) -> str:
    from cpvs.plate.wells import well_rowcol

    r, c = well_rowcol(well)
    return f"r{r:02d}c{c:02d}f{site:02d}p{plane:02d}-ch{channel}sk1fk1fl1.tiff"


SCHEMES = {"phenix": parse_phenix, "cv8000": parse_cv8000}

NameOf = Callable[[Field, str], str]


def tiff_names(layout: str, channel_map: ChannelMap | None, channels: list[str]) -> tuple[NameOf, ChannelMap | None]:
    """File names of a plate cpvs writes as TIFFs: Phenix names with the source's channel (and
    plane) numbers when the source was a Phenix plate with a channel map (new numbers after the
    map's for channels it does not name), else ``PLATE_WELL_sSITE_CH.tiff``; and the channel map
    that reads the Phenix names back (None for the others, which a LoadData CSV describes)."""
    if layout == "phenix" and channel_map is not None:
        numbers = {name: key for key, name in channel_map.entries}
        nxt = max([ch for (ch, _), _ in channel_map.entries] + [0]) + 1
        for c in channels:
            if c not in numbers:
                numbers[c], nxt = (nxt, None), nxt + 1
        cmap = ChannelMap(tuple((numbers[c], c) for c in channels), "written plate")
        return (lambda f, c: phenix_name(f.well, f.site, numbers[c][0], numbers[c][1] or 1)), cmap
    return (lambda f, c: f"{f.plate}_{f.well}_s{f.site}_{c}.tiff"), None


def source_numbering(plate: Plate) -> tuple[str, ChannelMap] | None:
    """The microscope numbering of a plate's channels: its own channel map (Phenix), or the one a
    plate store written by cpvs recorded."""
    if plate.layout == "phenix" and plate.channel_map is not None:
        return plate.layout, plate.channel_map
    src = cpvs_attrs(plate.root).get("source") if plate.layout == "ome-zarr" else None
    if isinstance(src, dict) and src.get("channel_map"):
        return str(src.get("layout")), channel_map_from_dict(src["channel_map"], f"{plate.root} (recorded numbering)")
    return None


def plate_tiff_names(plate: Plate, channels: list[str]) -> tuple[NameOf, ChannelMap | None]:
    """:func:`tiff_names` of ``plate`` written as TIFFs (a conversion, or a prediction of it): the
    Phenix numbering it has or its store recorded, so a Phenix plate and its OME-Zarr copy give
    the same files."""
    layout, cmap = source_numbering(plate) or ("", None)
    return tiff_names(layout, cmap, channels)
