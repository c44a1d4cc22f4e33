"""``cpvs embed``: self-supervised profiles of fields (METHODS §6).

Per field and channel: the four 224² crops tiling the central 448² square, the
CLS embedding of each (the teacher network of that channel), the median over
the four crops; channels concatenated (``Emb_<Channel>_<i>`` columns) and the
vector L2-normalized. Fields come from a preprocessed store (as stored) or from
a plate of TIFFs (normalized with the checkpoint's own preprocessing). Optional
typical variation normalization (TVN): PCA whitening fitted on the negative
controls, applied to all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from cpvs.device import autocast
from cpvs.errors import CpvsError
from cpvs.models.vit import ChannelModels

Progress = Callable[..., None]


def central_crops(image: np.ndarray, crop: int = 224, grid: int = 2) -> np.ndarray:
    """(grid², C, crop, crop): the crops tiling the central (grid·crop)² square of a (C, H, W) image."""
    c, h, w = image.shape
    side = grid * crop
    if h < side or w < side:
        raise CpvsError(f"field is {h}x{w} px at the model's resolution; embedding needs {side}x{side}",
                        hint="embed a store or plate at a resolution of at least 448 px")
    y0, x0 = (h - side) // 2, (w - side) // 2
    return np.stack([image[:, y0 + i * crop : y0 + (i + 1) * crop, x0 + j * crop : x0 + (j + 1) * crop]
                     for i in range(grid) for j in range(grid)])


@torch.no_grad()
def embed_image(models: ChannelModels, image: np.ndarray, channels: list[str], device: torch.device,
                precision: str = "fp32", input_size: int = 224) -> np.ndarray:
    """(D_total,) unit-norm embedding of a (C, H, W) normalized field with ``channels`` in order.

    The 224² crops are resized to ``input_size`` (the global-crop size the model was trained
    with), so a model trained on smaller crops sees the scale it learned."""
    crops = torch.from_numpy(central_crops(image)).to(device)
    if input_size != crops.shape[-1]:
        crops = torch.nn.functional.interpolate(crops, size=(input_size, input_size), mode="bilinear", antialias=True)
    parts = []
    for i, ch in enumerate(channels):
        with autocast(device, precision):
            e = models[ch].embed(crops[:, i : i + 1]).float()
        parts.append(e.median(dim=0).values)
    v = torch.cat(parts).cpu().numpy().astype(np.float64)
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def embedding_columns(channels: list[str], dim: int) -> list[str]:
    return [f"Emb_{c}_{i}" for c in channels for i in range(dim)]


@dataclass
class Embeddings:
    fields: pd.DataFrame  # metadata + Emb_ columns, one row per field
    channels: list[str]
    dim: int


def embed_store(store, models: ChannelModels, channels: list[str], device, precision="fp32",
                indices: list[int] | None = None, progress: Progress | None = None) -> Embeddings:
    progress = progress or (lambda *a, **k: None)
    idx = indices if indices is not None else np.flatnonzero(store.done_mask()).tolist()
    rows = []
    progress("fields", 0, len(idx))
    for k, i in enumerate(idx):
        rows.append(embed_image(models, store.read_field(i, channels), channels, device, precision, models.input_size))
        progress("fields", k + 1, len(idx))
    return _frame(store.table.iloc[idx].reset_index(drop=True), rows, models, channels)


def _frame(meta: pd.DataFrame, rows: list[np.ndarray], models: ChannelModels, channels: list[str]) -> Embeddings:
    dim = models[channels[0]].backbone.num_features
    emb = pd.DataFrame(np.stack(rows), columns=embedding_columns(channels, dim))
    return Embeddings(pd.concat([meta.reset_index(drop=True), emb], axis=1), channels, dim)


def embed_plate(plate, normalizer, models: ChannelModels, channels: list[str], device, precision="fp32",
                progress: Progress | None = None) -> Embeddings:
    progress = progress or (lambda *a, **k: None)
    rows = []
    progress("fields", 0, len(plate.fields))
    for k, f in enumerate(plate.fields):
        image, _ = normalizer.read(f)
        rows.append(embed_image(models, image, channels, device, precision, models.input_size))
        progress("fields", k + 1, len(plate.fields))
    return _frame(plate.table(), rows, models, channels)


def tvn(df: pd.DataFrame, features: list[str], controls: np.ndarray, eps: float = 1e-6) -> tuple[pd.DataFrame, list[str]]:
    """Typical variation normalization: PCA whitening fitted on the control rows.

    Returns the table with ``features`` replaced by ``TVN_<i>`` components (as many as
    the controls' covariance has non-negligible eigenvalues), whose covariance over the
    controls is the identity.
    """
    controls = np.asarray(controls, bool)
    if controls.sum() < 3:
        raise CpvsError(f"TVN needs at least 3 control rows, found {int(controls.sum())}", hint="check --tvn-control-query")
    x = df[features].to_numpy(dtype=np.float64)
    ref = x[controls]
    mean = ref.mean(axis=0)
    cov = np.cov(ref - mean, rowvar=False)
    vals, vecs = np.linalg.eigh(cov)
    keep = vals > eps * max(vals.max(), 1e-300)
    w = vecs[:, keep] / np.sqrt(vals[keep])
    z = (x - mean) @ w
    names = [f"TVN_{i}" for i in range(z.shape[1])]
    meta = df[[c for c in df.columns if c not in set(features)]].reset_index(drop=True)
    return pd.concat([meta, pd.DataFrame(z, columns=names)], axis=1), names


def save_tables(emb: pd.DataFrame, features: list[str], out: Path, method: str = "median") -> dict[str, Path]:
    """Field, well (median, or ``method``) and perturbation tables next to ``out``."""
    from cpvs.runinfo import atomic_path
    from cpvs.tables import WELL_KEYS, to_perturbations, to_wells

    paths = {"field": out}
    tables = {"field": emb}
    if set(WELL_KEYS) <= set(emb.columns):
        tables["well"] = to_wells(emb, features, method, count="Metadata_Count_Fields")
        tables["perturbation"] = to_perturbations(tables["well"], features, method)
    for level, df in tables.items():
        path = out if level == "field" else out.with_name(out.name.replace(".parquet", "") + f"_{level}.parquet")
        paths[level] = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            df.to_parquet(tmp, index=False)
    return paths
