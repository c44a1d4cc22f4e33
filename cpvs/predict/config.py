"""What ``cpvs predict-plate`` is asked to do: one config for every model family.

Options that only some strategies use default to None (not given); each strategy
resolves them against its own defaults (:class:`TileOptions`, :class:`DiffusionOptions`,
written once, here), and an option given for a strategy that does not use it is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path


@dataclass
class TileOptions:
    """Tiling of fields (the U-Net always; diffusion with ``field_strategy="tiles"``)."""

    tile: int = 256  # px at the model's input resolution
    stride: int = 128  # half a tile: interior pixels are covered by 4 tiles
    stitch: str = "median"


@dataclass
class DiffusionOptions:
    """Sampling of diffusion checkpoints (defaults; see :mod:`cpvs.predict.diffusion`)."""

    sampler: str = "ddpm"  # respaced ancestral: robust to an imperfect ε-model (see README)
    steps: int = 50
    eta: float = 0.0
    clip_denoised: bool = True  # clamp predicted clean images into the training targets' range
    guidance: float = 0.0
    classifier: Path | None = None
    label_col: str | None = None  # default: the column the model was trained with
    samples: int = 1
    estimate: str = "samples"  # what is written: the samples' mean, or the network's posterior-mean estimate ("mean")
    seed: int = 0
    field_strategy: str = "resize"
    residual_unet: Path | None = None  # residual diffusion: the U-Net, when it moved from the path the checkpoint records
    shrink: bool = True  # residual diffusion: weigh the prediction's residual by the factor fitted in training


BATCH_SIZE = {"staining": 16, "diffusion": 4}  # tiles per call; fields (x samples) per call


@dataclass
class PredictConfig:
    plate: Path
    out: Path
    checkpoint: Path
    model: str | None = None  # the family the checkpoint must be; None accepts any
    channel_map: str | None = None
    platemap: Path | None = None
    plate_name: str | None = None
    device: str = "auto"
    precision: str = "bf16"
    dtype: str = "uint16"
    format: str = "tiff"  # tiff | ome-zarr (OUT/PLATE.zarr)
    shard: tuple[int, int] = (1, 1)
    workers: int = 2
    illum_fields: int = 256
    on_error: str = "raise"
    overwrite: bool = False  # replace outputs made with other parameters
    batch_size: int | None = None  # default: BATCH_SIZE of the strategy
    # None = the default of TileOptions / DiffusionOptions; set = given by the user (checked against the strategy)
    tile: int | None = None
    stride: int | None = None
    stitch: str | None = None
    sampler: str | None = None
    steps: int | None = None
    eta: float | None = None
    clip_denoised: bool | None = None
    guidance: float | None = None
    classifier: Path | None = None
    label_col: str | None = None
    samples: int | None = None
    estimate: str | None = None
    seed: int | None = None
    field_strategy: str | None = None
    residual_unet: Path | None = None
    shrink: bool | None = None

    def given(self, options: type) -> list[str]:
        return [f.name for f in fields(options) if getattr(self, f.name) is not None]

    def resolved(self, options: type):
        """The options of one strategy: what was given, else the defaults."""
        return options(**{name: getattr(self, name) for name in self.given(options)})
