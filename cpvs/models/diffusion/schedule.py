"""Noise schedules: β_t, α_t = 1 − β_t and γ_t = ᾱ_t = ∏_{s ≤ t} α_s for t = 0 … T−1.

The forward process is q(y_t | y_0) = N(√γ_t · y_0, (1 − γ_t) I). Networks are
conditioned on the continuous γ_t, so samplers may visit any sub-sequence of steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cpvs.errors import CpvsError


@dataclass
class NoiseSchedule:
    betas: np.ndarray  # (T,) float64
    name: str = "custom"

    def __post_init__(self) -> None:
        self.betas = np.asarray(self.betas, dtype=np.float64)
        if np.any(self.betas <= 0) or np.any(self.betas >= 1):
            raise ValueError("betas must lie in (0, 1)")
        self.alphas = 1.0 - self.betas
        self.gammas = np.cumprod(self.alphas)

    @property
    def T(self) -> int:
        return len(self.betas)

    @classmethod
    def linear(cls, T: int = 2000, start: float = 1e-6, end: float = 0.01) -> "NoiseSchedule":
        """The published schedule: β linear from 1e-6 to 0.01 over T = 2000 steps."""
        return cls(np.linspace(start, end, T), f"linear({T}, {start:g}, {end:g})")

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008) -> "NoiseSchedule":
        f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - f(t + 1) / f(t), 0.999) for t in range(T)]
        return cls(np.array(betas), f"cosine({T}, {s:g})")

    @classmethod
    def from_spec(cls, spec: dict) -> "NoiseSchedule":
        kind = spec.get("kind", "linear")
        if kind == "linear":
            return cls.linear(spec.get("T", 2000), spec.get("start", 1e-6), spec.get("end", 0.01))
        if kind == "cosine":
            return cls.cosine(spec.get("T", 1000), spec.get("s", 0.008))
        raise CpvsError(f"unknown noise schedule {kind!r}; use linear or cosine")

    def gamma(self, t: torch.Tensor) -> torch.Tensor:
        """γ at integer steps ``t`` (any shape), float32 on ``t``'s device."""
        return torch.as_tensor(self.gammas, dtype=torch.float32, device=t.device)[t.long()]

    def q_sample(self, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Closed form of the forward process: √γ_t·y0 + √(1 − γ_t)·noise (t per sample)."""
        g = self.gamma(t).view(-1, *([1] * (y0.dim() - 1)))
        return g.sqrt() * y0 + (1 - g).sqrt() * noise
