"""Plates and fields: what ``discover_plates`` finds in a folder or LoadData CSV."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cpvs.plate.wells import well_rowcol

if TYPE_CHECKING:
    from cpvs.plate.channels import ChannelMap


@dataclass
class Field:
    """One imaged site of one well: a file per channel name."""

    plate: str
    well: str
    site: int
    files: dict[str, Path]

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
    layout: str  # phenix | cv8000 | loaddata
    channels: list[str]
    fields: list[Field]
    metadata: pd.DataFrame | None = None  # one row per field, same order, Metadata_ columns
    skipped: list[dict] = field(default_factory=list)  # fields dropped with --on-error skip, with reasons
    ignored_channels: list[str] = field(default_factory=list)  # channels on disk the map does not name
    platemap_path: Path | None = None
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
