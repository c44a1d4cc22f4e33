"""Synthetic Cell Painting plates with known ground truth."""

from cpvs.simulate.plate import SimulateResult, simulate

__all__ = ["SimulateResult", "simulate"]
