"""Noisy-image classifier p_φ(k | y_t) for classifier guidance (METHODS §5).

The down-sampling half of the diffusion U-Net (residual blocks with the noise
level embedded by AdaGN, self-attention at the configured resolutions) followed
by attention pooling and a linear layer to the class logits. It sees only the
noisy stains y_t, so its gradient steers the sample, not the condition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cpvs.models.diffusion.unet import Attention, DiffusionUNetConfig, ResBlock, group_norm, noise_level_embedding


class AttentionPool(nn.Module):
    """The mean token attends over all positions (with learned position-free keys)."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(channels, heads, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        tokens = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        query = tokens.mean(dim=1, keepdim=True)
        out, _ = self.attn(query, torch.cat([query, tokens], 1), torch.cat([query, tokens], 1), need_weights=False)
        return out[:, 0]


class NoisyClassifier(nn.Module):
    def __init__(self, cfg: DiffusionUNetConfig, num_classes: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        emb_dim = 4 * w
        self.time_mlp = nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.inp = nn.Conv2d(cfg.out_channels, w, 3, padding=1)
        self.blocks = nn.ModuleList()
        c, ds = w, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.blocks.append(ResBlock(c, mult * w, emb_dim, cfg.dropout))
                c = mult * w
                if ds in cfg.attention_downsample:
                    self.blocks.append(Attention(c, cfg.head_channels))
            if level < len(cfg.channel_mult) - 1:
                self.blocks.append(ResBlock(c, c, emb_dim, cfg.dropout, "down"))
                ds *= 2
        self.blocks.append(ResBlock(c, c, emb_dim, cfg.dropout))
        self.norm = group_norm(c)
        self.pool = AttentionPool(c, max(1, c // cfg.head_channels))
        self.head = nn.Linear(c, num_classes)

    def forward(self, y_t: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(noise_level_embedding(gamma, self.cfg.width))
        h = self.inp(y_t)
        for block in self.blocks:
            h = block(h, emb)
        return self.head(self.pool(F.silu(self.norm(h))))

    def log_prob_grad(self, y_t: torch.Tensor, gamma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """∇_{y_t} log p(k | y_t) for the given labels (one per sample)."""
        with torch.enable_grad():
            y = y_t.detach().float().requires_grad_(True)
            logp = F.log_softmax(self(y, gamma).float(), dim=-1)
            selected = logp[torch.arange(len(labels)), labels].sum()
            (grad,) = torch.autograd.grad(selected, y)
        return grad
