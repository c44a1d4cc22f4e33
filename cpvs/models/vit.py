"""ViT backbones (timm) with the DINO projection head, one model per channel (METHODS §6).

Backbones are built by timm from a name (``vit_small_patch8_224`` by default, any
timm ViT) for one grayscale channel and any input size (global and local crops).
``load_init_weights`` adapts a local DINO/timm checkpoint: wrappers and prefixes
(``teacher``, ``module.``, ``backbone.``) are removed, RGB patch-embedding weights
are summed over the colour axis (a grayscale image replicated to RGB gives the
same activations), and position embeddings are resampled to the model's grid.
Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cpvs.errors import CpvsError


def build_backbone(arch: str = "vit_small_patch8_224", img_size: int = 224, **overrides) -> nn.Module:
    """A timm ViT for one input channel returning the CLS embedding (``num_classes=0``)."""
    import timm

    try:
        return timm.create_model(arch, pretrained=False, num_classes=0, in_chans=1, img_size=img_size,
                                 dynamic_img_size=True, **overrides)
    except RuntimeError as e:
        raise CpvsError(f"timm cannot build {arch!r} ({e})", hint="pass a timm ViT name such as vit_small_patch8_224") from None


class DINOHead(nn.Module):
    """3-layer MLP (GELU), L2-normalized bottleneck, weight-normalized last layer (DINO)."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
        self.last.parametrizations.weight.original0.data.fill_(1.0)
        self.last.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class DINONet(nn.Module):
    """Backbone + head; ``embed`` gives the CLS embedding used downstream."""

    def __init__(self, arch: str, out_dim: int, hidden: int, bottleneck: int, img_size: int = 224):
        super().__init__()
        self.backbone = build_backbone(arch, img_size)
        self.head = DINOHead(self.backbone.num_features, out_dim, hidden, bottleneck)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Crops of possibly different sizes -> concatenated head outputs (sizes batched together)."""
        outs = []
        i = 0
        while i < len(crops):  # run consecutive crops of one size as one batch
            j = i
            while j < len(crops) and crops[j].shape[-1] == crops[i].shape[-1]:
                j += 1
            outs.append(self.backbone(torch.cat(crops[i:j])))
            i = j
        return self.head(torch.cat(outs))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


class ChannelModels(nn.Module):
    """One DINO network per channel, addressed by channel name."""

    def __init__(self, channels: list[str], arch: str, out_dim: int, hidden: int, bottleneck: int, img_size: int = 224):
        super().__init__()
        self.channels = list(channels)
        self.input_size = img_size  # the global-crop size of training; embeddings resize to it
        self.nets = nn.ModuleDict({c: DINONet(arch, out_dim, hidden, bottleneck, img_size) for c in channels})

    def __getitem__(self, channel: str) -> DINONet:
        return self.nets[channel]

    def forward(self, views: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Head outputs of every channel's views in one call (one DDP forward per step)."""
        return {c: self.nets[c](v) for c, v in views.items()}


def _unwrap(state: dict) -> dict:
    for key in ("teacher", "student", "model", "state_dict", "module"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_init_weights(backbone: nn.Module, path: str | Path) -> dict:
    """Load a local timm/DINO ViT state dict into a 1-channel ``backbone``; returns what was adapted."""
    path = Path(path)
    if not path.exists():
        raise CpvsError("initial weights not found", path, "pass a local DINO or timm ViT checkpoint (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CpvsError(f"cannot read initial weights ({type(e).__name__})", path) from None
    if not isinstance(state, dict):
        raise CpvsError("initial weights are not a state dict", path)
    state = {k: v for k, v in _unwrap(state).items() if not k.startswith(("head.", "fc."))}
    own = backbone.state_dict()
    notes = {}
    w = state.get("patch_embed.proj.weight")
    if w is not None and w.shape[1] != own["patch_embed.proj.weight"].shape[1]:
        state["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
        notes["patch_embed"] = f"{w.shape[1]} input channels summed to 1"
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        from timm.layers import resample_abs_pos_embed

        grid = backbone.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=1)
        notes["pos_embed"] = f"resampled to {grid[0]}x{grid[1]} patches"
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing:
        raise CpvsError(f"initial weights do not fit {len(missing)} parameter(s) of the model, e.g. {missing[:3]}", path,
                        "choose the --arch these weights were trained with")
    notes["unused"] = list(unexpected)
    return notes


@torch.no_grad()
def cls_attention(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, heads, h, w) attention of the CLS token over the patches in the last block.

    timm fuses attention into one kernel and never materializes the weights, so the
    last block's attention is recomputed from its query and key projections.
    """
    tokens = backbone.patch_embed(x)
    tokens = backbone._pos_embed(tokens)
    tokens = backbone.patch_drop(tokens)
    tokens = backbone.norm_pre(tokens)
    for blk in backbone.blocks[:-1]:
        tokens = blk(tokens)
    last = backbone.blocks[-1]
    attn = last.attn
    y = last.norm1(tokens)
    b, n, c = y.shape
    qkv = attn.qkv(y).reshape(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    n_prefix = getattr(backbone, "num_prefix_tokens", 1)
    h, w = x.shape[-2] // backbone.patch_embed.patch_size[0], x.shape[-1] // backbone.patch_embed.patch_size[1]
    return weights[:, :, 0, n_prefix:].reshape(b, attn.num_heads, h, w)
