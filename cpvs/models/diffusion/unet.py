"""The class-conditional image-to-image diffusion U-Net (Palette + class labels, METHODS §5).

Input: brightfield planes x concatenated with the noisy target y_t; output: the
predicted noise ε. The noise level γ (ᾱ_t) is embedded (sinusoidal -> MLP) into
every residual block through **AdaGN**: GroupNorm(h)·(1 + k_s) + k_b with (k_s, k_b)
a linear projection of the noise embedding plus the class embedding. The class
table has one extra row, the learned **null class**, used for an absent or
unknown label, so a model trained with labels can sample without them. BigGAN
residual blocks with residual up/down-sampling, skip connections rescaled by
1/√2, multi-head self-attention at the configured resolutions (32 channels per
head). Defaults (width 64, multipliers 1,2,4,8, 2 blocks per level, attention at
16x down-sampling) give about 63 M parameters.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DiffusionUNetConfig:
    in_channels: int = 3  # brightfield planes (the condition)
    out_channels: int = 5  # Cell Painting stains (the target)
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    num_res_blocks: int = 2
    attention_downsample: tuple[int, ...] = (16,)  # add attention where the map is 1/16 of the input
    head_channels: int = 32
    dropout: float = 0.2
    num_classes: int = 0  # 0: no class conditioning (only the null class)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attention_downsample"] = list(self.attention_downsample)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionUNetConfig":
        d = dict(d)
        d["channel_mult"] = tuple(d["channel_mult"])
        d["attention_downsample"] = tuple(d["attention_downsample"])
        return cls(**d)


def noise_level_embedding(gamma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of a continuous noise level γ ∈ (0, 1] (scaled to [0, 1000])."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=gamma.device, dtype=torch.float32) / half)
    args = 1000 * gamma.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def group_norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)  # 32 groups for the usual widths; a divisor otherwise


class AdaGN(nn.Module):
    """GroupNorm(h)·(1 + k_s) + k_b, (k_s, k_b) projected from the conditioning embedding."""

    def __init__(self, channels: int, emb_dim: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.proj = nn.Linear(emb_dim, 2 * channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.proj(emb)[:, :, None, None].chunk(2, dim=1)
        return self.norm(h) * (1 + scale) + shift


class ResBlock(nn.Module):
    """BigGAN residual block, optionally changing resolution (up or down) on both paths."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.resample = resample
        self.in_norm = group_norm(cin)
        self.in_conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.ada = AdaGN(cout, emb_dim)
        self.out = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.in_norm(x))
        h = self.in_conv(self._resample(h))
        h = self.out(self.ada(h, emb))
        return self.skip(self._resample(x)) + h


class Attention(nn.Module):
    def __init__(self, channels: int, head_channels: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # contiguous (B, heads, HW, d): the CPU's fused (flash) kernel; transposed views fall back to the
        # math kernel, which holds the whole HW x HW matrix (6.4 GB for one 1080x272 field at 1/4, 13x slower)
        q, k, v = (a.transpose(-1, -2).contiguous() for a in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class DiffusionUNet(nn.Module):
    """ε_θ(x, y_t, γ, k): (B, C_in, H, W), (B, C_out, H, W), (B,), (B,) long -> (B, C_out, H, W)."""

    def __init__(self, cfg: DiffusionUNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        emb_dim = 4 * w
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(w, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.null_class = cfg.num_classes  # the extra row of the table
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim)
        nn.init.zeros_(self.class_emb.weight)  # the null class starts as "no information"
        self.inp = nn.Conv2d(cfg.in_channels + cfg.out_channels, w, 3, padding=1)
        self.down = nn.ModuleList()
        chans = [w]
        c, ds = w, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = nn.ModuleList([ResBlock(c, mult * w, emb_dim, cfg.dropout)])
                c = mult * w
                if ds in cfg.attention_downsample:
                    layers.append(Attention(c, cfg.head_channels))
                self.down.append(layers)
                chans.append(c)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(nn.ModuleList([ResBlock(c, c, emb_dim, cfg.dropout, "down")]))
                chans.append(c)
                ds *= 2
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim, cfg.dropout), Attention(c, cfg.head_channels),
                                  ResBlock(c, c, emb_dim, cfg.dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = nn.ModuleList([ResBlock(c + chans.pop(), mult * w, emb_dim, cfg.dropout)])
                c = mult * w
                if ds in cfg.attention_downsample:
                    layers.append(Attention(c, cfg.head_channels))
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(ResBlock(c, c, emb_dim, cfg.dropout, "up"))
                    ds //= 2
                self.up.append(layers)
        self.out = nn.Sequential(group_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.out_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def multiple(self) -> int:
        return 2 ** (len(self.cfg.channel_mult) - 1)

    def conditioning(self, gamma: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Noise embedding + class embedding (the null class when ``labels`` is None or -1)."""
        emb = self.time_mlp(noise_level_embedding(gamma, self.cfg.width))
        if labels is None:
            labels = torch.full((gamma.shape[0],), self.null_class, device=gamma.device, dtype=torch.long)
        labels = torch.where(labels < 0, torch.full_like(labels, self.null_class), labels)
        return emb + self.class_emb(labels)

    def forward(self, x: torch.Tensor, y_t: torch.Tensor, gamma: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.conditioning(gamma, labels)
        h = self.inp(torch.cat([x, y_t], dim=1))
        skips = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb)
            skips.append(h)
        for layer in self.mid:
            h = layer(h, emb)
        for layers in self.up:
            h = torch.cat([h, skips.pop() / math.sqrt(2)], dim=1)  # skips rescaled by 1/√2
            for layer in layers:
                h = layer(h, emb)
        return self.out(h)



