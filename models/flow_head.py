"""Small flow-matching pieces shared by continuous-latent objectives: the timestep embedder (sinusoidal
features of 1000 t through an MLP, as DiT/xAR condition their adaLN) and a MAR-style per-token MLP head
with adaLN that predicts a velocity from (x_t, t, backbone hidden state)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class TimestepEmbedder(nn.Module):
    """t [...] in [0, 1] -> [..., dim]: sinusoidal features of 1000 t (freq_dim of them) -> Linear-SiLU-Linear."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def features(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0).unsqueeze(-1) * freqs  # [..., half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [..., freq_dim]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.features(t).to(self.mlp[0].weight.dtype))


class _ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = nn.Linear(width, 3 * width)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(F.silu(c)).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class FlowMLPHead(nn.Module):
    """Per-token velocity predictor: x_t [.., c], t [..], z [.., D] -> v [.., c] (MAR's small adaLN MLP)."""

    def __init__(self, channels: int, cond_dim: int, width: int = 256, depth: int = 3):
        super().__init__()
        self.inp = nn.Linear(channels, width)
        self.time = TimestepEmbedder(width)
        self.cond = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList(_ResBlock(width) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, channels)
        for m in (self.final_ada, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        c = self.time(t) + self.cond(z)  # [.., W]
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, c)
        shift, scale = self.final_ada(F.silu(c)).chunk(2, dim=-1)
        return self.out(self.final_norm(h) * (1 + scale) + shift)
