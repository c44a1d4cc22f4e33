"""Plate I/O: field discovery, channel maps, platemaps, TIFF and LoadData read/write."""

from cpvs.plate.channels import BRIGHTFIELD, FLUORESCENCE, ChannelMap, canonical_channel, is_brightfield, load_channel_map
from cpvs.plate.discover import discover_plate, discover_plates
from cpvs.plate.layout import Field, Plate
from cpvs.plate.loaddata import read_load_data, write_load_data
from cpvs.plate.platemap import join_platemap, read_platemap
from cpvs.plate.shards import Shard
from cpvs.plate.stack import read_field_stack
from cpvs.plate.tiff import read_image, write_image

__all__ = [
    "BRIGHTFIELD", "FLUORESCENCE", "ChannelMap", "Field", "Plate", "canonical_channel", "discover_plate",
    "discover_plates", "is_brightfield", "join_platemap", "load_channel_map", "read_image", "read_load_data",
    "read_field_stack", "read_platemap", "Shard", "write_image", "write_load_data",
]
