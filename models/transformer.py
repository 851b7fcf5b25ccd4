"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, static KV cache.

Shapes: B batch, T new positions, S keys visible (cache length), D width, H heads, K kv heads,
E head dim, V vocabulary. Projections are fused (qkv, gate+up) to save kernel launches; models/hf.py
splits and joins them for Hugging Face checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from models.config import LMConfig
from models.masks import attention_mask


class _RMSNormFn(torch.autograd.Function):
    """fp32 RMSNorm with a hand-written backward: about a third of the memory passes of autograd's
    composite graph (the op is memory-bound on CPU). Saves the normalised input and 1/rms."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # one read of x, no x**2 temporary
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()  # [..., 1]
        xhat = x * r
        ctx.save_for_backward(xhat, weight, r)
        return xhat * weight

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        xhat, weight, r = ctx.saved_tensors
        gw = grad * weight
        # d/dx [w * x * r] = r * (gw - xhat * mean(gw * xhat))
        c = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(xhat.shape[-1])
        dx = gw.addcmul_(xhat, c, value=-1).mul_(r)
        dw = (grad * xhat).sum(dim=tuple(range(grad.dim() - 1))) if ctx.needs_input_grad[1] else None
        return dx, dw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype != torch.float32 or w.dtype != torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)  # computes in fp32 internally
        if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad):
            return _RMSNormFn.apply(x, w, self.eps)
        # Inference: in-place on temporaries, fewer kernels than F.rms_norm's CPU composite.
        r = x.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        return (x * r).mul_(w)


class RotaryEmbedding(nn.Module):
    """RoPE in the "rotate half" layout used by Llama/Qwen2 checkpoints; explicit position ids.

    `forward` computes cos/sin for arbitrary position ids; `table` serves consecutive positions from a
    cached cos/sin table (grown on demand), so a decode step does no trigonometry.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [E/2]
        # Cached tables [S, E]: cos, and sin with its first half negated (see `rotate`).
        self.register_buffer("cos_table", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, head_dim), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, E]
        return emb.cos().to(dtype).unsqueeze(1), emb.sin().to(dtype).unsqueeze(1)  # [B, 1, T, E]

    def signed(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and half-negated sin [B, T, 1, E] for explicit position ids (the layout `rotate` takes)."""
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq.float()  # [B, T, E/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(2)  # [B, T, 1, E]
        sin = emb.sin()
        sin[..., : freqs.shape[-1]].neg_()
        return emb.cos().to(dtype), sin.to(dtype)

    def table(self, start: int, end: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and half-negated sin [T, 1, E] for positions start..end-1 (views of the cached table)."""
        if self.cos_table.shape[0] < end:
            self._grow(end)
        cos, sin = self.cos_table[start:end, None], self.sin_table[start:end, None]
        return cos.to(dtype), sin.to(dtype)

    def _grow(self, end: int) -> None:
        n = max(end, 2 * self.cos_table.shape[0], 256)
        # Ordinary tensors even when first called under inference_mode: training may reuse them.
        with torch.inference_mode(False), torch.no_grad():
            pos = torch.arange(n, device=self.inv_freq.device, dtype=torch.float32)
            cos, sin = self.signed(pos[None], torch.float32)
            self.cos_table, self.sin_table = cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE on x [..., E] with cos and half-negated sin broadcastable to x: equals `apply_rope`.

    rotate_half(x) * sin == roll(x, E/2) * sin_signed, which needs one copy instead of neg + cat.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin_signed)


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
        """cos/sin: [B|1, T, 1, E], sin half-negated (RotaryEmbedding.table/.signed)."""
        b, t, _ = x.shape
        h, kv = self.n_heads, self.n_kv
        qkv = self.qkv(x).view(b, t, h + 2 * kv, self.head_dim)  # [B, T, H+2K, E]
        # Split along heads before transposing: the split's backward then writes one contiguous
        # [B, T, H+2K, E] gradient, which views back onto the qkv output without another copy.
        if qkv.requires_grad:
            q, k, v = qkv.split((h, kv, kv), dim=2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        else:  # inference: rotate q and k in one go (fewer kernels per decode step)
            qk, v = qkv.split((h + kv, kv), dim=2)
            q, k = rotate(qk, cos, sin).split((h, kv), dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H|K, T, E]
        if cache is not None:
            k, v = cache.update(layer, k, v)  # [B, K, S, E]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=kv != h
        )  # [B, H, T, E]
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class _SwiGLUFn(torch.autograd.Function):
    """silu(gate) * up on the fused [.., 2F] projection; the backward writes both halves of the
    gradient into one buffer instead of autograd's two tensors plus a cat."""

    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate_up, act)
        return act * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate_up, act = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        out = torch.empty_like(gate_up)
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.mul(grad, act, out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return out


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up(x)
        if gate_up.requires_grad:
            return self.down(_SwiGLUFn.apply(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down(F.silu(gate).mul_(up))


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
        if position_ids is None:  # consecutive positions: slice the cached cos/sin table
            cos, sin = self.rope.table(start, start + t, x.dtype)  # [T, 1, E]
        else:
            cos, sin = self.rope.signed(position_ids, x.dtype)  # [B, T, 1, E]
        mask, is_causal = self._mask(b, t, start, block_ids, valid, cache, x.device)
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
        # Until a step brings block ids, every slot's block id is its position: nothing is stored
        # (one kernel less per decode step), and the first block step backfills the positions.
        end = start + t
        if block_ids is not None and not cache.uses_blocks:
            if start:
                cache.block[:, :start] = torch.arange(start, device=device)
            cache.uses_blocks = True
        if cache.uses_blocks:
            cache.block[:, start:end] = block_ids if block_ids is not None else torch.arange(start, end, device=device)
        if valid is not None:
            cache.valid[:, start:end] = valid
            cache.has_padding = True
        if not cache.uses_blocks and not cache.has_padding:
            if t == 1:
                return None, False  # one causal query sees every filled slot
            if start == 0:
                return None, True
        q_index = torch.arange(start, end, device=device)
        if cache.uses_blocks:
            q_block, k_block = cache.block[:, start:end], cache.block[:, :end]
        else:
            q_block, k_block = q_index.expand(b, t), torch.arange(end, device=device).expand(b, end)
        key_valid = cache.valid[:, :end] if cache.has_padding else None
        return attention_mask(q_block, k_block, key_valid, q_index), False
