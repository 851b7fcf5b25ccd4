"""A continuous KL latent tokenizer: diffusers' AutoencoderKL at toy size (or a real one loaded from a folder).

images [B, C, H, W] in [-1, 1] -> pad to the latent-friendly size -> AutoencoderKL encoder -> posterior mean
-> times `scale_factor` -> latents [B, latent_channels, h, w] with roughly unit variance (the scale is measured
on training data after training and stored in the config, as MAR scales its KL-16 latents by 0.2325).
latents -> / scale_factor -> decoder -> crop -> images.

MNIST default: 28x28 padded by 2 (background -1) to 32x32, factor 4 -> 4 channels on an 8x8 grid, so a
4x4 cell is a quarter of the image (xAR's default of 4 AR steps). `KLTokenizer.from_diffusers(folder)` wraps a
real diffusers AutoencoderKL folder (its architecture becomes the config, its scaling_factor the scale), and
`python -m vision_tokenizers.kl FOLDER OUT.safetensors` stores it in our registry format.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import Tensor, nn


@dataclass
class KLConfig:
    in_channels: int = 1
    image_size: int = 28
    pad: int = 2  # pixels added on each side (value -1) before encoding: 28 + 4 = 32 = 8 x factor 4
    channels: tuple[int, ...] = field(default=(32, 64, 64))  # 3 entries -> factor 4
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    mid_attention: bool = False
    scale_factor: float = 1.0  # latents are multiplied by this (set from data after training)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if not self.channels:
            raise ValueError("channels must have at least one entry")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"channels {list(self.channels)} are not divisible by norm_num_groups {self.norm_num_groups}")
        f = 2 ** (len(self.channels) - 1)
        if (self.image_size + 2 * self.pad) % f:
            raise ValueError(f"image_size {self.image_size} + 2 * pad {self.pad} must be a multiple of the "
                             f"downsampling factor {f}")
        if not self.scale_factor > 0:
            raise ValueError(f"scale_factor must be > 0, got {self.scale_factor}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


class KLTokenizer(nn.Module):
    """Continuous-latent image tokenizer (vision-tokenizer protocol: encode / decode / code_shape / num_tokens)."""

    continuous = True

    def __init__(self, config: KLConfig | None = None):
        super().__init__()
        self.config = cfg = config or KLConfig()
        n = len(cfg.channels)
        self.vae = AutoencoderKL(
            in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=cfg.channels, layers_per_block=cfg.layers_per_block,
            latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
            sample_size=cfg.image_size + 2 * cfg.pad, scaling_factor=cfg.scale_factor,
            mid_block_add_attention=cfg.mid_attention,
        )

    # ---- geometry -------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        side = (self.config.image_size + 2 * self.config.pad) // self.config.downsample_factor
        return side, side

    @property
    def code_shape(self) -> tuple[int, ...]:
        """One image's latents as `encode` returns them: (channels, h, w)."""
        return (self.config.latent_channels, *self.grid)

    @property
    def num_tokens(self) -> int:
        h, w = self.grid
        return h * w

    # ---- halves ---------------------------------------------------------------------------------
    def _pad(self, x: Tensor) -> Tensor:
        p = self.config.pad
        return F.pad(x, (p, p, p, p), value=-1.0) if p else x

    def _crop(self, x: Tensor) -> Tensor:
        p = self.config.pad
        return x[..., p:x.shape[-2] - p, p:x.shape[-1] - p] if p else x

    def posterior(self, x: Tensor):
        """images [B, C, H, W] -> diffusers DiagonalGaussianDistribution over unscaled latents."""
        return self.vae.encode(self._pad(x)).latent_dist

    def decode_unscaled(self, z: Tensor) -> Tensor:
        """unscaled latents [B, c, h, w] -> images [B, C, H, W] (unclamped)."""
        return self._crop(self.vae.decode(z).sample)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, C, H, W] -> (reconstruction from a posterior sample [B, C, H, W], KL per image [B])."""
        post = self.posterior(x)
        return self.decode_unscaled(post.sample()), post.kl()

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> scaled latents [B, c, h, w] (posterior mean)."""
        return self.posterior(images).mean * self.config.scale_factor

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """scaled latents [B, c, h, w] -> images [B, C, H, W] clamped to [-1, 1]."""
        return self.decode_unscaled(latents / self.config.scale_factor).clamp(-1.0, 1.0)

    @torch.no_grad()
    def measure_scale(self, images: Tensor) -> float:
        """1 / std of the unscaled posterior means of `images`: the factor that gives unit-variance latents."""
        return float(1.0 / self.posterior(images).mean.float().std().clamp(min=1e-6))

    # ---- real weights ---------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, folder: str | Path, image_size: int | None = None, pad: int = 0) -> "KLTokenizer":
        """Wrap a diffusers AutoencoderKL folder (config.json + weights); its scaling_factor becomes ours."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a diffusers AutoencoderKL folder (no config.json)")
        try:
            vae = AutoencoderKL.from_pretrained(str(folder))
        except Exception as e:
            raise ValueError(f"{folder}: cannot load AutoencoderKL ({str(e).splitlines()[0]})") from None
        c = vae.config
        if any(t != "DownEncoderBlock2D" for t in c.down_block_types) or c.in_channels != c.out_channels:
            raise ValueError(f"{folder}: only plain DownEncoderBlock2D/UpDecoderBlock2D AutoencoderKLs are supported")
        cfg = KLConfig(in_channels=c.in_channels, image_size=image_size or c.sample_size, pad=pad,
                       channels=tuple(c.block_out_channels), layers_per_block=c.layers_per_block,
                       latent_channels=c.latent_channels, norm_num_groups=c.norm_num_groups,
                       mid_attention=getattr(c, "mid_block_add_attention", True), scale_factor=c.scaling_factor)
        tok = cls(cfg)
        tok.vae.load_state_dict(vae.state_dict())
        return tok.eval().requires_grad_(False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self.config)
        d["channels"] = list(self.config.channels)
        return d


def main(argv=None) -> int:
    """Store a diffusers AutoencoderKL folder as an mmar vision tokenizer file."""
    from vision_tokenizers import registry

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--image-size", type=int, default=None, help="default: the VAE's sample_size")
    p.add_argument("--pad", type=int, default=0)
    a = p.parse_args(argv)
    try:
        registry.save(KLTokenizer.from_diffusers(a.folder, a.image_size, a.pad), a.out)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
