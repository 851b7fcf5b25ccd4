"""Diffusion detokenizer: draws images conditioned on one embedding vector (SEED's "generation embedding").

At full scale SEED hands its 1024-d embedding to unCLIP Stable Diffusion; offline we train the same role
from scratch: a pixel-space diffusers `UNet2DModel` whose time embedding gets a projection of the
conditioning vector added (`class_embed_type="identity"`), trained with a DDPM noise schedule and sampled
with DDIM or DPM-Solver++. A learned null embedding replaces the condition for classifier-free guidance
(the training module drops the condition with some probability).

`unclip_images` is the path for users who do hold real unCLIP weights: it feeds the embedding to a loaded
`StableUnCLIPImg2ImgPipeline` as `image_embeds`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.io import dataclass_from_dict

SAMPLERS = ("ddim", "dpm")


@dataclass
class DetokenizerConfig:
    """Shape and sampling defaults of a DiffusionDetokenizer (plain JSON-able)."""

    in_channels: int = 1
    image_size: int = 28
    embed_dim: int = 96  # size of the conditioning (generation) embedding
    patch: int = 2  # space-to-depth: the UNet runs on [C * p^2, S / p, S / p] (4x fewer conv FLOPs at p = 2)
    channels: tuple[int, ...] = field(default=(32, 64))  # one UNet level each; len-1 halvings
    attention_levels: int = 1  # self-attention in the last (lowest-resolution) this many levels
    layers_per_block: int = 1
    norm_num_groups: int = 8
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "sample"  # "sample" (x0) | "epsilon" | "v_prediction"; x0 draws clean strokes soonest
    sampler: str = "ddim"  # "ddim" | "dpm" (DPMSolverMultistep)
    sample_steps: int = 20
    guidance: float = 2.0  # classifier-free guidance scale at sampling (1 = off)

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if not 0 <= self.attention_levels <= len(self.channels):
            raise ValueError(f"attention_levels must be in [0, {len(self.channels)}], got {self.attention_levels}")
        bad = [c for c in self.channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(f"channels {bad} are not divisible by norm_num_groups {self.norm_num_groups}")
        if self.patch < 1:
            raise ValueError(f"patch must be >= 1, got {self.patch}")
        if self.sample_steps < 1:
            raise ValueError(f"sample_steps must be >= 1, got {self.sample_steps}")

    @property
    def factor(self) -> int:
        """Pixel side multiple the UNet needs (patching times its downsampling)."""
        return self.patch * 2 ** (len(self.channels) - 1)


class DiffusionDetokenizer(nn.Module):
    """Pixel-space UNet denoiser conditioned on an embedding [B, embed_dim]."""

    def __init__(self, config: DetokenizerConfig | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = cfg = config or DetokenizerConfig()
        n = len(cfg.channels)
        attn = [i >= n - cfg.attention_levels for i in range(n)]
        side = self.padded_size // cfg.patch
        chans = cfg.in_channels * cfg.patch**2
        time_dim = cfg.channels[0] * 4
        self.unet = UNet2DModel(
            sample_size=side,
            in_channels=chans,
            out_channels=chans,
            block_out_channels=cfg.channels,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            layers_per_block=cfg.layers_per_block,
            norm_num_groups=cfg.norm_num_groups,
            attention_head_dim=8,
            class_embed_type="identity",  # our projected embedding is added to the time embedding
        )
        # embedding -> time-embedding space (added to the timestep embedding inside the UNet)
        self.cond_proj = nn.Sequential(nn.Linear(cfg.embed_dim, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.null_embedding = nn.Parameter(torch.zeros(cfg.embed_dim))  # the "no condition" input for CFG

    # ---- geometry ----------------------------------------------------------------------------
    @property
    def padded_size(self) -> int:
        f = self.config.factor
        return -(-self.config.image_size // f) * f

    def pad(self, x: Tensor) -> Tensor:
        """[B, C, S, S] -> [B, C, S', S'] with S' a multiple of the UNet's downsampling (replicate pad)."""
        p = self.padded_size - x.shape[-1]
        return F.pad(x, (0, p, 0, p), mode="replicate") if p else x

    def crop(self, x: Tensor) -> Tensor:
        s = self.config.image_size
        return x[..., :s, :s]

    # ---- schedules ---------------------------------------------------------------------------
    def train_scheduler(self):
        """The DDPM noise schedule used for training (add_noise, targets)."""
        from diffusers import DDPMScheduler

        c = self.config
        return DDPMScheduler(num_train_timesteps=c.train_timesteps, beta_schedule=c.beta_schedule,
                             prediction_type=c.prediction_type, clip_sample=True)

    def sample_scheduler(self, sampler: str | None = None):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        c = self.config
        sampler = sampler or c.sampler
        common = dict(num_train_timesteps=c.train_timesteps, beta_schedule=c.beta_schedule,
                      prediction_type=c.prediction_type, timestep_spacing="trailing")
        if sampler == "ddim":
            return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=False)
        if sampler == "dpm":
            return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", thresholding=False)
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")

    # ---- model -------------------------------------------------------------------------------
    def condition(self, emb: Tensor, drop: Tensor | None = None) -> Tensor:
        """emb [B, G] -> [B, G], rows where drop [B] (bool) is True replaced by the null embedding."""
        if drop is not None:
            emb = torch.where(drop[:, None], self.null_embedding.to(emb.dtype).expand_as(emb), emb)
        return emb

    def forward(self, x_t: Tensor, t: Tensor, emb: Tensor) -> Tensor:
        """Noisy padded images x_t [B, C, S', S'], timesteps t [B], embeddings [B, G] -> model output
        (noise, v or x0 depending on prediction_type) [B, C, S', S']."""
        p = self.config.patch
        h = F.pixel_unshuffle(x_t, p) if p > 1 else x_t  # [B, C p^2, S'/p, S'/p]
        out = self.unet(h, t, class_labels=self.cond_proj(emb)).sample
        return F.pixel_shuffle(out, p) if p > 1 else out

    @torch.no_grad()
    def sample(self, emb: Tensor, steps: int | None = None, guidance: float | None = None,
               generator: torch.Generator | None = None, noise: Tensor | None = None,
               sampler: str | None = None) -> Tensor:
        """Embeddings [B, G] -> images [B, C, S, S] in [-1, 1].

        Deterministic given `noise` [B, C, S', S'] (or the `generator` that draws it): both samplers are
        run without stochastic steps.
        """
        c = self.config
        steps = steps or c.sample_steps
        guidance = c.guidance if guidance is None else guidance
        b, side = emb.shape[0], self.padded_size
        if noise is None:
            noise = torch.randn((b, c.in_channels, side, side), generator=generator,
                                device=generator.device if generator is not None else emb.device)
        x = noise.to(emb.device, emb.dtype)
        sched = self.sample_scheduler(sampler)
        sched.set_timesteps(steps, device=emb.device)
        guided = guidance != 1.0
        cond = torch.cat([emb, self.null_embedding.to(emb.dtype).expand_as(emb)]) if guided else emb  # [2B or B, G]
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]) if guided else x, t)
            out = self(inp, t.expand(inp.shape[0]), cond)
            if guided:
                out_c, out_u = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            x = sched.step(out, t, x).prev_sample
        return self.crop(x).clamp(-1.0, 1.0)


def unclip_images(pipe, image_embeds: Tensor, prompt: str | list[str] = "", num_inference_steps: int = 20,
                  guidance_scale: float = 10.0, noise_level: int = 0, generator: torch.Generator | None = None,
                  output_type: str = "pt", **kwargs):
    """Draw images from SEED generation embeddings [B, E] with a loaded `StableUnCLIPImg2ImgPipeline`.

    The embedding takes the place of the CLIP image embedding (`image_embeds`; E = 1024 for the CLIP-H
    unCLIP checkpoint), so no image and no image encoder pass is needed. Returns what the pipeline returns
    for `output_type` ("pt": [B, 3, H, W] in [0, 1]; "pil": a list of PIL images).
    """
    expect = pipe.image_normalizer.mean.shape[-1]
    if image_embeds.dim() != 2 or image_embeds.shape[-1] != expect:
        raise ValueError(f"image_embeds must be [B, {expect}] for this pipeline, got {tuple(image_embeds.shape)}")
    b = image_embeds.shape[0]
    prompts = [prompt] * b if isinstance(prompt, str) else list(prompt)
    if len(prompts) != b:
        raise ValueError(f"{len(prompts)} prompts for {b} embeddings")
    out = pipe(prompt=prompts, image_embeds=image_embeds, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, noise_level=noise_level, generator=generator,
               output_type=output_type, **kwargs)
    return out.images


def config_from_dict(d: dict | DetokenizerConfig | None) -> DetokenizerConfig | None:
    """Accept a config, its dict form (as stored in a tokenizer file) or None."""
    if d is None or isinstance(d, DetokenizerConfig):
        return d
    return dataclass_from_dict(DetokenizerConfig, d, "detokenizer config")
