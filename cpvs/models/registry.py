"""One registry from a checkpoint to a ready network, for every model family.

A checkpoint names its family and hyperparameters; :func:`build_model` rebuilds the
architecture from them (no code is ever unpickled) and :func:`load_model` adds the
weights. Every consumer (predict-plate, embed, evaluate --fid, cwgan --init, classifier
guidance) dispatches on the family the checkpoint states; a ``--model`` given by the
user is only a check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cpvs.checkpoints import load_checkpoint
from cpvs.errors import CpvsError

# What each family is for: the consumer that can use it.
ROLES = {
    "unet": "staining", "cwgan": "staining", "linear": "staining",
    "ddpm": "diffusion", "classifier": "guidance",
    "dino": "embedding", "ws-dino": "embedding",
}
FAMILIES = tuple(ROLES)


def build_model(family: str, hparams: dict, classes: list | None = None) -> nn.Module:
    """The untrained network of ``family`` with the checkpoint's hyperparameters."""
    if family in ("unet", "cwgan"):
        from cpvs.models.unet import UNet

        return UNet(hparams["in_channels"], hparams["out_channels"], hparams.get("depth", 6), hparams.get("width", 32))
    if family == "linear":
        from cpvs.models.linear import PixelLinear

        return PixelLinear(hparams["in_channels"], hparams["out_channels"])
    if family == "ddpm":
        from cpvs.models.diffusion.unet import DiffusionUNet, DiffusionUNetConfig

        return DiffusionUNet(DiffusionUNetConfig.from_dict(hparams["net"]))
    if family == "classifier":
        from cpvs.models.diffusion.classifier import NoisyClassifier
        from cpvs.models.diffusion.unet import DiffusionUNetConfig

        return NoisyClassifier(DiffusionUNetConfig.from_dict(hparams["net"]), len(classes or []))
    if family in ("dino", "ws-dino"):
        from cpvs.models.vit import ChannelModels

        return ChannelModels(hparams["channels"], hparams["arch"], hparams["out_dim"], hparams["hidden"],
                             hparams["bottleneck"], hparams.get("img_size", 224))
    raise CpvsError(f"unknown model family {family!r}; cpvs knows {', '.join(FAMILIES)}")


@dataclass
class LoadedModel:
    """A network with its weights, in eval mode on ``device``, and the checkpoint it came from."""

    family: str
    net: nn.Module
    checkpoint: dict

    @property
    def role(self) -> str:
        return ROLES[self.family]

    @property
    def path(self) -> str:
        return self.checkpoint["path"]

    def schedule(self):
        """The noise schedule a diffusion model was trained with."""
        from cpvs.models.diffusion.schedule import NoiseSchedule

        return NoiseSchedule.from_spec(self.checkpoint["hparams"]["schedule"])


def load_model(checkpoint: str | Path | dict, device: str | torch.device = "cpu", roles: tuple[str, ...] | None = None,
               expect: str | None = None, option: str = "--checkpoint") -> LoadedModel:
    """Load any cpvs checkpoint (file, run folder or an already loaded dict).

    ``roles``: what the caller can use (e.g. ``("staining", "diffusion")``); ``expect``: the
    family the user said it is (``--model``), checked against what the checkpoint states.
    """
    ck = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
    family = ck.get("family")
    if family not in ROLES:
        raise CpvsError(f"the checkpoint's model family {family!r} is unknown to this cpvs", ck.get("path"),
                        "update cpvs, or pass a checkpoint of " + ", ".join(FAMILIES))
    if expect is not None and expect != family:
        raise CpvsError(f"--model {expect} but the checkpoint is a {family} model", ck["path"],
                        f"drop --model (the checkpoint says what it is), or pass a {expect} checkpoint")
    if roles is not None and ROLES[family] not in roles:
        usable = [f for f, r in ROLES.items() if r in roles]
        raise CpvsError(f"{option} is a {family} checkpoint, which cannot be used here", ck["path"],
                        f"pass a checkpoint of {', '.join(usable)}")
    net = build_model(family, ck["hparams"], ck.get("classes"))
    net.load_state_dict(ck["state_dict"])
    return LoadedModel(family, net.eval().to(device), ck)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
