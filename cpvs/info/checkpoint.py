"""``cpvs info`` on a checkpoint or a run folder of ``cpvs train``: family and role, channels,
hyperparameters, parameter count, the data it was trained on, epochs and metrics, cpvs version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from cpvs.checkpoints import load_checkpoint
from cpvs.info.record import Info
from cpvs.models import ROLES, build_model, n_parameters

# Settings of a run that are about where it ran, not what it learned.
_NOT_HYPERPARAMETERS = ("out", "data", "resume", "device", "workers", "max_minutes", "init", "init_weights")


def _run_folder(path: Path, file: Path) -> Path | None:
    if path.is_dir():
        return path
    run = file.parent.parent
    return run if file.parent.name == "checkpoints" and (run / "metrics.parquet").exists() else None


def _parameters(ck: dict) -> int | None:
    """Trainable parameters of the network the checkpoint rebuilds (as training counted them)."""
    try:
        return n_parameters(build_model(ck["family"], ck["hparams"], ck.get("classes")))
    except Exception:  # an unknown family or other hyperparameters: count the stored tensors instead
        return None


def _summary_metrics(metrics: dict, channels: list[str]) -> dict[str, float]:
    """The metrics over all channels (``pcc``, ``val_l1``), not the per-channel ones (``pcc_DNA``)."""
    per_channel = tuple(f"_{c}" for c in channels)
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k not in ("epoch", "step", "seconds") and not (per_channel and k.endswith(per_channel))}


def _epochs(ck: dict, run: Path | None) -> dict[str, Any]:
    train = ck.get("train") or {}
    out: dict[str, Any] = {"epoch": train.get("epoch"), "step": train.get("step")}
    if train.get("select"):
        out.update(select=train["select"], best=train.get("best"), best_epoch=train.get("best_epoch"))
    if train.get("partial"):
        out["stopped_mid_epoch"] = {k: train["partial"][k] for k in ("epoch", "step")}
    out["metrics"] = _summary_metrics(train.get("metrics") or {}, list(ck.get("outputs") or []))
    frame = run / "metrics.parquet" if run is not None else None
    if frame is not None and frame.exists():
        df = pd.read_parquet(frame)
        out["recorded"] = len(df)
        out["metric_columns"] = [c for c in df.columns if c not in ("epoch", "step", "seconds")]
    return out


def describe_checkpoint(path: Path) -> Info:
    ck = load_checkpoint(path)
    file = Path(ck["path"])
    run = _run_folder(path, file)
    family = ck.get("family")
    params = _parameters(ck)
    if params is None:
        params_note = "tensor values stored"
        params = int(sum(t.numel() for t in ck["state_dict"].values() if hasattr(t, "numel")))
    else:
        params_note = "trainable parameters"
    config = ck.get("config") or {}
    norm = ck.get("normalization") or {}
    facts: dict[str, Any] = {
        "file": str(file),
        "run_folder": str(run) if run else None,
        "checkpoint_files": sorted(p.name for p in (run / "checkpoints").glob("*.pt")) if run else [file.name],
        "family": family,
        "role": ROLES.get(family, "unknown"),
        "inputs": list(ck.get("inputs") or []),
        "outputs": list(ck.get("outputs") or []),
        "hparams": ck.get("hparams"),
        "training": {k: v for k, v in config.items() if k not in _NOT_HYPERPARAMETERS and v is not None},
        "parameters": params,
        "parameters_counted": params_note,
        "data": ck.get("data") or {},
        "normalization": {k: norm[k] for k in ("size", "native_shape", "illum_size", "resize_method", "clip") if k in norm},
        "epochs": _epochs(ck, run),
        "cpvs_version": ck.get("cpvs_version"),
    }
    if ck.get("classes") is not None:
        facts["classes"] = {"label": ck.get("label"), "n": len(ck["classes"]), "names": list(ck["classes"])}
    warnings = []
    if family not in ROLES:
        warnings.append(f"model family {family!r} is unknown to this cpvs: update cpvs to use this checkpoint")
    from cpvs import __version__

    if ck.get("cpvs_version") and ck["cpvs_version"] != __version__:
        warnings.append(f"written by cpvs {ck['cpvs_version']}; this is cpvs {__version__}")
    return Info("checkpoint", str(path), facts, warnings)
