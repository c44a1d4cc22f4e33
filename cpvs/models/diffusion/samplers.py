"""Samplers: separate from schedules and networks (in the spirit of diffusers).

A sampler walks a descending sub-sequence of a schedule's steps, calling
``model_fn(y_t, t)`` (the network with its condition bound) at each; a model never
knows which sampler drives it.

* ``DDPMSampler``: ancestral sampling; over a sub-sequence it uses the respaced
  process (the β's between visited steps), over all T steps it is the original.
* ``DDIMSampler``: η = 0 deterministic, η = 1 the DDPM posterior (same mean and
  variance at every step).
* ``DPMSolverPP``: DPM-Solver++ (2M), second-order multistep in log-SNR on the
  predicted clean image; good quality at 10–20 steps.

Clipping: with ``x0_range = (lo, hi)`` every predicted clean image is clamped into the
range of the training targets before the step (Palette's ``clip_denoised``). An
ε-network's clean-image estimate at high noise divides its error by √γ_t (≈ 150 at
the end of the linear schedule), and without the clamp a sampler keeps that error: on
a small CPU-trained model the samples' std was 8× the data's.

Classifier guidance: ``grad_fn(y_t, t)`` returns ∇ log p(k | y_t). DDPM shifts the
Gaussian mean by s·Σ·∇ (METHODS §5); DDIM and DPM-Solver++ use the equivalent
score correction ε ← ε − s·√(1 − γ_t)·∇.

Parameterization: ``model_fn`` returns what the network predicts (``prediction``: ε,
v or x₀, :mod:`cpvs.models.diffusion.prediction`); every step works on the (x̂₀, ε̂)
pair converted from it. ``callback(i, t, y, x0)`` sees each step's result and the clean
image it was computed from (the diagnostic's trajectory).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from cpvs.errors import CpvsError
from cpvs.models.diffusion.prediction import check_prediction, to_x0_eps
from cpvs.models.diffusion.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the network's output at (y_t, t): ε, v or x₀
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
GradFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def timesteps(T: int, steps: int) -> list[int]:
    """``steps`` step indices from T−1 down to 0, evenly spaced (both ends included)."""
    if not 1 <= steps <= T:
        raise CpvsError(f"--steps must be between 1 and the schedule's {T} steps, got {steps}")
    if steps == 1:
        return [T - 1]
    return sorted({int(round(v)) for v in np.linspace(0, T - 1, steps)}, reverse=True)


class Sampler:
    """The one sampling loop; subclasses define :meth:`step` (and, if they keep state, :meth:`reset`)."""

    name = "base"

    def __init__(self, schedule: NoiseSchedule, steps: int, x0_range: tuple[torch.Tensor, torch.Tensor] | None = None,
                 prediction: str = "eps"):
        self.schedule = schedule
        self.steps = timesteps(schedule.T, steps)
        self.x0_range = x0_range
        self.prediction = check_prediction(prediction)
        self.x0: torch.Tensor | None = None  # the clean image of the last step

    def _g(self, t: int) -> float:
        return float(self.schedule.gammas[t]) if t >= 0 else 1.0

    def denoise(self, y_t: torch.Tensor, out: torch.Tensor, g: float, grad: torch.Tensor | None = None,
                guidance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted y0, the noise consistent with it) from the network's output: with the score
        correction of guidance when ``grad`` is given, clamped into ``x0_range`` when set."""
        y0, eps = to_x0_eps(self.prediction, out, y_t, g)
        if grad is not None:  # ε ← ε − s·√(1 − γ_t)·∇ log p(k | y_t)
            eps = eps - guidance * (1 - g) ** 0.5 * grad
            y0 = (y_t - (1 - g) ** 0.5 * eps) / g**0.5
        if self.x0_range is not None:
            lo, hi = self.x0_range
            y0 = torch.maximum(torch.minimum(y0, hi), lo)
            eps = (y_t - g**0.5 * y0) / (1 - g) ** 0.5
        self.x0 = y0
        return y0, eps

    def reset(self) -> None:
        """Forget per-trajectory state before a new sample (multistep solvers keep some)."""

    def step(self, y: torch.Tensor, out: torch.Tensor, t: int, t_prev: int, grad: torch.Tensor | None, guidance: float,
             noise: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        """y_{t_prev} from y_t and the network's output; ``noise()`` draws this step's fresh noise (only when
        needed, so a deterministic step consumes no random numbers)."""
        raise NotImplementedError

    def sample(self, model_fn: EpsFn, noise: torch.Tensor, step_noise: Callable[[int], torch.Tensor] | None = None,
               grad_fn: GradFn | None = None, guidance: float = 0.0, callback: Callback | None = None) -> torch.Tensor:
        """Denoise ``noise`` (the y_T draw) to y_0. ``step_noise(i)`` supplies the fresh noise of
        step i (so callers control determinism, e.g. one generator per field)."""
        self.reset()
        y = noise
        seq = self.steps + [-1]
        for i, (t, tp) in enumerate(zip(seq[:-1], seq[1:])):
            tt = torch.full((y.shape[0],), t, device=y.device, dtype=torch.long)
            out = model_fn(y, tt)
            grad = grad_fn(y, tt) if (grad_fn is not None and guidance) else None
            draw = (lambda i=i: step_noise(i)) if step_noise is not None else None
            y = self.step(y, out, t, tp, grad, guidance, draw)
            if callback is not None:
                callback(i, t, y, self.x0)
        return y


def _add_noise(mean: torch.Tensor, var: float, noise: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    return mean + var**0.5 * noise() if (var > 0 and noise is not None) else mean


class DDIMSampler(Sampler):
    name = "ddim"

    def __init__(self, schedule: NoiseSchedule, steps: int, eta: float = 0.0,
                 x0_range: tuple[torch.Tensor, torch.Tensor] | None = None, prediction: str = "eps"):
        super().__init__(schedule, steps, x0_range, prediction)
        self.eta = eta

    def step_distribution(self, y_t: torch.Tensor, out: torch.Tensor, t: int, t_prev: int, grad: torch.Tensor | None = None,
                          guidance: float = 0.0) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(mean, variance, predicted y0) of y_{t_prev} given y_t and the network's output."""
        g, gp = self._g(t), self._g(t_prev)
        y0, eps = self.denoise(y_t, out, g, grad, guidance)
        var = self.eta**2 * (1 - gp) / (1 - g) * (1 - g / gp)
        mean = gp**0.5 * y0 + max(1 - gp - var, 0.0) ** 0.5 * eps
        return mean, var, y0

    def step(self, y, out, t, t_prev, grad, guidance, noise):
        mean, var, _ = self.step_distribution(y, out, t, t_prev, grad, guidance)
        return _add_noise(mean, var, noise)


class DDPMSampler(Sampler):
    name = "ddpm"

    def step_distribution(self, y_t: torch.Tensor, out: torch.Tensor, t: int, t_prev: int) -> tuple[torch.Tensor, float, torch.Tensor]:
        """Posterior q(y_{t_prev} | y_t, y0_pred) of the (respaced) process: (mean, variance, y0)."""
        g, gp = self._g(t), self._g(t_prev)
        beta = 1 - g / gp  # the β between the two visited steps
        y0, _ = self.denoise(y_t, out, g)
        coef0 = gp**0.5 * beta / (1 - g)
        coeft = (1 - beta) ** 0.5 * (1 - gp) / (1 - g)
        var = beta * (1 - gp) / (1 - g)
        return coef0 * y0 + coeft * y_t, var, y0

    def step(self, y, out, t, t_prev, grad, guidance, noise):
        mean, var, _ = self.step_distribution(y, out, t, t_prev)
        if grad is not None:
            mean = mean + guidance * var * grad  # the published guidance: s·Σ·∇ log p(k | y_t) on the mean
        return _add_noise(mean, var, noise)


class DPMSolverPP(Sampler):
    """DPM-Solver++(2M): multistep second-order solver on the data prediction."""

    name = "dpmpp"

    def reset(self) -> None:
        self.prev_x0, self.prev_h = None, None

    def _lambda(self, t: int) -> float:
        return 0.5 * np.log(self._g(t) / (1 - self._g(t))) if t >= 0 else np.inf

    def step(self, y, out, t, t_prev, grad, guidance, noise):
        x0, _ = self.denoise(y, out, self._g(t), grad, guidance)
        if t_prev < 0:  # last step: the clean prediction itself
            return x0
        g, gp = self._g(t), self._g(t_prev)
        h = self._lambda(t_prev) - self._lambda(t)
        d = x0
        if self.prev_x0 is not None:
            r = self.prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self.prev_x0
        sigma_p, sigma = (1 - gp) ** 0.5, (1 - g) ** 0.5
        self.prev_x0, self.prev_h = x0, h
        return (sigma_p / sigma) * y - gp**0.5 * np.expm1(-h) * d


SAMPLERS = {"ddpm": DDPMSampler, "ddim": DDIMSampler, "dpmpp": DPMSolverPP}


def make_sampler(name: str, schedule: NoiseSchedule, steps: int | None = None, eta: float = 0.0,
                 x0_range: tuple[torch.Tensor, torch.Tensor] | None = None, prediction: str = "eps") -> Sampler:
    if name not in SAMPLERS:
        raise CpvsError(f"unknown --sampler {name!r}; use one of {', '.join(SAMPLERS)}")
    steps = steps or schedule.T
    if name == "ddim":
        return DDIMSampler(schedule, steps, eta, x0_range, prediction)
    return SAMPLERS[name](schedule, steps, x0_range, prediction)
