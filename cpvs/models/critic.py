"""PatchGAN-style Wasserstein critic of the cWGAN-GP (METHODS §3).

Input: brightfield (condition) concatenated with Cell Painting (real or generated),
three 4x4 stride-2 convolutions (the last with 64 filters) with LeakyReLU, then a
3x3 convolution to one score per patch; the critic's output is the patch mean.
No batch norm: the gradient penalty is defined per sample, which batch statistics
would couple.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchCritic(nn.Module):
    def __init__(self, in_channels: int = 8, width: int = 64):
        super().__init__()
        w1, w2 = max(1, width // 4), max(1, width // 2)
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, w1, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w1, w2, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(w2, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, 1, 3, padding=1),
        )

    def patch_scores(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, H/8, W/8) scores, one per patch."""
        return self.net(torch.cat([condition, image], dim=1))

    def forward(self, condition: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B,) critic value of each sample: the mean of its patch scores."""
        return self.patch_scores(condition, image).mean(dim=(1, 2, 3))


def gradient_penalty(critic: nn.Module, condition: torch.Tensor, real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """E[(||∇_x̂ D(x, x̂)||₂ − 1)²] on random interpolates x̂ = ε·real + (1−ε)·fake, ε ~ U(0, 1) per sample."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype, generator=generator)
    mixed = (eps * real + (1 - eps) * fake.detach()).requires_grad_(True)
    scores = critic(condition, mixed)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return ((norms - 1) ** 2).mean()
