"""Model families by name; a checkpoint names its family and hyperparameters, and
``build_model`` rebuilds the network from them (no code is ever unpickled)."""

from __future__ import annotations

from torch import nn

from cpvs.errors import CpvsError


def build_model(family: str, hparams: dict) -> nn.Module:
    if family in ("unet", "cwgan"):
        from cpvs.models.unet import UNet

        return UNet(hparams["in_channels"], hparams["out_channels"], hparams.get("depth", 6), hparams.get("width", 32))
    if family == "linear":
        from cpvs.models.linear import PixelLinear

        return PixelLinear(hparams["in_channels"], hparams["out_channels"])
    raise CpvsError(f"unknown model family {family!r}")


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
