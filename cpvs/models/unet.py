"""The virtual-staining U-Net (METHODS §2): brightfield planes in, Cell Painting channels out.

Each level: two 3x3 convolutions (stride 1), each followed by ReLU then batch norm;
2x2 max-pooling between levels; a symmetric up path with 2x2 stride-2 transposed
convolutions and skip concatenation; a final 1x1 convolution without activation.
Defaults (depth 6, widths 32..1024) give about 31 M parameters. Inputs must be a
multiple of 2**(depth-1) pixels on each side.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(cout),
            nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(inplace=True), nn.BatchNorm2d(cout),
        )


class UNet(nn.Module):
    """U-Net mapping (B, in_channels, H, W) -> (B, out_channels, H, W)."""

    def __init__(self, in_channels: int = 3, out_channels: int = 5, depth: int = 6, width: int = 32):
        super().__init__()
        if depth < 2:
            raise ValueError("depth must be at least 2")
        widths = [width * 2**i for i in range(depth)]
        self.depth = depth
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(ConvBlock(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c, w, 2, stride=2))
            self.merge.append(ConvBlock(2 * w, w))
            c = w
        self.head = nn.Conv2d(c, out_channels, 1)

    @property
    def multiple(self) -> int:
        """Input sides must be divisible by this."""
        return 2 ** (self.depth - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for up, merge in zip(self.up, self.merge):
            x = up(x)
            x = merge(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
