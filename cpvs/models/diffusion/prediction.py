"""What the diffusion network predicts: ε (published), v or the clean image x₀.

With y_t = a·y₀ + s·ε, a = √γ_t and s = √(1 − γ_t):

* ``eps``: the network predicts ε; x̂₀ = (y_t − s·ε̂) / a. METHODS §5, Palette, DDPM.
  Its L2 loss weighs the clean-image error by the signal-to-noise ratio a²/s²: at high
  noise (γ → 4.5e-5 at the end of the published schedule) the loss hardly sees x̂₀, and
  the sampler's first steps divide the network's error by a (up to ×150).
* ``v``: v = a·ε − s·y₀ (Salimans & Ho 2022); x̂₀ = a·y_t − s·v̂, ε̂ = s·y_t + a·v̂. The
  loss weighs the clean-image error by 1/s² ≥ 1: never less than plain regression, and
  no division by a. With unit-variance data it is EDM's preconditioning (c_skip = a²,
  c_out = s on the scaled input).
* ``x0``: the network predicts y₀ directly; ε̂ = (y_t − a·x̂₀) / s. Its loss is the
  clean-image error at every noise level; at the highest noise it is the regression of
  the stains on the condition.

Samplers ask for (x̂₀, ε̂) whatever the network predicts (:func:`to_x0_eps`); a
checkpoint records its ``prediction`` (older checkpoints: ``eps``).
"""

from __future__ import annotations

import torch

from cpvs.errors import CpvsError

PREDICTIONS = ("eps", "v", "x0")


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise CpvsError(f"--prediction must be one of {', '.join(PREDICTIONS)}, got {prediction!r}")
    return prediction


def _coefs(gamma, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, s) = (√γ, √(1 − γ)) shaped to broadcast over ``like`` (γ: a float, or one value per sample)."""
    g = torch.as_tensor(gamma, dtype=torch.float64, device=like.device)
    if g.dim() == 1:
        g = g.view(-1, *([1] * (like.dim() - 1)))
    return g.sqrt().to(like.dtype), (1 - g).sqrt().to(like.dtype)


def training_target(prediction: str, y0: torch.Tensor, noise: torch.Tensor, gamma) -> torch.Tensor:
    """What the network is regressed on for a clean target ``y0`` noised with ``noise`` at ``gamma``."""
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return y0
    if prediction == "v":
        a, s = _coefs(gamma, y0)
        return a * noise - s * y0
    raise CpvsError(f"unknown prediction {prediction!r}")


def to_x0_eps(prediction: str, out: torch.Tensor, y_t: torch.Tensor, gamma) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂₀, ε̂) from the network's output ``out`` at ``y_t`` and noise level ``gamma``."""
    a, s = _coefs(gamma, y_t)
    if prediction == "eps":
        return (y_t - s * out) / a, out
    if prediction == "x0":
        return out, (y_t - a * out) / s
    if prediction == "v":
        return a * y_t - s * out, s * y_t + a * out
    raise CpvsError(f"unknown prediction {prediction!r}")
