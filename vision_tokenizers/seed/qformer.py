"""The Causal Q-Former (BLIP-2's Q-Former with a lower-triangular mask among the queries) and its layer.

The layer is BERT-style **post-LN** (residual, then LayerNorm, as in BERT / BLIP-2), so its layout matches the
BERT-base Q-Former of the paper. Queries and text share the self-attention (and its LayerNorm) but have separate
feed-forwards (BLIP-2's `intermediate_query`/`output_query` vs `intermediate`/`output`, which SEED keeps); only the
queries cross-attend to the image features. Text runs bidirectionally, without cross-attention, with its own
token + position embeddings and a [CLS] first token (stage 1's image-text contrastive loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .config import SEEDConfig


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


class FeedForward(nn.Module):
    """BERT's intermediate + output: Linear-GELU-Linear, dropout, residual, then LayerNorm (post-LN)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim, eps=1e-12)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.mlp(x)))


class QFormerLayer(nn.Module):
    """Post-LN BERT layer over [queries; text]: shared self-attention, cross-attention to image features for the
    queries only (when `cross_dim`), then the query feed-forward on the queries and the text feed-forward on the
    text (`text=False`: no text feed-forward, as in the reverse Q-Former)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, cross_dim: int | None, dropout: float = 0.0,
                 text: bool = True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.self_attn = Attention(dim, heads, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim, eps=1e-12)
        self.cross_attn = Attention(dim, heads, kv_dim=cross_dim, dropout=dropout) if cross_dim else None
        self.norm2 = nn.LayerNorm(dim, eps=1e-12) if cross_dim else None
        self.query_ffn = FeedForward(dim, hidden, dropout)
        self.text_ffn = FeedForward(dim, hidden, dropout) if text else None
        self.drop = nn.Dropout(dropout)

    @property
    def has_cross(self) -> bool:
        return self.cross_attn is not None

    def forward(self, x: Tensor, n_query: int, mask: Tensor | None = None, context: Tensor | None = None) -> Tensor:
        """x [B, T, D] whose first `n_query` rows are queries and the rest text; mask for the self-attention;
        context [B, S, E] the image features (needed when queries meet a cross-attention layer)."""
        x = self.norm1(x + self.drop(self.self_attn(x, mask=mask)))
        q, t = x[:, :n_query], x[:, n_query:]  # [B, Nq, D], [B, T - Nq, D]
        if n_query and self.cross_attn is not None:
            if context is None:
                raise ValueError("queries reached a cross-attention layer without image features (context)")
            q = self.norm2(q + self.drop(self.cross_attn(q, context=context)))
        parts = []
        if n_query:
            parts.append(self.query_ffn(q))
        if t.shape[1]:
            if self.text_ffn is None:
                raise ValueError("this Q-Former layer has no text feed-forward")
            parts.append(self.text_ffn(t))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class CausalQFormer(nn.Module):
    """Learned queries with a lower-triangular mask among them, cross-attending to image features every
    `cross_attention_freq`-th layer; text shares the self-attention layers bidirectionally, skips cross-attention
    and has its own feed-forwards."""

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
        self.apply(init_weights)

    def forward_queries(self, image_feats: Tensor) -> Tensor:
        """image_feats [B, P, E] -> causal embeddings [B, N, D] (query i sees queries 0..i only)."""
        x = self.emb_norm(self.queries.expand(image_feats.shape[0], -1, -1))
        for layer in self.layers:
            x = layer(x, x.shape[1], mask=self.causal, context=image_feats)
        return x

    def forward_text(self, ids: Tensor, valid: Tensor) -> Tensor:
        """ids [B, T] ([CLS] first), valid [B, T] bool -> [B, T, D]; bidirectional, padding masked out."""
        if ids.shape[1] > self.pos_emb.num_embeddings:
            raise ValueError(f"text of {ids.shape[1]} tokens exceeds max_text_len {self.pos_emb.num_embeddings}")
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.emb_norm(self.word_emb(ids) + self.pos_emb(pos))
        mask = valid[:, None, None, :]  # [B, 1, 1, T]
        for layer in self.layers:
            x = layer(x, 0, mask=mask)
        return x


def init_weights(m: nn.Module) -> None:
    """Embeddings N(0, 0.02) as in BERT; linears keep PyTorch's fan-in scaled init, because BERT's fixed
    std 0.02 leaves a narrow toy-width Q-Former's attention branches near zero and its outputs input-blind."""
    if isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
    elif isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)
