"""Self-describing checkpoints: one file with weights, model family, hyperparameters,
input/output channel names, normalization, data summary and cpvs version.

Files hold only tensors and plain Python values, so loading uses
``torch.load(weights_only=True)`` and never executes code from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cpvs import __version__
from cpvs.errors import CpvsError
from cpvs.runinfo import atomic_path

FORMAT = "cpvs-checkpoint/1"


def save_checkpoint(path: str | Path, **content: Any) -> Path:
    """Write ``content`` (must include family, hparams, inputs, outputs, state_dict) atomically."""
    for key in ("family", "hparams", "inputs", "outputs", "state_dict"):
        if key not in content:
            raise ValueError(f"checkpoint needs {key!r}")
    data = {"format": FORMAT, "cpvs_version": __version__, **content}
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(data, tmp)
    return Path(path)


def resolve_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint file from a file path or a run folder (``RUN/checkpoints/best.pt``, else ``last.pt``)."""
    path = Path(path)
    if path.is_dir():
        for name in (f"{prefer}.pt", "best.pt", "last.pt"):
            cand = path / "checkpoints" / name
            if cand.exists():
                return cand
        raise CpvsError("run folder has no checkpoints/best.pt or last.pt", path, "pass a checkpoint file or a finished run folder")
    if not path.exists():
        raise CpvsError("checkpoint not found", path)
    return path


def load_checkpoint(path: str | Path, prefer: str = "best", map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint (file or run folder) without executing code from it."""
    file = resolve_checkpoint(path, prefer)
    try:
        data = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        raise CpvsError(f"cannot read checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})", file,
                        "pass a checkpoint written by cpvs train") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CpvsError("not a cpvs checkpoint", file, "pass a checkpoint written by cpvs train")
    data["path"] = str(file)
    return data
