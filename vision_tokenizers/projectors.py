"""Continuous visual inputs for the LM: projectors, and the "visual input" modules that own them.

An image reaches the language model either as code ids (a discrete tokenizer; no projector) or as N
continuous vectors written into N embedding slots of the sequence (`<bos> <i2t> <boi> [N slots] <eoi>
caption <eos>`; models/sequence.py `image_slots`). Two ways to make those vectors (DESIGN §5):

* ETT (`CodebookInput`): the image tokenizer's **codebook embeddings** of the image's codes, through
  `ETTProjector`, an MLP with GELU. For end-to-end tuning the vectors are `e[codes] + (z - sg[z])`: the value
  is the codebook row, the caption loss reaches the codebook rows and (straight through) the encoder.
  The tokenizer itself stays the model's vision tokenizer (`Bundle.vision`), so it still draws images.
* TokenFLEX (`ViTPoolInput`): a timm ViT encoder's patch grid, adaptively average-pooled to n x n, through
  `TokenFlexProjector` (a SwiGLU block, then a linear map to the LM width). Any n works at inference; the
  count is the slot span's length in the sequence, so one model serves every count.

`WithEmbeds` hands the vectors to the backbone (`Transformer.forward(embeds=, embed_mask=)`) under any
objective that calls the model like a plain LM, training and KV-cached decoding alike. `describe` / `build`
save and rebuild a visual input from its config (Bundle "visual"). `python -m vision_tokenizers.projectors`
builds the real-size ETT and TokenFLEX configurations on the meta device and prints their parameter counts.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.io import dataclass_from_dict


# ---- projectors -----------------------------------------------------------------------------------
class ETTProjector(nn.Module):
    """ETT's projector: Linear -> GELU -> Linear, codebook embeddings [.., C] -> LM inputs [.., D]."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(in_dim, hidden), nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TokenFlexProjector(nn.Module):
    """TokenFLEX's projector: adaptive average pooling of a feature grid [B, C, H, W] to n x n, then a SwiGLU
    block (LayerNorm, gate/up, SiLU gate, down; residual) that re-weights the pooled features, then a linear map
    to the LM width. Returns [B, n*n, D] in row-major cell order."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.gate_up = nn.Linear(in_dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, in_dim, bias=False)
        self.out = nn.Linear(in_dim, out_dim)

    def forward(self, grid: torch.Tensor, n: int) -> torch.Tensor:
        if n < 1:
            raise ValueError(f"token grid side must be >= 1, got {n}")
        x = F.adaptive_avg_pool2d(grid, n).flatten(2).transpose(1, 2)  # [B, n*n, C]
        gate, up = self.gate_up(self.norm(x)).chunk(2, dim=-1)
        x = x + self.down(F.silu(gate) * up)
        return self.out(x)  # [B, n*n, D]


# ---- visual inputs (what a Bundle stores as "visual") --------------------------------------------------
@dataclass
class CodebookInputConfig:
    code_dim: int = 32  # the tokenizer's codebook vector size
    lm_dim: int = 256
    hidden: int = 512


class CodebookInput(nn.Module):
    """ETT: codebook embeddings of a discrete image tokenizer (passed in: it is the bundle's vision tokenizer)
    through the GELU MLP projector. The token count is the tokenizer's grid (fixed)."""

    kind = "codebook"

    def __init__(self, config: CodebookInputConfig | None = None):
        super().__init__()
        self.config = cfg = config or CodebookInputConfig()
        self.projector = ETTProjector(cfg.code_dim, cfg.lm_dim, cfg.hidden)

    def count(self, vision, tokens: int | None = None) -> int:
        n = vision.num_tokens
        if tokens is not None and tokens != n:
            raise ValueError(f"this model reads its tokenizer's {n} codebook embeddings per image; --tokens {tokens} "
                             f"is not available (only a TokenFLEX model takes any count)")
        return n

    def quantize(self, vision, images: torch.Tensor):
        """(codebook vectors with the straight-through path [B, C, h, w], quantizer output, latents z)."""
        z = vision.encode_latent(images)  # [B, C, h, w]
        q = vision.quantizer(z)
        vec = vision.quantizer.embed(q.codes)  # [B, C, h, w]: the codebook rows (gradient reaches them)
        if torch.is_grad_enabled() and z.requires_grad:
            vec = vec + (z - z.detach())  # value unchanged; gradient also reaches the encoder
        return vec, q, z

    def project(self, vec: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] codebook vectors -> [B, h*w, D]."""
        return self.projector(vec.flatten(2).transpose(1, 2))

    def forward(self, images: torch.Tensor, vision=None, tokens: int | None = None) -> torch.Tensor:
        """images [B, C, H, W] in [-1, 1] -> LM inputs [B, N, D]."""
        if vision is None:
            raise ValueError("codebook inputs need the model's vision tokenizer")
        self.count(vision, tokens)
        return self.project(self.quantize(vision, images)[0])


@dataclass
class ViTPoolInputConfig:
    in_channels: int = 1
    image_size: int = 56
    patch_size: int = 4  # 56 / 4 -> a 14 x 14 patch grid
    vit_dim: int = 96
    vit_depth: int = 3
    vit_heads: int = 3
    lm_dim: int = 256
    hidden: int = 256  # SwiGLU width
    counts: list[int] = field(default_factory=lambda: [16, 36, 64])  # token counts it was trained for (info)
    default_tokens: int = 64  # used when a caller names no count

    def __post_init__(self) -> None:
        self.counts = [int(c) for c in self.counts]
        for c in [*self.counts, self.default_tokens]:
            grid_side(c)


def grid_side(tokens: int) -> int:
    """n for a token count n*n (TokenFLEX counts are squares: 64 = 8 x 8)."""
    n = math.isqrt(int(tokens))
    if tokens < 1 or n * n != tokens:
        raise ValueError(f"token count must be a square number (n x n pooled cells), got {tokens}")
    return n


class ViTPoolInput(nn.Module):
    """TokenFLEX: a timm ViT (no class token) whose patch grid is pooled to n x n and projected; any count."""

    kind = "vit_pool"

    def __init__(self, config: ViTPoolInputConfig | None = None, device: str | torch.device | None = None):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer  # only TokenFLEX models pay for timm

        self.config = cfg = config or ViTPoolInputConfig()
        self.encoder = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_channels,
                                         num_classes=0, global_pool="", embed_dim=cfg.vit_dim, depth=cfg.vit_depth,
                                         num_heads=cfg.vit_heads, class_token=False)
        self.projector = TokenFlexProjector(cfg.vit_dim, cfg.lm_dim, cfg.hidden)

    @property
    def grid(self) -> int:
        return self.config.image_size // self.config.patch_size

    def count(self, vision=None, tokens: int | None = None) -> int:
        tokens = self.config.default_tokens if tokens is None else tokens
        if grid_side(tokens) > self.grid:
            raise ValueError(f"{tokens} tokens need a {grid_side(tokens)}x{grid_side(tokens)} grid; the encoder's "
                             f"patch grid is {self.grid}x{self.grid}")
        return tokens

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> patch grid [B, vit_dim, g, g]."""
        x = self.encoder.forward_features(images)  # [B, g*g, vit_dim]
        return x.transpose(1, 2).reshape(len(x), -1, self.grid, self.grid)

    def forward(self, images: torch.Tensor, vision=None, tokens: int | None = None) -> torch.Tensor:
        return self.projector(self.features(images), grid_side(self.count(vision, tokens)))  # [B, N, D]


VISUALS = {"codebook": (CodebookInputConfig, CodebookInput), "vit_pool": (ViTPoolInputConfig, ViTPoolInput)}


def describe(visual: nn.Module) -> dict:
    return {"kind": visual.kind, "config": dataclasses.asdict(visual.config)}


def build(desc: dict, source: str = "config") -> nn.Module:
    kind = desc.get("kind")
    if kind not in VISUALS:
        raise ValueError(f"{source}: unknown visual input {kind!r}; known: {sorted(VISUALS)}")
    cfg_cls, cls = VISUALS[kind]
    return cls(dataclass_from_dict(cfg_cls, desc.get("config", {}), source))


# ---- handing the vectors to the backbone ---------------------------------------------------------------
class WithEmbeds:
    """The backbone, seen through an objective, with continuous inputs at the slots of `embed_mask`.

    The first call writes `embeds` [N, D] at the True positions of `embed_mask` [B, T'] that fall inside its
    ids [B, T] (T <= T'; positions past T must hold no slot): a training forward over ids[:, :-1], or the
    prompt's prefill in KV-cached decoding. Later calls (decoded tokens) are plain. Everything else (`head`,
    `new_cache`, `cfg`, ...) is the backbone's."""

    def __init__(self, lm: nn.Module, embeds: torch.Tensor | None, embed_mask: torch.Tensor | None):
        self.lm, self.embeds, self.embed_mask = lm, embeds, embed_mask

    def __getattr__(self, name):
        return getattr(self.lm, name)

    def __call__(self, ids: torch.Tensor, **kw) -> torch.Tensor:
        if self.embeds is None:
            return self.lm(ids, **kw)
        mask, embeds = self.embed_mask, self.embeds
        self.embeds = self.embed_mask = None
        t = ids.shape[1]
        if mask[:, t:].any():
            raise ValueError("embedding slots beyond the positions of the first forward")
        return self.lm(ids, embeds=embeds, embed_mask=mask[:, :t], **kw)


# ---- real sizes ---------------------------------------------------------------------------------------
def real_size_summary() -> dict:
    """Build ETT's and TokenFLEX's real-size vision parts on the meta device; their parameter counts.

    ETT: an IBQ tokenizer with 131,072 codes of dim 256, downsampling 16 (256 px -> 16 x 16 = 256 codes), its
    GELU MLP projector into Qwen2.5-1.5B's width (1536; ETT's LM, preset qwen2.5-1.5b) and that LM. TokenFLEX: a
    SigLIP-so400m-sized ViT (384 px, patch 14: a 27 x 27 grid, width 1152, 27 blocks, 16 heads, MLP 4304 --
    timm's default MLP ratio 4 gives 4608, so the ratio is set to 4304/1152) pooled to 8x8 / 12x12 / 16x16 =
    64 / 144 / 256 tokens, and the SwiGLU projector into the same LM width."""
    from models.config import LMConfig
    from models.transformer import Transformer
    from vision_tokenizers.vq import VQConfig, VQTokenizer

    def count(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    out = {}
    with torch.device("meta"):
        lm_cfg = LMConfig.from_preset("qwen2.5-1.5b")
        tok = VQTokenizer(VQConfig(in_channels=3, image_size=256, channels=(128, 128, 256, 256, 512), layers_per_block=2,
                                   latent_dim=256, codebook_size=131_072, quantizer="ibq", entropy_weight=0.05,
                                   norm_num_groups=32, restart_dead_codes=False))
        ett = CodebookInput(CodebookInputConfig(code_dim=256, lm_dim=lm_cfg.dim, hidden=lm_cfg.dim))
        out["ett"] = {"tokenizer_params": count(tok), "codebook_params": count(tok.quantizer),
                      "codebook": [tok.config.codebook_size, tok.config.latent_dim],
                      "downsample": tok.config.downsample_factor, "codes_per_image": tok.num_tokens,
                      "projector_params": count(ett), "lm_preset": "qwen2.5-1.5b", "lm_params": count(Transformer(lm_cfg))}
        from timm.models.vision_transformer import VisionTransformer

        vit = VisionTransformer(img_size=384, patch_size=14, in_chans=3, num_classes=0, global_pool="", embed_dim=1152,
                                depth=27, num_heads=16, mlp_ratio=4304 / 1152, class_token=False)
        proj = TokenFlexProjector(1152, lm_cfg.dim, 4304)
        grid = 384 // 14
        feats = torch.empty(1, 1152, grid, grid)
        out["tokenflex"] = {"encoder_params": count(vit), "grid": [grid, grid], "projector_params": count(proj),
                            "tokens": {n * n: list(proj(feats, n).shape[1:]) for n in (8, 12, 16)}}
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(real_size_summary(), indent=1))
