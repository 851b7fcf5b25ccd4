"""Static KV cache for generation. It owns the invariants of what has been decoded so far: per slot
the keys/values of every layer, the RoPE position, the block id and whether the slot is real (not
padding). `Transformer.forward(..., cache=c)` calls `append` once per forward (which records the new
slots' facts and returns their positions and the attention mask), `write` once per layer and `advance`
at the end, so cached decoding computes exactly what the uncached forward computes.
"""
from __future__ import annotations

import torch

from models.masks import attention_mask


class KVCache:
    """Preallocated keys/values (one [B, K, S_max, E] tensor per layer: a compiled step writes each in place, where
    one [L, ...] tensor would be copied whole) plus per-slot positions, block ids and validity.

    Defaults for new slots: the position continues each row's last real position (so a left-padded
    prompt decodes as if it had no padding), the block id continues the last block id (one new block
    per slot: causal), and the slot is valid.
    """

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, batch: int, max_len: int,
                 dtype=torch.float32, device=None):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]  # L x [B, K, S_max, E]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block = torch.zeros(batch, max_len, dtype=torch.long, device=device)  # [B, S_max]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # [B, S_max]
        self.next_position = torch.zeros(batch, 1, dtype=torch.long, device=device)  # [B, 1]
        self.batch, self.max_len = batch, max_len
        self.reset()

    def reset(self) -> None:
        """Forget everything (the buffers are reused)."""
        self.pos = 0  # filled slots
        self.has_padding = False  # some filled slot is not valid
        self.custom_blocks = False  # some block ids were not the causal default
        self.valid.fill_(True)
        self.next_position.zero_()

    def append(self, t: int, position_ids: torch.Tensor | None = None, block_ids: torch.Tensor | None = None,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """Record t new slots; return their position ids [B, T] and SDPA's (mask, is_causal) over all
        filled slots. position_ids / block_ids / valid are [B, T] (None = the defaults above)."""
        start, end = self.pos, self.pos + t
        if end > self.max_len:
            raise ValueError(f"sequence of {end} positions exceeds the KV cache length {self.max_len}")
        dev = self.block.device
        if valid is not None and bool(valid.all()):
            valid = None
        if valid is not None:
            self.valid[:, start:end] = valid
            self.has_padding = True
        if position_ids is None:
            steps = valid.long().cumsum(-1) - 1 if valid is not None else torch.arange(t, device=dev)
            position_ids = (self.next_position + steps).clamp(min=0).expand(self.batch, t)
        last = self.block[:, start - 1:start] if start else torch.full((self.batch, 1), -1, device=dev)
        default_blocks = last + 1 + torch.arange(t, device=dev)  # [B, T]
        if block_ids is None:
            block_ids = default_blocks
        elif not torch.equal(block_ids, default_blocks.expand_as(block_ids)):
            self.custom_blocks = True
        self.block[:, start:end] = block_ids
        if valid is None:
            self.next_position = position_ids[:, -1:] + 1
        else:  # a row whose new slots are all padding keeps its next position
            self.next_position = torch.where(valid.any(-1, keepdim=True), position_ids[:, -1:] + 1, self.next_position)
        if not self.has_padding and not self.custom_blocks:  # plain causal: SDPA's fast paths
            if t == 1:
                return position_ids, None, False  # one query sees every filled slot
            if start == 0:
                return position_ids, None, True
        key_valid = self.valid[:, :end] if self.has_padding else None
        mask = attention_mask(self.block[:, start:end], self.block[:, :end], key_valid,
                              torch.arange(start, end, device=dev))
        return position_ids, mask, False

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, K, T, E] in the slots `append` recorded; return all filled keys/values [B, K, S, E]."""
        end = self.pos + k.shape[2]
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, t: int) -> None:
        self.pos += t

    def snapshot(self) -> tuple:
        """What `restore` needs to forget every slot appended after this call (their keys/values are
        simply overwritten later): lets a sampler run trial forwards (e.g. flow-matching steps) on top
        of a fixed cached context."""
        return self.pos, self.has_padding, self.custom_blocks, self.next_position.clone()

    def restore(self, state: tuple) -> None:
        self.pos, self.has_padding, self.custom_blocks, nxt = state
        self.next_position = nxt.clone()


class StaticCacheView:
    """A `KVCache` seen by one compiled decoding step: fixed shapes, no Python-int state.

    `Transformer.forward(ids [B, 1], cache=view)` runs unchanged on it: `append` gives the step's positions and a
    validity mask over the WHOLE preallocated cache ([B, 1, 1, S_max]: slot < end and slot valid), `write` stores
    the new keys/values in place with `index_copy_` at `pos` and returns the whole cache (no slicing copy), and
    `advance` does nothing (the caller moves `pos` on). `pos` is a tensor, so one compiled graph serves every step.
    Causal decoding after a prefill only (one new slot per step, default block ids); the slots past the prefill
    are valid, as `KVCache` leaves them.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor,
                 position_ids: torch.Tensor):
        self.k, self.v = k, v  # L x [B, K, S_max, E], a KVCache's buffers
        self.pos, self.position_ids = pos, position_ids  # [1] the slot written now; [B, 1] its RoPE positions
        self.max_len = k[0].shape[2]
        slots = torch.arange(self.max_len, device=pos.device)  # [S_max]
        self.mask = (valid & (slots <= pos))[:, None, None, :]  # [B, 1, 1, S_max]: filled, real slots

    def append(self, t: int, position_ids=None, block_ids=None, valid=None):
        if t != 1 or position_ids is not None or block_ids is not None or valid is not None:
            raise ValueError("a static decoding step takes one new token per row, default positions and blocks")
        return self.position_ids, self.mask, False

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [B, K, 1, E] at slot `pos`; return the whole cache of this layer [B, K, S_max, E]."""
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]

    def advance(self, t: int) -> None:
        pass
