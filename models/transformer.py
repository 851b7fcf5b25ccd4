"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, static KV cache.

Shapes: B batch, T new positions, S keys visible (cache length), D width, H heads, K kv heads,
E head dim, V vocabulary. Projections are fused (qkv, gate+up) to save kernel launches; models/hf.py
splits and joins them for Hugging Face checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
    """RoPE in the "rotate half" layout used by Llama/Qwen2 checkpoints; explicit position ids."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [E/2]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, E]
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # [B, 1, T, E]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, E] rotated by cos/sin [B, 1, T, E]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys/values for a batch and a maximum length, plus per-slot block ids and validity.

    `pos` is the number of filled slots; a forward with T new positions writes slots [pos, pos+T)
    and attends to [0, pos+T). Plain Python ints keep the decode loop free of device syncs.
    """

    def __init__(self, cfg: LMConfig, batch: int, max_len: int, dtype=torch.float32, device=None):
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, K, S_max, E]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # [B, S_max]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # [B, S_max]
        self.has_padding = False
        self.uses_blocks = False
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos, self.has_padding, self.uses_blocks = 0, False, False
        self.valid.fill_(True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, K, T, E] at the current position; return all visible keys/values [B, K, S, E]."""
        end = self.pos + k.shape[2]
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin, mask, is_causal, cache: KVCache | None, layer: int):
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.n_heads + 2 * self.n_kv, self.head_dim).transpose(1, 2)
        q, k, v = qkv.split((self.n_heads, self.n_kv, self.n_kv), dim=1)  # [B, H|K, T, E]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, K, S, E]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_heads
        )  # [B, H, T, E]
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


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

    def forward(self, x, cos, sin, mask, is_causal, cache, layer):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, is_causal, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM. `forward` returns logits [B, T, V] (or the final hidden states [B, T, D])."""

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
        return KVCache(self.cfg, batch, max_len or self.cfg.max_len, dtype or w.dtype, device or w.device)

    def forward(
        self,
        ids: torch.Tensor | None = None,  # [B, T]
        *,
        embeds: torch.Tensor | None = None,  # [B, T, D], replaces ids (continuous inputs)
        position_ids: torch.Tensor | None = None,  # [B, T]
        block_ids: torch.Tensor | None = None,  # [B, T] (None = causal)
        valid: torch.Tensor | None = None,  # [B, T] False on padding
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        x = self.tok_emb(ids) if embeds is None else embeds  # [B, T, D]
        b, t, _ = x.shape
        start = cache.pos if cache is not None else 0
        if cache is not None and start + t > cache.max_len:
            raise ValueError(f"sequence of {start + t} positions exceeds the KV cache length {cache.max_len}")
        if cache is None and t > self.cfg.max_len:
            raise ValueError(f"sequence of {t} positions exceeds max_len {self.cfg.max_len}")
        if position_ids is None:
            position_ids = torch.arange(start, start + t, device=x.device).expand(b, t)
        mask, is_causal = self._mask(b, t, start, block_ids, valid, cache, x.device)
        cos, sin = self.rope(position_ids, x.dtype)
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, mask, is_causal, cache, i)
        if cache is not None:
            cache.pos += t
        x = self.norm(x)
        return x if return_hidden else self.head(x)

    @staticmethod
    def _mask(b, t, start, block_ids, valid, cache, device):
        """Pick SDPA's fast path when the mask is plain causal, else build [B, 1, T, S] booleans."""
        if cache is None:
            if block_ids is None and valid is None:
                return None, True
            q_block = block_ids if block_ids is not None else torch.arange(t, device=device).expand(b, t)
            return attention_mask(q_block, q_block, valid), False
        # With a cache: record this step's block ids and validity, then mask over every filled slot.
        end = start + t
        if block_ids is not None:
            cache.block[:, start:end] = block_ids
            cache.uses_blocks = True
        else:
            cache.block[:, start:end] = torch.arange(start, end, device=device)
        if valid is not None:
            cache.valid[:, start:end] = valid
            cache.has_padding = True
        if not cache.uses_blocks and not cache.has_padding:
            if t == 1:
                return None, False  # one causal query sees every filled slot
            if start == 0:
                return None, True
        q_block = cache.block[:, start:end]
        key_valid = cache.valid[:, :end] if cache.has_padding else None
        q_index = torch.arange(start, end, device=device)
        return attention_mask(q_block, cache.block[:, :end], key_valid, q_index), False
