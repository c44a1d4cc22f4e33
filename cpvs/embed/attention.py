"""Attention maps: the last block's CLS self-attention per head, over the input image.

For each chosen field and channel: the central 224² crop the embedding uses,
and one panel per head with its CLS-to-patch attention upsampled over the
crop. These maps are how the model's features can be read by eye.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cpvs.embed.embedding import central_crops
from cpvs.models.vit import ChannelModels, cls_attention
from cpvs.runinfo import atomic_path


def attention_maps(models: ChannelModels, image: np.ndarray, channels: list[str], device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{channel: (crop, attention (heads, size, size))} for the first central crop (top-left of
    the central 448² square) of a normalized (C, H, W) field, at the model's input size."""
    crops = torch.from_numpy(central_crops(image)[:1]).to(device)
    if models.input_size != crops.shape[-1]:
        crops = F.interpolate(crops, size=(models.input_size,) * 2, mode="bilinear", antialias=True)
    out = {}
    for i, ch in enumerate(channels):
        x = crops[:, i : i + 1]
        att = cls_attention(models[ch].backbone, x)  # (1, heads, h, w)
        att = F.interpolate(att, size=x.shape[-2:], mode="nearest")[0]
        out[ch] = (x[0, 0].cpu().numpy(), att.cpu().numpy())
    return out


def save_attention_png(path: Path, maps: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = next(iter(maps.values()))[1].shape[0]
    fig, axes = plt.subplots(len(maps), heads + 1, figsize=(1.9 * (heads + 1), 2.0 * len(maps)), squeeze=False)
    for r, (ch, (img, att)) in enumerate(maps.items()):
        lo, hi = np.percentile(img, [1, 99.5])
        base = np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1)
        axes[r][0].imshow(base, cmap="gray")
        axes[r][0].set_ylabel(ch)
        for h in range(heads):
            a = att[h]
            axes[r][h + 1].imshow(base, cmap="gray")
            axes[r][h + 1].imshow(a / max(a.max(), 1e-12), cmap="inferno", alpha=0.6)
            if r == 0:
                axes[r][h + 1].set_title(f"head {h}", fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("crop", fontsize=8)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
