"""The per-pixel linear baseline: each output channel an affine function of the input planes.

A 1x1 convolution fitted by least squares; what a U-Net must beat to show it uses
spatial context.
"""

from __future__ import annotations

import torch
from torch import nn


class PixelLinear(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    multiple = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)
