"""SEEDTokenizer (DESIGN §5): causal 1D image tokens that an LM can read and write.

images [B, C, H, W] -> frozen timm ViT -> patch features [B, P, E]
  -> Causal Q-Former (qformer.py): N learned queries, causal among themselves, cross-attending to the features
     every `cross_attention_freq`-th layer -> causal embeddings [B, N, D]
  -> Linear-Tanh-Linear -> VQ (K codes of dim c, nearest in squared L2, straight-through) -> codes [B, N]
codes -> codebook vectors [B, N, c] -> Linear-Tanh-Linear -> [B, N, D]
  -> reconstruction head (heads.py): predicts the causal embeddings (stage 2)
  -> generation head (heads.py: blocks + reverse Q-Former + Linear): generation embedding [B, G]
  -> diffusion detokenizer (optional part of the same file): images
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion_detok import DiffusionDetokenizer
from ..quantizers import QuantizerOutput, VectorQuantizer
from .config import SEEDConfig
from .heads import GenerationHead, ReconstructionHead
from .qformer import CausalQFormer


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
                                         restart_dead_codes=cfg.restart_dead_codes, data_init=cfg.data_init)
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
