"""Networks of every model family, and the registry that rebuilds them from checkpoints."""

from cpvs.models.registry import FAMILIES, ROLES, LoadedModel, build_model, load_model, n_parameters

__all__ = ["FAMILIES", "ROLES", "LoadedModel", "build_model", "load_model", "n_parameters"]
