"""Attention masks as boolean tensors (True = may attend), all derived from per-position block ids.

One rule covers the three structures the objectives need:
  query q may see key k  iff  block[k] <= block[q]
- causal:        block id = position index
- block-causal:  block id = index of the block (bidirectional inside, causal across)
- prefix:        the first P positions share block 0 (bidirectional prefix), the rest are causal
Padding is a per-key validity flag. A query always sees itself, so padded rows never go all-False
(which would make softmax NaN and poison later layers).
"""
from __future__ import annotations

import torch


def block_ids_from_sizes(length: int, block_size: int, first: int = 0, device=None) -> torch.Tensor:
    """[T] ids: the first `first` positions are causal (one block each), then blocks of `block_size`."""
    idx = torch.arange(length, device=device)
    tail = first + torch.div(idx - first, block_size, rounding_mode="floor")
    return torch.where(idx < first, idx, tail)


def block_mask(q_block: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
    """[..., Tq] x [..., Tk] block ids -> [..., Tq, Tk] bool (block-causal)."""
    return k_block.unsqueeze(-2) <= q_block.unsqueeze(-1)


def padding_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """[B, Tk] validity -> [B, 1, Tk] bool that broadcasts over queries."""
    return key_valid.unsqueeze(-2)


def attention_mask(
    q_block: torch.Tensor,  # [B, Tq]
    k_block: torch.Tensor,  # [B, Tk]
    key_valid: torch.Tensor | None = None,  # [B, Tk]
    q_index: torch.Tensor | None = None,  # [Tq] absolute index of each query among the keys
) -> torch.Tensor:
    """Full SDPA mask [B, 1, Tq, Tk]: block-causal AND key padding, OR the query itself."""
    m = block_mask(q_block, k_block)  # [B, Tq, Tk]
    if key_valid is not None:
        tq, tk = q_block.shape[-1], k_block.shape[-1]
        if q_index is None:
            q_index = torch.arange(tk - tq, tk, device=q_block.device)
        self_ = q_index.unsqueeze(-1) == torch.arange(tk, device=q_block.device)  # [Tq, Tk]
        m = m & (padding_mask(key_valid) | self_)
    return m.unsqueeze(1)
