"""Fréchet distance between real and predicted image sets, per channel.

The feature network is always a local file the user passes; nothing is
downloaded. Supported: an Inception-v3 state dict in torchvision's layout (the
2048-d pool features, 299² inputs; e.g. torchvision's ``inception_v3_google``
weights), or a DINO / WS-DINO checkpoint of ``cpvs train`` (each channel embedded by its
own ViT: the CLS embedding of the whole image resized to the model's crop size and
z-scored, as the ViT saw its training crops). Each channel is scaled to [0, 1] by its
0.1–99.9 percentiles, replicated to 3 channels for RGB networks, and resized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from cpvs.errors import CpvsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """‖μ1 − μ2‖² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)."""
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # near-singular product: regularize as is customary
        eps = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def stats_of(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(features) < 2:
        raise CpvsError("FID needs at least two images per set")
    return features.mean(axis=0), np.cov(features, rowvar=False)


@dataclass
class FeatureNetwork:
    name: str
    embed: Callable[[np.ndarray, str], np.ndarray]  # (N, H, W) float images in [0, 1] of one channel -> (N, D)


def _inception_from_state_dict(state: dict, device: torch.device) -> FeatureNetwork:
    from torchvision.models import inception_v3

    net = inception_v3(weights=None, aux_logits="AuxLogits.fc.weight" in state, init_weights=False)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise CpvsError(f"not torchvision Inception-v3 weights ({str(e).splitlines()[0][:160]})") from None
    net.fc = torch.nn.Identity()
    net.eval().to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[None, :, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[None, :, None, None]

    @torch.inference_mode()
    def embed(images: np.ndarray, channel: str) -> np.ndarray:
        out = []
        for i in range(0, len(images), 16):
            x = torch.from_numpy(images[i : i + 16]).float().to(device)[:, None].expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            out.append(net((x - mean) / std).float().cpu().numpy())
        return np.concatenate(out)

    return FeatureNetwork("inception_v3 (pool, 2048-d)", embed)


def _vit_from_checkpoint(ck: dict, device: torch.device) -> FeatureNetwork:
    from cpvs.models import load_model

    loaded = load_model(ck, device, roles=("embedding",), option="--fid-network")
    models = loaded.net
    size = models.input_size

    @torch.inference_mode()
    def embed(images: np.ndarray, channel: str) -> np.ndarray:
        if channel not in models.channels:
            raise CpvsError(f"the --fid-network checkpoint has no ViT for {channel} (it has {', '.join(models.channels)})",
                            loaded.path, "pass --channels with those channels, or another checkpoint")
        out = []
        for i in range(0, len(images), 16):
            x = torch.from_numpy(images[i : i + 16]).float().to(device)[:, None]
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            x = (x - x.mean(dim=(2, 3), keepdim=True)) / (x.std(dim=(2, 3), keepdim=True) + 1e-6)
            out.append(models[channel].embed(x).float().cpu().numpy())
        return np.concatenate(out)

    return FeatureNetwork(f"{loaded.family} {models[models.channels[0]].backbone.num_features}-d CLS per channel", embed)


def load_feature_network(path: str | Path, device: torch.device | str = "cpu") -> FeatureNetwork:
    path = Path(path)
    if path.is_dir():  # a run folder of `cpvs train --model dino|ws-dino`
        from cpvs.checkpoints import resolve_checkpoint

        path = resolve_checkpoint(path)
    if not path.exists():
        raise CpvsError("feature network file not found", path, "pass local Inception-v3 weights or a cpvs embed checkpoint")
    device = torch.device(device)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CpvsError(f"cannot read the network file ({type(e).__name__})", path) from None
    if isinstance(state, dict) and str(state.get("format", "")).startswith("cpvs-checkpoint"):
        state["path"] = str(path)
        return _vit_from_checkpoint(state, device)
    if isinstance(state, dict) and "Mixed_7c.branch_pool.conv.weight" in state:
        return _inception_from_state_dict(state, device)
    raise CpvsError("unrecognized network file: expected torchvision Inception-v3 weights or a cpvs embed checkpoint", path)


def scale01(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [0.1, 99.9])
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1).astype(np.float32)


def fid_per_channel(pred_images: dict[str, list[np.ndarray]], truth_images: dict[str, list[np.ndarray]],
                    network: FeatureNetwork) -> dict[str, float]:
    """FID of each channel's predicted images against its real ones."""
    out = {}
    for ch in pred_images:
        fp = network.embed(np.stack([scale01(i) for i in pred_images[ch]]), ch)
        ft = network.embed(np.stack([scale01(i) for i in truth_images[ch]]), ch)
        out[ch] = frechet_distance(*stats_of(fp), *stats_of(ft))
    return out
