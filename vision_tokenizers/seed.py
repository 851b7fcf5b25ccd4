"""SEED image tokenizer (DESIGN §5): causal 1D image tokens that an LM can read and write.

images [B, C, H, W] -> frozen timm ViT -> patch features [B, P, E]
  -> Causal Q-Former: N learned queries, causal among themselves, cross-attending to the features
     every `cross_attention_freq`-th layer -> causal embeddings [B, N, D]
  -> Linear-Tanh-Linear -> VQ (K codes of dim c, nearest in squared L2, straight-through) -> codes [B, N]
codes -> codebook vectors [B, N, c] -> Linear-Tanh-Linear -> [B, N, D]
  -> reconstruction head (pos. emb + bidirectional blocks): predicts the causal embeddings (stage 2)
  -> generation head (pos. emb + blocks + 1-query reverse Q-Former + Linear): generation embedding [B, G]
  -> diffusion detokenizer (optional part of the same file): images

The Q-Former is BERT-style **post-LN** (residual, then LayerNorm, as in BERT / BLIP-2), so its layout
matches the BERT-base Q-Former of the paper. Text runs through the same self-attention and MLP layers
bidirectionally, without cross-attention, with its own token + position embeddings and a [CLS] first
token (stage 1's image-text contrastive loss).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .diffusion_detok import DetokenizerConfig, DiffusionDetokenizer, config_from_dict
from .quantizers import QuantizerOutput, VectorQuantizer


@dataclass
class SEEDConfig:
    """Shape of a SEEDTokenizer. Defaults: the paper's 32 queries and 8192 x 32 codebook around an
    MNIST-sized encoder and Q-Former; `real_size_config()` gives the paper's full sizes."""

    in_channels: int = 1
    image_size: int = 28
    # encoder: any timm ViT; the optional fields override the named model's shape (None = keep it)
    encoder: str = "vit_tiny_patch16_224"
    encoder_weights: str | None = None  # local weights file; only training loads it (the saved file holds the weights)
    patch_size: int | None = 4
    encoder_dim: int | None = 96
    encoder_depth: int | None = 3
    encoder_heads: int | None = 4
    pixel_mean: tuple[float, ...] | None = None  # encoder input = ((x + 1) / 2 - mean) / std; None = x as is
    pixel_std: tuple[float, ...] | None = None
    # Causal Q-Former
    num_queries: int = 32
    qformer_dim: int = 128
    qformer_layers: int = 4
    qformer_heads: int = 4
    qformer_mlp_ratio: float = 4.0
    cross_attention_freq: int = 2  # layers 0, f, 2f, ... cross-attend to the image features
    text_vocab_size: int = 512  # Q-Former text embedding rows (>= the caption tokenizer's vocabulary)
    max_text_len: int = 32
    contrastive_dim: int = 256
    dropout: float = 0.0
    # VQ bottleneck
    codebook_size: int = 8192
    code_dim: int = 32
    beta: float = 0.25
    restart_dead_codes: bool = False  # not in the paper; the toy configs turn it on against collapse
    # heads
    head_heads: int = 4
    recon_layers: int = 4
    gen_layers: int = 4
    reverse_qformer_layers: int = 4
    gen_dim: int = 256  # generation-embedding size G (1024 = CLIP-H for unCLIP at full scale)
    # what the generation head learns to predict (stage 2): "clip" = the frozen encoder's CLIP image embedding
    # (pooled patch tokens -> encoder_proj -> L2-normalised, times sqrt(G); needs gen_dim == contrastive_dim);
    # "pooled" = the raw mean of the encoder's patch tokens (needs gen_dim == encoder width)
    gen_target: str = "clip"
    detokenizer: DetokenizerConfig | None = None  # set when a diffusion detokenizer is attached

    def __post_init__(self) -> None:
        self.detokenizer = config_from_dict(self.detokenizer)
        for name in ("pixel_mean", "pixel_std"):
            v = getattr(self, name)
            if v is not None:
                v = tuple(v)
                if len(v) != self.in_channels:
                    raise ValueError(f"{name} needs {self.in_channels} entries, got {len(v)}")
                setattr(self, name, v)
        if (self.pixel_mean is None) != (self.pixel_std is None):
            raise ValueError("give both pixel_mean and pixel_std, or neither")
        if self.qformer_dim % self.qformer_heads or self.qformer_dim % self.head_heads:
            raise ValueError(f"qformer_dim {self.qformer_dim} must be divisible by qformer_heads and head_heads")
        if self.gen_target not in ("clip", "pooled"):
            raise ValueError(f"gen_target must be 'clip' or 'pooled', got {self.gen_target!r}")
        if self.gen_target == "clip" and self.gen_dim != self.contrastive_dim:
            raise ValueError(f"gen_target 'clip' needs gen_dim ({self.gen_dim}) == "
                             f"contrastive_dim ({self.contrastive_dim})")
        if self.num_queries < 1 or self.cross_attention_freq < 1:
            raise ValueError("num_queries and cross_attention_freq must be >= 1")
        if self.detokenizer is not None:
            d = self.detokenizer
            if (d.embed_dim, d.in_channels, d.image_size) != (self.gen_dim, self.in_channels, self.image_size):
                raise ValueError(f"detokenizer (embed_dim {d.embed_dim}, {d.in_channels}x{d.image_size}px) does not "
                                 f"fit this tokenizer (gen_dim {self.gen_dim}, {self.in_channels}x{self.image_size}px)")


def real_size_config() -> SEEDConfig:
    """The paper's SEED: EVA-CLIP ViT-g/14 at 224px (257 tokens), BERT-base Q-Former (12 layers, 768,
    cross-attention every 2nd layer, BERT's 30,522-token vocabulary), 32 queries, 8192 x 32 codebook,
    4-block heads, 4-layer reverse Q-Former, 1024-d generation embedding (CLIP-H, what unCLIP SD takes)."""
    return SEEDConfig(
        in_channels=3, image_size=224, encoder="eva_giant_patch14_224", patch_size=None, encoder_dim=None,
        encoder_depth=None, encoder_heads=None, pixel_mean=(0.48145466, 0.4578275, 0.40821073),
        pixel_std=(0.26862954, 0.26130258, 0.27577711), num_queries=32, qformer_dim=768, qformer_layers=12,
        qformer_heads=12, cross_attention_freq=2, text_vocab_size=30522, max_text_len=32, contrastive_dim=256,
        codebook_size=8192, code_dim=32, head_heads=12, recon_layers=4, gen_layers=4, reverse_qformer_layers=4,
        gen_dim=1024, gen_target="pooled",  # the paper regresses CLIP-H's 1024-d embedding (supplied from outside)
    )


def build_encoder(cfg: SEEDConfig, load_weights: bool = False) -> nn.Module:
    """The timm ViT, classifier removed. Weights come only from `cfg.encoder_weights` (a local file)."""
    import timm

    kw = {k: v for k, v in (("patch_size", cfg.patch_size), ("embed_dim", cfg.encoder_dim),
                            ("depth", cfg.encoder_depth), ("num_heads", cfg.encoder_heads)) if v is not None}
    pretrained = load_weights and cfg.encoder_weights is not None
    if pretrained:
        kw["pretrained_cfg_overlay"] = {"file": cfg.encoder_weights}
    return timm.create_model(cfg.encoder, pretrained=pretrained, img_size=cfg.image_size, in_chans=cfg.in_channels,
                             num_classes=0, **kw)


# ---- Q-Former ---------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention; keys/values from `context` (cross) or from x itself (self)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim or dim, dim)
        self.v = nn.Linear(kv_dim or dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x [B, T, D], context [B, S, Dk] (None = x), mask bool broadcastable to [B, H, T, S] (True = may attend)."""
        ctx = x if context is None else context
        q, k, v = (rearrange(proj(t), "b t (h d) -> b h t d", h=self.heads)
                   for proj, t in ((self.q, x), (self.k, ctx), (self.v, ctx)))  # [B, H, T or S, D / H]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(o, "b h t d -> b t (h d)"))


class QFormerLayer(nn.Module):
    """Post-LN BERT layer: self-attention, optional cross-attention to image features, GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.cross_attn = Attention(dim, heads, kv_dim=cross_dim, dropout=dropout) if cross_dim else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-12) if cross_dim else None
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm3 = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    @property
    def has_cross(self) -> bool:
        return self.cross_attn is not None

    def forward(self, x: Tensor, mask: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """x [B, T, D]; context [B, S, E] is used only by cross-attention layers (None = skip it: text)."""
        x = self.norm1(x + self.drop(self.self_attn(x, mask=mask)))
        if self.cross_attn is not None and context is not None:
            x = self.norm2(x + self.drop(self.cross_attn(x, context=context)))
        return self.norm3(x + self.drop(self.mlp(x)))


class CausalQFormer(nn.Module):
    """Learned queries with a lower-triangular mask among them, cross-attending to image features;
    text shares the self-attention/MLP layers bidirectionally and skips cross-attention."""

    def __init__(self, cfg: SEEDConfig, image_dim: int):
        super().__init__()
        d = cfg.qformer_dim
        self.queries = nn.Parameter(torch.randn(1, cfg.num_queries, d) * 0.02)  # [1, N, D]
        self.word_emb = nn.Embedding(cfg.text_vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_text_len, d)
        self.emb_norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(
            QFormerLayer(d, cfg.qformer_heads, cfg.qformer_mlp_ratio,
                         image_dim if i % cfg.cross_attention_freq == 0 else None, cfg.dropout)
            for i in range(cfg.qformer_layers))
        self.register_buffer("causal", torch.ones(cfg.num_queries, cfg.num_queries, dtype=torch.bool).tril(),
                             persistent=False)  # [N, N], True = query i may see query j (j <= i)
        self.apply(_init)

    def forward_queries(self, image_feats: Tensor) -> Tensor:
        """image_feats [B, P, E] -> causal embeddings [B, N, D] (query i sees queries 0..i only)."""
        x = self.emb_norm(self.queries.expand(image_feats.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, mask=self.causal, context=image_feats)
        return x

    def forward_text(self, ids: Tensor, valid: Tensor) -> Tensor:
        """ids [B, T] ([CLS] first), valid [B, T] bool -> [B, T, D]; bidirectional, padding masked out."""
        if ids.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_text_len {self.pos_emb.num_embeddings}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_norm(self.word_emb(ids) + self.pos_emb(pos))
        mask = valid[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x


def _init(m: nn.Module) -> None:
    """Embeddings N(0, 0.02) as in BERT; linears keep PyTorch's fan-in scaled init, because BERT's fixed
    std 0.02 leaves a narrow toy-width Q-Former's attention branches near zero and its outputs input-blind."""
    if isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


# ---- heads ------------------------------------------------------------------------------------

class ReconstructionHead(nn.Module):
    """pos. emb + bidirectional ViT blocks: quantized tokens [B, N, D] -> predicted causal embeddings [B, N, D]."""

    def __init__(self, cfg: SEEDConfig):
        super().__init__()
        from timm.models.vision_transformer import Block

        d = cfg.qformer_dim
        self.pos = nn.Parameter(torch.randn(1, cfg.num_queries, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, cfg.head_heads, qkv_bias=True) for _ in range(cfg.recon_layers)])
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(self.blocks(x + self.pos)))


class GenerationHead(nn.Module):
    """pos. emb + ViT blocks + a 1-query reverse Q-Former (cross-attends to the blocks' outputs) + Linear:
    quantized tokens [B, N, D] -> generation embedding [B, G]."""

    def __init__(self, cfg: SEEDConfig):
        super().__init__()
        from timm.models.vision_transformer import Block

        d = cfg.qformer_dim
        self.pos = nn.Parameter(torch.randn(1, cfg.num_queries, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, cfg.head_heads, qkv_bias=True) for _ in range(cfg.gen_layers)])
        self.norm = nn.LayerNorm(d)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)  # [1, 1, D]
        self.reverse = nn.ModuleList(QFormerLayer(d, cfg.head_heads, cfg.qformer_mlp_ratio, d, cfg.dropout)
                                     for _ in range(cfg.reverse_qformer_layers))
        self.out = nn.Linear(d, cfg.gen_dim)

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.norm(self.blocks(x + self.pos))  # [B, N, D]
        q = self.query.expand(x.shape[0], -1, -1)  # [B, 1, D]
        for layer in self.reverse:
            q = layer(q, context=ctx)
        return self.out(q[:, 0])  # [B, G]


# ---- the tokenizer ----------------------------------------------------------------------------

@dataclass
class SEEDOutput:
    """Stage-2 forward: everything the losses need."""

    causal: Tensor  # [B, N, D] Causal Q-Former outputs (the reconstruction target)
    quant: QuantizerOutput  # z_q [B, N, code_dim], codes [B, N], loss, usage, perplexity
    recon: Tensor  # [B, N, D] reconstruction-head prediction
    gen: Tensor  # [B, G] generation embedding


class SEEDTokenizer(nn.Module):
    """Images <-> 32 causal discrete codes; codes -> generation embedding -> (diffusion) images."""

    def __init__(self, config: SEEDConfig | None = None, load_encoder_weights: bool = False):
        super().__init__()
        self.config = cfg = config or SEEDConfig()
        self.encoder = build_encoder(cfg, load_encoder_weights)
        e, d = self.encoder.embed_dim, cfg.qformer_dim
        self.qformer = CausalQFormer(cfg, e)
        # stage 1: contrastive projections and learnable temperature; encoder_proj makes the encoder's
        # pooled embedding a CLIP-style image embedding (at toy scale stage 1 stands in for CLIP pretraining)
        self.vision_proj = nn.Linear(d, cfg.contrastive_dim)
        self.text_proj = nn.Linear(d, cfg.contrastive_dim)
        self.encoder_proj = nn.Linear(e, cfg.contrastive_dim)
        self.temp = nn.Parameter(torch.tensor(0.07))
        # stage 2: VQ bottleneck and heads
        self.quant_in = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, cfg.code_dim))
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta,
                                         restart_dead_codes=cfg.restart_dead_codes)
        self.quant_out = nn.Sequential(nn.Linear(cfg.code_dim, cfg.code_dim), nn.Tanh(), nn.Linear(cfg.code_dim, d))
        self.recon_head = ReconstructionHead(cfg)
        self.gen_head = GenerationHead(cfg)
        self.detokenizer = DiffusionDetokenizer(cfg.detokenizer) if cfg.detokenizer is not None else None
        if cfg.pixel_mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(cfg.pixel_mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(cfg.pixel_std).view(1, -1, 1, 1), persistent=False)

    # ---- protocol ----------------------------------------------------------------------------
    @property
    def code_shape(self) -> tuple[int, ...]:
        return (self.config.num_queries,)

    @property
    def num_tokens(self) -> int:
        return self.config.num_queries

    @property
    def encoder_dim(self) -> int:
        return self.encoder.embed_dim

    # ---- stage 1 -----------------------------------------------------------------------------
    def image_features(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> encoder tokens [B, prefix + P, E]."""
        if self.config.pixel_mean is not None:
            images = ((images + 1) / 2 - self.pixel_mean) / self.pixel_std
        return self.encoder.forward_features(images)

    def pool(self, feats: Tensor) -> Tensor:
        """Encoder tokens [B, prefix + P, E] -> mean of the patch tokens [B, E]."""
        return feats[:, self.encoder.num_prefix_tokens:].mean(1)

    def pooled_embedding(self, images: Tensor) -> Tensor:
        """Mean of the encoder's patch tokens [B, E]."""
        return self.pool(self.image_features(images))

    def clip_embedding(self, feats: Tensor) -> Tensor:
        """Encoder tokens -> L2-normalised CLIP-style image embedding [B, contrastive_dim]."""
        return F.normalize(self.encoder_proj(self.pool(feats)), dim=-1)

    def generation_target(self, feats: Tensor) -> Tensor:
        """What the generation head regresses (config.gen_target), from encoder tokens -> [B, G]."""
        if self.config.gen_target == "clip":
            return self.clip_embedding(feats) * self.config.gen_dim ** 0.5  # entries of unit scale
        return self.pool(feats)

    def causal_embeddings(self, images: Tensor) -> Tensor:
        """images -> Causal Q-Former outputs [B, N, D]."""
        return self.qformer.forward_queries(self.image_features(images))

    def contrastive_image(self, causal: Tensor) -> Tensor:
        """Last query token -> L2-normalised [B, contrastive_dim] (only the last one has seen every query)."""
        return F.normalize(self.vision_proj(causal[:, -1]), dim=-1)

    def contrastive_text(self, ids: Tensor, valid: Tensor) -> Tensor:
        """Text ids [B, T] ([CLS] first) -> L2-normalised [CLS] projection [B, contrastive_dim]."""
        return F.normalize(self.text_proj(self.qformer.forward_text(ids, valid)[:, 0]), dim=-1)

    # ---- stage 2 -----------------------------------------------------------------------------
    def quantize(self, causal: Tensor) -> QuantizerOutput:
        """causal [B, N, D] -> quantizer output (z_q [B, N, code_dim], codes [B, N])."""
        return self.quantizer(self.quant_in(causal))

    def heads(self, z_q: Tensor) -> tuple[Tensor, Tensor]:
        """Code vectors [B, N, code_dim] -> (reconstruction [B, N, D], generation embedding [B, G])."""
        h = self.quant_out(z_q)
        return self.recon_head(h), self.gen_head(h)

    def forward(self, images: Tensor) -> SEEDOutput:
        causal = self.causal_embeddings(images)
        q = self.quantize(causal)
        recon, gen = self.heads(q.z_q)
        return SEEDOutput(causal, q, recon, gen)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, C, H, W] in [-1, 1] -> codes [B, N] (long, in [0, codebook_size))."""
        return self.quantizer.encode(self.quant_in(self.causal_embeddings(images)))

    @torch.no_grad()
    def decode_embedding(self, codes: Tensor) -> Tensor:
        """codes [B, N] -> generation embedding [B, G]."""
        return self.gen_head(self.quant_out(self.quantizer.embed(codes.long())))

    # ---- detokenizer -------------------------------------------------------------------------
    def attach_detokenizer(self, detok: DiffusionDetokenizer) -> "SEEDTokenizer":
        """Make `detok` part of this tokenizer (and of its saved file); returns self."""
        self.config = dataclasses.replace(self.config, detokenizer=detok.config)  # validates the fit
        self.detokenizer = detok.to(self.temp.device)
        return self

    @torch.no_grad()
    def decode(self, codes: Tensor, generator: torch.Generator | None = None, steps: int | None = None,
               guidance: float | None = None) -> Tensor:
        """codes [B, N] -> images [B, C, H, W] in [-1, 1] through the diffusion detokenizer.

        Without a generator each image's starting noise is seeded from its own codes, so decode is a
        deterministic function of the codes (as a VQ decoder is) and does not depend on the batch.
        """
        if self.detokenizer is None:
            raise ValueError("this SEED tokenizer has no diffusion detokenizer attached, so it cannot draw images; "
                             "train one with configs/mnist_seed_detok.yaml and use the file it exports")
        emb = self.decode_embedding(codes)  # [B, G]
        noise = None
        if generator is None:
            side, c = self.detokenizer.padded_size, self.config.in_channels
            noise = torch.empty((len(codes), c, side, side))  # [B, C, S', S']
            for i, row in enumerate(codes.reshape(len(codes), -1).cpu().numpy().astype(np.int64)):
                noise[i] = torch.randn((c, side, side), generator=torch.Generator().manual_seed(_seed_of(row)))
            noise = noise.to(emb.device)
        return self.detokenizer.sample(emb, steps=steps, guidance=guidance, generator=generator, noise=noise)


def _seed_of(codes_row: np.ndarray) -> int:
    return int.from_bytes(hashlib.sha256(codes_row.tobytes()).digest()[:8], "little") & (2**63 - 1)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Parameters per top-level child and in total (works on the meta device)."""
    out = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def real_size_summary(lm_preset: str = "vicuna-7b", verbose: bool = True) -> dict[str, int]:
    """Build the paper-sized SEED tokenizer and SEED-LLaMA LM on the meta device (no memory, no weights)
    and return / print their parameter counts."""
    from models.config import LMConfig
    from models.text_tokenizer import SPECIAL_TOKENS
    from models.transformer import Transformer
    from models.vocab import VocabLayout

    cfg = real_size_config()
    with torch.device("meta"):
        seed = SEEDTokenizer(cfg)
        base = LMConfig.from_preset(lm_preset)
        layout = VocabLayout(base.vocab_size + len(SPECIAL_TOKENS), cfg.codebook_size)
        lm = Transformer(dataclasses.replace(base, vocab_size=layout.size))
    counts = {f"seed.{k}": v for k, v in parameter_counts(seed).items()}
    counts["lm.vocab_size"] = layout.size
    counts["lm.total"] = sum(p.numel() for p in lm.parameters())
    if verbose:
        for k, v in counts.items():
            print(f"{k:<22} {v:>15,}")
    return counts


if __name__ == "__main__":  # `python -m vision_tokenizers.seed [--lm-preset NAME]`: the real-size parameter counts
    import argparse

    ap = argparse.ArgumentParser(description="Build the paper-sized SEED tokenizer and SEED-LLaMA LM on the meta "
                                             "device and print their parameter counts.")
    ap.add_argument("--lm-preset", default="vicuna-7b", help="an LMConfig preset (models/config.py)")
    real_size_summary(ap.parse_args().lm_preset)
