"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention; the one forward of every recipe.

The backbone takes token ids and, at marked positions, continuous embeddings (codebook embeddings,
pooled ViT features, noisy latents); position ids and block ids are explicit inputs, and the mask is
derived from the block ids (models/masks.py). It returns the final hidden states: what is predicted
from them (next-token logits through `head`, a flow-matching velocity, ...) is the objective's job
(models/objectives/). Generation runs the same forward with a `KVCache` (models/cache.py).

Shapes: B batch, T new positions, S keys visible, D width, H heads, K kv heads, E head dim, V vocabulary.
The qkv and gate/up projections are fused (two matrix products per block fewer); models/hf.py splits
and joins them for Hugging Face checkpoints. The adaLN condition (cfg.adaln) may come as C rows [B, C, D] with a
`cond_index` naming each position's row (xAR: one row per entity), so its matrix product runs C times, not T.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.cache import KVCache
from models.config import LMConfig
from models.masks import attention_mask


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout of Llama/Qwen2 checkpoints, for explicit position ids.

    The cos/sin table is computed in fp32 from (head_dim, theta) and kept out of the state dict and
    out of `.to(dtype)`, so no precision setting ever rounds the frequencies; it grows on demand.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._cos = self._sin = torch.empty(0, head_dim)  # [S, E] fp32, plain attributes (not buffers)

    def _table(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < n or self._cos.device != torch.device(device):
            n = max(n, 2 * self._cos.shape[0], 256)
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, reusable by training
                e = self.head_dim
                inv_freq = 1.0 / self.theta ** (torch.arange(0, e, 2, dtype=torch.float64, device=device) / e)
                freqs = torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv_freq  # [S, E/2]
                emb = torch.cat((freqs, freqs), dim=-1)  # [S, E]
                self._cos, self._sin = emb.cos().float(), emb.sin().float()
        return self._cos, self._sin

    def reserve(self, n: int, device) -> None:
        """Grow the table to n positions now (eagerly): a compiled forward then only reads it."""
        self._table(n, device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, T], all < `limit` -> cos, sin [B, 1, T, E] in `dtype`."""
        cos, sin = self._table(limit, position_ids.device)
        return cos[position_ids].unsqueeze(1).to(dtype), sin[position_ids].unsqueeze(1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, E] rotated by cos/sin [B, 1, T, E]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | None, layer: int):
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv
        q, k, v = self.qkv(x).view(b, t, h + 2 * kv, self.head_dim).transpose(1, 2).split((h, kv, kv), dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, H|K, T, E]
        if cache is not None:
            k, v = cache.write(layer, k, v)  # [B, K, S, E]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=kv != h)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))  # [B, T, D]


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.mlp_dim)
        # adaLN (cfg.adaln): a condition vector (e.g. a flow-matching time embedding) gives scale/shift of both
        # norms and the gates of both branches; zero-initialised, so at initialisation the block is a plain Llama
        # block (text positions get a zero condition: only the learned bias modulates them).
        self.ada = nn.Linear(cfg.dim, 6 * cfg.dim) if cfg.adaln else None

    def forward(self, x, cos, sin, mask, is_causal, cache, layer, cond=None, cond_index=None):
        if self.ada is None or cond is None:
            x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, layer)
            return x + self.mlp(self.mlp_norm(x))
        mod = self.ada(F.silu(cond))  # [B, C, 6D]: once per condition row (an entity), not per position
        if cond_index is not None:  # each position takes its row
            mod = mod[:, cond_index] if cond_index.dim() == 1 else mod.gather(
                1, cond_index.unsqueeze(-1).expand(-1, -1, mod.shape[-1]))  # [B, T, 6D]
        g1, g2, s1, s2, b1, b2 = mod.chunk(6, dim=-1)  # [B, T, D] each
        x = x + (1 + g1) * self.attn(self.attn_norm(x) * (1 + s1) + b1, cos, sin, mask, is_causal, cache, layer)
        return x + (1 + g2) * self.mlp(self.mlp_norm(x) * (1 + s2) + b2)


class Transformer(nn.Module):
    """Decoder-only backbone. `forward` returns the final (normed) hidden states [B, T, D];
    `head` maps them to next-token logits [.., V]."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.apply(self._init)
        for blk in self.blocks:
            if blk.ada is not None:
                nn.init.zeros_(blk.ada.weight)
                nn.init.zeros_(blk.ada.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights are counted once

    def new_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        w = self.tok_emb.weight
        c = self.cfg
        max_len, device = max_len or c.max_len, device or w.device
        self.rope.reserve(max(c.max_len, max_len), device)  # grown here, eagerly: a compiled forward only reads it
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, batch, max_len, dtype or w.dtype, device)

    def embed(self, ids: torch.Tensor, embeds: torch.Tensor | None = None,
              embed_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors [B, T, D]: token embeddings, with `embeds` [N, D] written at the N positions
        where `embed_mask` [B, T] is True (row-major order)."""
        x = self.tok_emb(ids)
        if embeds is None:
            return x
        if embed_mask is None or int(embed_mask.sum()) != embeds.shape[0]:
            raise ValueError("embeds [N, D] needs an embed_mask [B, T] with exactly N True positions")
        return x.masked_scatter(embed_mask.unsqueeze(-1), embeds.to(x.dtype))

    def forward(
        self,
        ids: torch.Tensor,  # [B, T] token ids (any valid id at embedding slots)
        *,
        embeds: torch.Tensor | None = None,  # [N, D] continuous inputs for the marked positions
        embed_mask: torch.Tensor | None = None,  # [B, T] True where the input is taken from `embeds`
        position_ids: torch.Tensor | None = None,  # [B, T] RoPE positions (default: consecutive)
        block_ids: torch.Tensor | None = None,  # [B, T] mask structure (None = causal), see models/masks.py
        valid: torch.Tensor | None = None,  # [B, T] False on padding (never attended to)
        cache: KVCache | None = None,
        cond: torch.Tensor | None = None,  # [B, T, D] adaLN condition per position, or [B, C, D] rows with cond_index
        cond_index: torch.Tensor | None = None,  # [T] or [B, T] long: the row of `cond` each position takes
        attn_mask: torch.Tensor | None = None,  # [B, 1, T, T] bool, replaces the block-id mask (no cache)
    ) -> torch.Tensor:
        x = self.embed(ids, embeds, embed_mask)  # [B, T, D]
        b, t, _ = x.shape
        if cond is not None and (cond.shape[1] != t if cond_index is None else cond_index.shape[-1] != t):
            raise ValueError(f"adaLN: cond {tuple(cond.shape)} needs one row per position or a cond_index of {t}")
        if cache is not None:  # the cache records positions/blocks/validity and says what to attend to
            position_ids, mask, is_causal = cache.append(t, position_ids, block_ids, valid)
        else:
            if t > self.cfg.max_len:
                raise ValueError(f"sequence of {t} positions exceeds max_len {self.cfg.max_len}")
            if position_ids is None:
                position_ids = torch.arange(t, device=x.device).expand(b, t)
            if attn_mask is not None:
                mask, is_causal = attn_mask, False
            elif block_ids is None and valid is None:
                mask, is_causal = None, True
            else:
                q_block = block_ids if block_ids is not None else torch.arange(t, device=x.device).expand(b, t)
                mask, is_causal = attention_mask(q_block, q_block, valid), False
        limit = max(self.cfg.max_len, cache.max_len if cache is not None else t)
        cos, sin = self.rope(position_ids, x.dtype, limit)  # [B, 1, T, E]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, mask, is_causal, cache, i, cond, cond_index)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)
