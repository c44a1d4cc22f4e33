"""``--device auto|cpu|cuda[:N]`` and ``--precision``: resolution and mixed-precision contexts."""

from __future__ import annotations

import contextlib
import re

from cpvs.errors import CpvsError

_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device(spec: str) -> str:
    """Validate the text of ``--device`` without importing torch."""
    if not _DEVICE.match(spec):
        raise CpvsError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def resolve_device(spec: str = "auto"):
    """A ``torch.device``: ``auto`` picks the first GPU when there is one."""
    import torch

    check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CpvsError(f"--device {spec}: no CUDA GPU is visible", hint="use --device cpu or auto")
        index = int(spec.split(":")[1]) if ":" in spec else 0
        if index >= torch.cuda.device_count():
            raise CpvsError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
    return torch.device(spec)


def check_precision(precision: str) -> str:
    if precision not in ("fp32", "bf16", "fp16"):
        raise CpvsError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    return precision


def autocast(device, precision: str):
    """Mixed precision on GPU (bf16/fp16); the CPU always computes in fp32."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
