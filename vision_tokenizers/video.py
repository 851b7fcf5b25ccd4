"""Causal video tokenizer (MAGVIT-v2 style) with an FSQ quantizer.

Every 3D convolution pads time only on the past side, and each temporal downsampling keeps the first
frame on its own: T = 1 + s*k input frames become 1 + k latent frames, the first latent frame depends on
frame 0 alone, and latent frame j on frames <= s*j. So an image is a one-frame video (one latent frame),
and changing frame t never changes the codes of latent frames that only cover frames < t.

Shapes: B batch, C channels, T frames, H x W pixels; latents [B, d, t, h, w]; codes [B, t, h, w].
Videos are in [-1, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from common.io import dataclass_from_dict


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each latent channel is squashed to a bounded
    range and rounded to one of `levels[i]` values (straight-through); a code is the mixed-radix number
    of the per-channel levels, so the codebook has prod(levels) entries and nothing to learn."""

    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        if not levels or any(int(l) < 2 for l in levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {levels}")
        lv = torch.tensor(levels, dtype=torch.long)
        self.levels, self.eps = list(levels), eps
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.cat([torch.ones(1, dtype=torch.long), lv[:-1]]), 0),
                             persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        return int(torch.prod(torch.tensor(self.levels)))

    def _bound(self, z: Tensor) -> Tensor:
        """z [..., d] -> values in (-half, half) (shifted by 0.5 for even levels, so rounding gives L values)."""
        lv = self._levels.to(z.dtype)
        half = (lv - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: Tensor) -> Tensor:
        """z [..., d] -> quantized [..., d] in [-1, 1] (straight-through gradient)."""
        b = self._bound(z)
        q = b + (torch.round(b) - b).detach()
        return q / (self._levels // 2).to(z.dtype)

    def codes_from_quantized(self, q: Tensor) -> Tensor:
        half = (self._levels // 2).to(q.dtype)
        digits = torch.round(q * half + half).long()  # [..., d] in [0, L)
        return (digits * self._basis).sum(-1)

    def quantized_from_codes(self, codes: Tensor) -> Tensor:
        """codes [...] -> quantized vectors [..., d]."""
        digits = (codes.long().unsqueeze(-1) // self._basis) % self._levels
        half = (self._levels // 2).to(torch.float32)
        return (digits.float() - half) / half

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [..., d] -> (quantized [..., d], codes [...])."""
        q = self.quantize(z)
        return q, self.codes_from_quantized(q)


class CausalConv3d(nn.Module):
    """3D convolution padded on the past side in time (replicating frame 0) and symmetrically in space.
    With time stride s and kernel k_t = s + 1, T = 1 + s*n frames give 1 + n frames, frame 0 alone first."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (3, 3, 3),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.kt, kh, kw = kernel
        self.pad_space = (kw // 2, kw // 2, kh // 2, kh // 2)
        self.conv = nn.Conv3d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T, H, W]
        past = x[:, :, :1].expand(-1, -1, self.kt - 1, -1, -1)
        x = torch.cat([past, x], dim=2)
        return self.conv(F.pad(x, self.pad_space))


class ResBlock3d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c), CausalConv3d(c, c)
        self.norm2, self.conv2 = nn.GroupNorm(8, c), CausalConv3d(c, c)

    def forward(self, x: Tensor) -> Tensor:
        # GroupNorm over (C, T, H, W) would mix future frames into past statistics; normalise per frame.
        h = self.conv1(F.silu(_per_frame(self.norm1, x)))
        return x + self.conv2(F.silu(_per_frame(self.norm2, h)))


def _per_frame(norm: nn.Module, x: Tensor) -> Tensor:
    t = x.shape[2]
    return rearrange(norm(rearrange(x, "b c t h w -> (b t) c h w")), "(b t) c h w -> b c t h w", t=t)


@dataclass
class VideoTokenizerConfig:
    """Sizes of the causal video tokenizer. Spatial compression = patch * 2**len(spatial_down);
    temporal compression = 2**(number of True in time_down)."""

    in_channels: int = 1
    image_size: int = 64  # square frames
    frames: int = 17  # frames per training/generated video (1 + temporal_factor * k)
    patch: int = 4  # space-to-depth before the first convolution (cheap full-resolution stage)
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # width per stage
    spatial_down: list[bool] = field(default_factory=lambda: [True, False])  # between stages: 2x in space
    time_down: list[bool] = field(default_factory=lambda: [True, True])  # between stages: 2x in time
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # FSQ levels (the paper: [8,8,8,5,5,5])

    def __post_init__(self) -> None:
        if len(self.spatial_down) != len(self.channels) - 1 or len(self.time_down) != len(self.channels) - 1:
            raise ValueError("spatial_down and time_down need one entry per stage transition "
                             f"({len(self.channels) - 1}), got {len(self.spatial_down)} and {len(self.time_down)}")
        if self.image_size % self.spatial_factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by the spatial factor {self.spatial_factor}")
        if (self.frames - 1) % self.temporal_factor:
            raise ValueError(f"frames {self.frames} must be 1 + a multiple of the temporal factor {self.temporal_factor}")
        if any(c % 8 for c in self.channels):
            raise ValueError(f"channels must be multiples of 8 (GroupNorm), got {self.channels}")

    @property
    def spatial_factor(self) -> int:
        return self.patch * 2 ** sum(self.spatial_down)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.time_down)

    @property
    def codebook_size(self) -> int:
        n = 1
        for lv in self.levels:
            n *= lv
        return n

    def latent_frames(self, frames: int | None = None) -> int:
        return 1 + ((frames or self.frames) - 1) // self.temporal_factor

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "VideoTokenizerConfig":
        return dataclass_from_dict(cls, d, source)


# The paper's tokenizer size: 17 x 128 x 128 -> 5 x 16 x 16 codes from FSQ [8, 8, 8, 5, 5, 5] (64,000 codes).
NBP_PAPER_TOKENIZER = VideoTokenizerConfig(in_channels=3, image_size=128, frames=17, patch=2,
                                           channels=[128, 256, 256, 512], spatial_down=[True, True, False],
                                           time_down=[False, True, True], levels=[8, 8, 8, 5, 5, 5])


class VideoTokenizer(nn.Module):
    """Causal 3D-conv encoder -> FSQ codes -> causal 3D-conv decoder."""

    def __init__(self, config: VideoTokenizerConfig | None = None):
        super().__init__()
        self.config = c = config or VideoTokenizerConfig()
        p = c.patch
        self.fsq = FSQ(c.levels)
        enc: list[nn.Module] = [CausalConv3d(c.in_channels * p * p, c.channels[0])]
        for i, ch in enumerate(c.channels):
            enc.append(ResBlock3d(ch))
            if i < len(c.channels) - 1:
                st = (2 if c.time_down[i] else 1, 2 if c.spatial_down[i] else 1, 2 if c.spatial_down[i] else 1)
                enc.append(CausalConv3d(ch, c.channels[i + 1], (st[0] + 1, 3, 3), st))
        enc += [nn.GroupNorm(8, c.channels[-1]), nn.SiLU(), CausalConv3d(c.channels[-1], self.fsq.dim, (1, 1, 1))]
        self.encoder = nn.ModuleList(enc)
        dec: list[nn.Module] = [CausalConv3d(self.fsq.dim, c.channels[-1])]
        for i in reversed(range(len(c.channels))):
            dec.append(ResBlock3d(c.channels[i]))
            if i > 0:
                dec.append(_Up(c.channels[i], c.channels[i - 1], c.time_down[i - 1], c.spatial_down[i - 1]))
        dec += [nn.GroupNorm(8, c.channels[0]), nn.SiLU(), CausalConv3d(c.channels[0], c.in_channels * p * p)]
        self.decoder = nn.ModuleList(dec)

    # ---- the interface the LM side uses (same names as the image tokenizers) ----------------------
    @property
    def code_shape(self) -> tuple[int, int, int]:
        g = self.config.image_size // self.config.spatial_factor
        return (self.config.latent_frames(), g, g)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.code_shape
        return t * h * w

    def _run(self, layers, x: Tensor) -> Tensor:
        for m in layers:
            x = _per_frame(m, x) if isinstance(m, nn.GroupNorm) else m(x)
        return x

    def encode_latent(self, video: Tensor) -> Tensor:
        """video [B, C, T, H, W] -> continuous latents [B, d, t, h, w] (before quantization)."""
        p = self.config.patch
        x = rearrange(video, "b c t (h p1) (w p2) -> b (c p1 p2) t h w", p1=p, p2=p)
        return self._run(self.encoder, x)

    def decode_quantized(self, q: Tensor) -> Tensor:
        """quantized latents [B, d, t, h, w] -> video [B, C, T, H, W]."""
        p = self.config.patch
        x = self._run(self.decoder, q)
        return rearrange(x, "b (c p1 p2) t h w -> b c t (h p1) (w p2)", p1=p, p2=p)

    def forward(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """video [B, C, T, H, W] -> (reconstruction [B, C, T, H, W], codes [B, t, h, w])."""
        z = self.encode_latent(video)
        q, codes = self.fsq(rearrange(z, "b d t h w -> b t h w d"))
        return self.decode_quantized(rearrange(q, "b t h w d -> b d t h w")), codes

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """video [B, C, T, H, W] (or images [B, C, H, W] = one-frame videos) -> codes [B, t, h, w]."""
        if video.dim() == 4:
            video = video.unsqueeze(2)
        z = self.encode_latent(video)
        return self.fsq(rearrange(z, "b d t h w -> b t h w d"))[1]

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """codes [B, t, h, w] -> video [B, C, T, H, W] in [-1, 1]."""
        q = self.fsq.quantized_from_codes(codes).to(self.decoder[0].conv.weight.dtype)
        return self.decode_quantized(rearrange(q, "b t h w d -> b d t h w")).clamp(-1, 1)


class _Up(nn.Module):
    """Causal upsampling: 2x in space (nearest + conv) and, optionally, 2x in time by depth-to-time where
    latent frame 0 yields one frame and every later latent frame two (the mirror of the encoder)."""

    def __init__(self, c_in: int, c_out: int, time: bool, space: bool):
        super().__init__()
        self.time, self.space = time, space
        self.conv = CausalConv3d(c_in, c_out * (2 if time else 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.space:
            x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        x = self.conv(x)
        if self.time:
            x = rearrange(x, "b (c two) t h w -> b c (t two) h w", two=2)[:, :, 1:]  # drop the copy before frame 0
        return x
