"""A small VQ image tokenizer: diffusers' conv Encoder/Decoder around a codebook quantizer.

images [B, C, H, W] in [-1, 1] -> encoder -> 1x1 quant_conv -> quantizer -> codes [B, h, w]
codes -> codebook vectors -> 1x1 post_quant_conv -> decoder -> images.

The encoder halves the resolution len(channels) - 1 times. diffusers' Downsample2D pads (0, 1, 0, 1)
and uses a stride-2 3x3 conv, so an even side s maps to s / 2 (28 -> 14 -> 7 -> 4) but an odd side
maps to floor(s / 2) (27 -> 13), which the nearest-neighbour upsampler can't undo. We therefore pad
the input (replicate, bottom/right) to a multiple of the downsampling factor and crop the output back,
so any image size round-trips; for the MNIST default (28, factor 4) no padding happens.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import Decoder, Encoder
from torch import Tensor, nn

from common.io import dataclass_from_dict

from .quantizers import QuantizerOutput, build_quantizer


@dataclass
class VQConfig:
    """Shape of a VQTokenizer. Plain JSON-able (tuples become lists in to_dict).

    Args:
        in_channels: image channels, 1 (grey) or 3 (RGB); the data modules take theirs from here.
        image_size: square side the images are resized and centre-cropped to.
        channels: encoder widths per level; each entry after the first halves the side (3 entries: 28 -> 7).
        layers_per_block: residual blocks per level.
        latent_dim: width of the quantised latents (and of the codebook rows).
        codebook_size: number of codes.
        quantizer: vq (nearest code, straight-through) | ibq (index backpropagation over the whole codebook).
        beta: commitment weight (VQ-VAE's 0.25).
        l2_norm: quantise on the unit sphere (cosine distance).
        restart_dead_codes: vq only: move unused codes onto recent encoder outputs.
        data_init: vq only: k-means codebook initialisation on the first training batch.
        entropy_weight: ibq only: weight of the code-usage entropy loss (ETT's tokenizer: 0.05).
        norm_num_groups: GroupNorm groups (every entry of channels must divide by it).
        mid_attention: self-attention block at the latent resolution.
    """

    in_channels: int = 1
    image_size: int = 28
    channels: tuple[int, ...] = field(default=(32, 64, 64))  # 3 entries -> factor 4 -> 7x7 grid for 28x28
    layers_per_block: int = 1
    latent_dim: int = 32
    codebook_size: int = 256
    quantizer: str = "vq"  # "vq" | "ibq"
    beta: float = 0.25  # commitment weight: VQ-VAE's (van den Oord et al.) 0.25
    l2_norm: bool = False
    restart_dead_codes: bool = True  # only used by "vq"
    data_init: bool = False  # only used by "vq": k-means codebook init on the first training batch
    entropy_weight: float = 0.0  # only used by "ibq"; off by default (ETT's tokenizer uses 0.05, DESIGN §5)
    norm_num_groups: int = 8
    mid_attention: bool = True  # diffusers' mid-block self-attention at the latent resolution

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.quantizer not in ("vq", "ibq"):
            raise ValueError(f"quantizer must be 'vq' or 'ibq', got {self.quantizer!r}")
        if not self.channels:
            raise ValueError("channels must have at least one entry")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "VQConfig":
        return dataclass_from_dict(cls, d, source)


class VQTokenizer(nn.Module):
    """Conv VQ autoencoder that turns images into a grid of discrete codes and back."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = cfg = config or VQConfig()
        n = len(cfg.channels)
        self.encoder = Encoder(
            in_channels=cfg.in_channels,
            out_channels=cfg.latent_dim,
            down_block_types=("DownEncoderBlock2D",) * n,
            block_out_channels=cfg.channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            act_fn="silu",
            double_z=False,
            mid_block_add_attention=cfg.mid_attention,
        )
        self.decoder = Decoder(
            in_channels=cfg.latent_dim,
            out_channels=cfg.in_channels,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=cfg.channels,
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            act_fn="silu",
            mid_block_add_attention=cfg.mid_attention,
        )
        self.quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_dim, cfg.latent_dim, 1)
        self.quantizer = build_quantizer(
            cfg.quantizer,
            cfg.codebook_size,
            cfg.latent_dim,
            beta=cfg.beta,
            l2_norm=cfg.l2_norm,
            restart_dead_codes=cfg.restart_dead_codes,
            entropy_weight=cfg.entropy_weight,
            data_init=cfg.data_init,
        )

    # ---- geometry -------------------------------------------------------------------------
    @property
    def factor(self) -> int:
        return self.config.downsample_factor

    @property
    def grid(self) -> tuple[int, int]:
        """Latent grid (h, w) for config.image_size square images."""
        side = math.ceil(self.config.image_size / self.factor)
        return side, side

    @property
    def code_shape(self) -> tuple[int, ...]:
        """Shape of one image's codes, as `encode` returns and `decode` takes them (vision-tokenizer protocol)."""
        return self.grid

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    def _pad(self, x: Tensor) -> Tensor:
        """Pad [B, C, H, W] on the bottom/right to a multiple of the downsampling factor."""
        f = self.factor
        ph, pw = (-x.shape[-2]) % f, (-x.shape[-1]) % f
        return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x

    # ---- continuous halves ----------------------------------------------------------------
    def encode_latent(self, x: Tensor) -> Tensor:
        """images [B, C, H, W] -> pre-quantization latents [B, latent_dim, h, w]."""
        return self.quant_conv(self.encoder(self._pad(x)))

    def decode_latent(self, z_q: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """quantized latents [B, latent_dim, h, w] -> images [B, C, H, W] (unclamped).

        The output is cropped to `size`, or to config.image_size when the grid is the default one.
        """
        x = self.decoder(self.post_quant_conv(z_q))
        if size is None and tuple(z_q.shape[-2:]) == self.grid:
            size = (self.config.image_size, self.config.image_size)
        if size is not None:
            x = x[..., : size[0], : size[1]]
        return x

    # ---- public API -----------------------------------------------------------------------
    def forward(self, x: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """x [B, C, H, W] in [-1, 1] -> (reconstruction [B, C, H, W] unclamped, quantizer output)."""
        q = self.quantizer(self.encode_latent(x))
        recon = self.decode_latent(q.z_q, size=tuple(x.shape[-2:]))
        return recon, q

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> codes [B, h, w] (long, in [0, codebook_size))."""
        return self.quantizer.encode(self.encode_latent(images))

    @torch.no_grad()
    def decode(self, codes: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        """codes [B, h, w] -> images [B, C, H, W] clamped to [-1, 1]."""
        return self.decode_latent(self.embed(codes), size=size).clamp(-1.0, 1.0)

    def embed(self, codes: Tensor) -> Tensor:
        """codes [B, h, w] -> codebook vectors [B, latent_dim, h, w]."""
        return self.quantizer.embed(codes)
