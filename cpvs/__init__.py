"""cpvs: plate-scale virtual staining and image-based profiling of Cell Painting microscopy."""

__version__ = "0.1.0"
