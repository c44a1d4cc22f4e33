"""Self-describing checkpoints: one file with weights, model family, hyperparameters,
input/output channel names, normalization, data summary and cpvs version.

Files hold only tensors and plain Python values, so loading uses
``torch.load(weights_only=True)`` and never executes code from the file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from cpvs import __version__
from cpvs.errors import CpvsError
from cpvs.runinfo import atomic_path

FORMAT = "cpvs-checkpoint/1"
HINT = "pass a run folder of `cpvs train` or one of its checkpoints/*.pt files"


def save_checkpoint(path: str | Path, **content: Any) -> Path:
    """Write ``content`` (must include family, hparams, inputs, outputs, state_dict) atomically."""
    for key in ("family", "hparams", "inputs", "outputs", "state_dict"):
        if key not in content:
            raise ValueError(f"checkpoint needs {key!r}")
    data = {"format": FORMAT, "cpvs_version": __version__, **content}
    with atomic_path(path, suffix=".tmp") as tmp:
        torch.save(data, tmp)
    return Path(path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path or a run folder: ``RUN/checkpoints/best.pt`` (the best
    validation epoch, written by the staining trainers), else ``last.pt`` (the only file of
    diffusion, classifier and DINO runs, whose weights are an EMA)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            cand = path / "checkpoints" / name
            if cand.exists():
                return cand
        raise CpvsError("run folder has no checkpoints/best.pt or last.pt", path, "pass a checkpoint file or a finished run folder")
    if not path.exists():
        raise CpvsError("checkpoint not found", path, HINT)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint (file or run folder) without executing code from it."""
    file = resolve_checkpoint(path)
    with open(file, "rb") as fh:
        head = fh.read(4)
    if not head:
        raise CpvsError("not a cpvs checkpoint: the file is empty", file, HINT)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save writes a zip or a pickle
        raise CpvsError("not a cpvs checkpoint: not a file written by torch.save (it looks like text or another format)",
                        file, HINT)
    try:
        data = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refused an object: unpickling it could run code. cpvs never retries unsafely.
        raise CpvsError("not a cpvs checkpoint: the file holds Python objects other than tensors and plain values, "
                        "which cpvs never loads (loading them could run code)", file, HINT) from None
    except Exception:  # torch raises many types for damaged files; its own hints are not for users
        raise CpvsError("not a cpvs checkpoint: a damaged or truncated torch file", file, HINT) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CpvsError("not a cpvs checkpoint: a torch file without the cpvs checkpoint format record", file, HINT)
    data["path"] = str(file)
    return data
