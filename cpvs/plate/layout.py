"""Plates and fields: what ``discover_plates`` finds in a folder or LoadData CSV."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cpvs.plate.wells import well_rowcol

if TYPE_CHECKING:
    from cpvs.plate.channels import ChannelMap


@dataclass(frozen=True, order=True)
class StorePlane:
    """One 2-D image inside an OME-Zarr store: plane ``index`` (the indices of the axes before
    y and x, e.g. the channel) of array ``group/dataset``. It stands where a TIFF path stands in
    ``Field.files``; ``read_image`` reads both, so every reader of plates works unchanged."""

    store: Path  # the store's root folder (plate.zarr)
    group: str  # the image group of the field, e.g. "C/3/2"
    dataset: str  # the multiscale level's array inside the group, e.g. "0"
    index: tuple[int, ...]
    axes: str = "c"  # names of the indexed axes, for messages

    @property
    def array(self) -> Path:
        return self.store / self.group / self.dataset

    @property
    def name(self) -> str:
        return f"{self.group}/{self.dataset}[{self._where()}]"

    def _where(self) -> str:
        return ",".join(f"{a}={i}" for a, i in zip(self.axes, self.index))

    def __str__(self) -> str:
        return f"{self.array}[{self._where()}]"

    def metadata_file(self) -> Path:
        """The array's metadata: ``zarr.json`` (Zarr v3, NGFF 0.5) or ``.zarray`` (Zarr v2, NGFF 0.4)."""
        v3 = self.array / "zarr.json"
        return v3 if v3.exists() else self.array / ".zarray"

    def exists(self) -> bool:
        return self.metadata_file().exists()

    def stat(self):
        return self.metadata_file().stat()


ImageRef = Path | StorePlane  # a TIFF file, or a plane inside an OME-Zarr store


@dataclass
class Field:
    """One imaged site of one well: an image (TIFF path or :class:`StorePlane`) per channel name."""

    plate: str
    well: str
    site: int
    files: dict[str, ImageRef]

    @property
    def key(self) -> str:
        """Stable text key ``plate/well/site``, used for resume markers and shards."""
        return f"{self.plate}/{self.well}/{self.site}"

    def sort_key(self) -> tuple:
        return (self.plate, *well_rowcol(self.well), self.site)


@dataclass
class Plate:
    """A plate's fields, all with the same channels, and their metadata."""

    name: str
    root: Path
    layout: str  # phenix | cv8000 | loaddata | ome-zarr | predicted
    channels: list[str]
    fields: list[Field]
    metadata: pd.DataFrame | None = None  # one row per field, same order, Metadata_ columns
    skipped: list[dict] = field(default_factory=list)  # fields dropped with --on-error skip, with reasons
    ignored_channels: list[str] = field(default_factory=list)  # channels on disk the map does not name
    platemap_path: Path | None = None
    platemap: tuple[str, str] | None = None  # (file name, text) of the joined platemap, for plates written from this one
    channel_map: "ChannelMap | None" = None  # the map that named the files' channels (Phenix/CV8000)

    def table(self) -> pd.DataFrame:
        """One row per field: Metadata_Plate/Well/Site plus the joined platemap columns."""
        base = pd.DataFrame(
            {
                "Metadata_Plate": [f.plate for f in self.fields],
                "Metadata_Well": [f.well for f in self.fields],
                "Metadata_Site": [f.site for f in self.fields],
            }
        )
        if self.metadata is None:
            return base
        extra = self.metadata.drop(columns=[c for c in base.columns if c in self.metadata.columns]).reset_index(drop=True)
        return pd.concat([base, extra], axis=1)

    def drop_fields(self, keep: list[bool]) -> None:
        self.fields = [f for f, k in zip(self.fields, keep) if k]
        if self.metadata is not None:
            self.metadata = self.metadata[keep].reset_index(drop=True)
