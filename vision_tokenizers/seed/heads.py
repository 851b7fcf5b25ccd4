"""SEED's stage-2 heads on the quantized tokens [B, N, D]: the reconstruction head (predicts the Causal Q-Former
outputs) and the generation head (blocks + reverse Q-Former + Linear -> the generation embedding)."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import SEEDConfig
from .qformer import QFormerLayer


class _PositionedBlocks(nn.Module):
    """pos. emb + `depth` bidirectional timm ViT blocks (the official code's `Block`s) + LayerNorm over the
    N quantized tokens at the Q-Former width: the trunk both heads start with."""

    def __init__(self, cfg: SEEDConfig, depth: int):
        super().__init__()
        from timm.models.vision_transformer import Block

        d = cfg.qformer_dim
        self.pos = nn.Parameter(torch.randn(1, cfg.num_queries, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, cfg.head_heads, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)

    def trunk(self, x: Tensor) -> Tensor:
        """[B, N, D] -> [B, N, D]."""
        return self.norm(self.blocks(x + self.pos))


class ReconstructionHead(_PositionedBlocks):
    """The trunk + Linear: quantized tokens [B, N, D] -> predicted causal embeddings [B, N, D]."""

    def __init__(self, cfg: SEEDConfig):
        super().__init__(cfg, cfg.recon_layers)
        self.proj = nn.Linear(cfg.qformer_dim, cfg.qformer_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.trunk(x))


class ReverseQFormer(nn.Module):
    """One learned query (BERT's embedding LayerNorm on it) through `reverse_qformer_layers` post-LN layers that
    cross-attend to the tokens every `cross_attention_freq`-th layer, each with the query feed-forward only: the
    official code's `init_Qformer(1, 768)` with the word/position embeddings and text feed-forwards removed
    (BERT-base at full size: 12 layers, cross-attention every 2nd). tokens [B, N, D] -> [B, 1, D]."""

    def __init__(self, cfg: SEEDConfig):
        super().__init__()
        d = cfg.qformer_dim
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)  # [1, 1, D]
        self.emb_norm = nn.LayerNorm(d, eps=1e-12)
        self.layers = nn.ModuleList(
            QFormerLayer(d, cfg.qformer_heads, cfg.qformer_mlp_ratio, d if i % cfg.cross_attention_freq == 0 else None,
                         cfg.dropout, text=False)
            for i in range(cfg.reverse_qformer_layers))

    def forward(self, tokens: Tensor) -> Tensor:
        q = self.emb_norm(self.query.expand(tokens.shape[0], -1, -1))  # [B, 1, D]
        for layer in self.layers:
            q = layer(q, 1, context=tokens)
        return q


class GenerationHead(_PositionedBlocks):
    """The trunk + the reverse Q-Former + Linear: quantized tokens [B, N, D] -> generation embedding [B, G]."""

    def __init__(self, cfg: SEEDConfig):
        super().__init__(cfg, cfg.gen_layers)
        self.reverse = ReverseQFormer(cfg)
        self.out = nn.Linear(cfg.qformer_dim, cfg.gen_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.reverse(self.trunk(x))[:, 0])  # [B, G]
