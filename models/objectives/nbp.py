"""Next-block prediction (NBP, "Next Block Prediction: Video Generation via Semi-Autoregressive Modeling").

The visual codes of a text->video (or text->image) sample are cut into blocks of `block_size` tokens
(1 = one token, a latent row, a latent frame, any divisor of the code count). Attention is block-causal:
bidirectional inside a block, causal across blocks, and the text condition is visible to every block.
Targets are shifted by one block: the token at position p of block b predicts position p of block b+1.

The first block needs inputs of its own; two ways, as in the paper's code:
- `first_block="condition"` (default here; not the paper's setting: its 48-step K600 model predicts frames given
  2 real frames, and its 95-step UCF model is the hybrid below): a block of
  `block_size` copies of `<boi>` after the caption predicts block 0 in one step. Sampling takes one
  forward per block.
- `first_block="tokens"` (the paper's hybrid scheme): block 0 is predicted token by token (causal),
  then a bridge block [last token of block 0, `<boi>` x (block_size - 1)] predicts block 1, and so on.
  Sampling takes block_size - 1 + number of blocks forwards.
With block_size 1 both are exactly next-token prediction on the visual codes.

Layout of one training input (cond mode; P = caption prefix, left-padded so every row's codes share columns):
    [pad.. <bos> <t2i> caption] [<boi> x B] [z_0 .. z_{N-B-1}]   -> logits of the last N columns predict z_0..z_{N-1}
Only the visual codes are trained (the caption is the condition).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.objectives.base import Objective
from models.sampling import cfg_combine, sample
from models.sequence import IMAGE

FIRST_BLOCK = ("condition", "tokens")


class NextBlockPrediction(Objective):
    """Block-causal mask, one-block-shifted targets, one KV-cached forward per block when sampling.
    Text is not trained (it is the condition), so a model trained with it does not caption.

    Args:
        block_size: tokens predicted together (a block; e.g. one frame's codes), >= 1.
        first_block: condition (a block of <boi> copies predicts block 0 in one step) | tokens (block 0 token
            by token, then bridge blocks; the paper's hybrid scheme). See the module docstring.
    """

    @dataclass
    class Config:
        block_size: int = 64
        first_block: str = "condition"

    captions = False

    def __init__(self, block_size: int = 64, first_block: str = "condition"):
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if first_block not in FIRST_BLOCK:
            raise ValueError(f"first_block must be one of {FIRST_BLOCK}, got {first_block!r}")
        self.config = self.Config(block_size, first_block)

    # ---- layout -------------------------------------------------------------------------------
    def _check(self, n: int) -> int:
        b = self.config.block_size
        if n % b:
            raise ValueError(f"block_size {b} does not divide the {n} visual codes of a sample")
        return n // b

    def layout(self, prefix: list[torch.Tensor], boi: int, codes: torch.Tensor, pad_id: int = 0):
        """Training inputs for caption prefixes (each ending before <boi>) and codes [B, N] (vocabulary ids):
        ids, valid, position_ids, block_ids [B, L]; the last N columns predict `codes`."""
        bsz, n = codes.shape
        bk, nb = self.config.block_size, self._check(n)
        p = max(len(x) for x in prefix)
        dev = codes.device
        head = torch.full((bsz, p), pad_id, dtype=torch.long, device=dev)
        valid = torch.zeros(bsz, p, dtype=torch.bool, device=dev)
        for i, x in enumerate(prefix):
            if len(x):
                head[i, p - len(x):], valid[i, p - len(x):] = x, True
        boi_col = torch.full((bsz, 1), boi, dtype=torch.long, device=dev)
        if self.config.first_block == "condition":
            # [prefix][<boi> x B][z blocks 0..nb-2]: blocks p, p+1, ...
            tail = torch.cat([boi_col.expand(bsz, bk), codes[:, : n - bk]], 1)
            tail_blocks = p + torch.arange(nb * bk, device=dev) // bk
        else:
            # [prefix <boi>][z_0 .. z_{B-2} causal][z_{B-1} <boi> x (B-1)][z blocks 1..nb-2]; one block: no bridge
            parts = [boi_col, codes[:, : bk - 1]]
            if nb > 1:
                parts += [codes[:, bk - 1: bk], boi_col.expand(bsz, bk - 1), codes[:, bk: n - bk]]
            tail = torch.cat(parts, 1)
            causal = torch.arange(bk, device=dev)  # <boi> and z_0..z_{B-2}: one block each
            rest = bk + torch.arange((nb - 1) * bk, device=dev) // bk
            tail_blocks = p + torch.cat([causal, rest])
        ids = torch.cat([head, tail], 1)  # [B, L]
        valid = torch.cat([valid, torch.ones_like(tail, dtype=torch.bool)], 1)
        blocks = torch.cat([torch.arange(p, device=dev), tail_blocks]).expand(bsz, -1)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        return ids, valid, positions, blocks

    @staticmethod
    def split_batch(batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], int, torch.Tensor]:
        """(caption prefixes, <boi> id, codes [B, N]) from a collated text->visual batch (SequenceFormat):
        the visual span is the IMAGE-modality run `<boi> codes <eoi>`."""
        ids, mod = batch["ids"], batch["modality"]
        is_img = mod == IMAGE
        counts = is_img.sum(1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) < 3:
            raise ValueError("next-block prediction needs text->visual samples with the same number of codes")
        n = int(counts[0]) - 2
        start = is_img.long().argmax(1)  # column of <boi>
        boi = int(ids[0, start[0]])
        prefix = [ids[i, : int(s)] for i, s in enumerate(start)]
        cols = start[:, None] + 1 + torch.arange(n, device=ids.device)  # [B, N]
        return prefix, boi, ids.gather(1, cols)

    # ---- training ----------------------------------------------------------------------------
    def loss(self, lm, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        prefix, boi, codes = self.split_batch(batch)
        ids, valid, pos, blocks = self.layout(prefix, boi, codes)
        n = codes.shape[1]
        h = lm(ids, position_ids=pos, block_ids=blocks, valid=valid)[:, -n:]  # [B, N, D]
        logits = lm.head(h)  # [B, N, V]
        nll = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
        return {"loss": nll, "nll": nll.detach(), "nll_image": nll.detach()}

    # ---- sampling ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, lm, prompt: torch.Tensor, max_new_tokens: int | None = None, *, valid=None, temperature=None,
                 top_k=None, top_p=None, allowed=None, cfg_scale=None, stop_id=None, steps=None, sampler=None,
                 cfg_schedule=None, generator=None) -> torch.Tensor:
        """Continue text->visual prompts `... <boi>` [rows, T] (left-padded; with `cfg_scale` the
        unconditional rows follow the conditional ones) by `max_new_tokens` codes [B, N], a block per forward.
        Only visual codes are trained, so there is no text to stop on (`stop_id` is refused)."""
        self.refuse(stop_id=stop_id, steps=steps, sampler=sampler, cfg_schedule=cfg_schedule)
        temperature = 1.0 if temperature is None else temperature
        rows, t = prompt.shape
        if cfg_scale is not None and rows % 2:
            raise ValueError(f"classifier-free guidance needs conditional and unconditional rows in equal number, "
                             f"got {rows} rows")
        bk, nb = self.config.block_size, self._check(max_new_tokens)
        b = rows // 2 if cfg_scale is not None else rows
        dev = prompt.device
        boi = prompt[:, -1:]  # [rows, 1]
        valid = valid if valid is not None else torch.ones_like(prompt, dtype=torch.bool)
        cache = lm.new_cache(rows, t + max_new_tokens + bk, device=dev)
        out = torch.empty(b, max_new_tokens, dtype=torch.long, device=dev)

        def draw(h: torch.Tensor) -> torch.Tensor:  # hidden [rows, k, D] -> tokens [b, k]
            logits = lm.head(h).float()  # [rows, k, V]
            if cfg_scale is not None:
                logits = cfg_combine(logits, cfg_scale)
            k = logits.shape[1]
            tok = sample(logits.flatten(0, 1), temperature, top_k, top_p, allowed, generator)
            return tok.view(b, k)

        def feed(ids: torch.Tensor, block_ids: torch.Tensor | None = None, v: torch.Tensor | None = None):
            if cfg_scale is not None and ids.shape[0] == b:
                ids = torch.cat([ids, ids])
            return lm(ids, block_ids=block_ids, valid=v, cache=cache)

        def next_block_ids(k: int) -> torch.Tensor:  # one new block of k slots
            return (cache.block[:, cache.pos - 1: cache.pos] + 1).expand(rows, k)

        if self.config.first_block == "condition":
            ids = torch.cat([prompt, boi.expand(rows, bk - 1)], 1)  # prompt's <boi> + B-1 more: one block
            blocks = torch.arange(t + bk - 1, device=dev).clamp(max=t - 1).expand(rows, -1)
            v = torch.cat([valid, torch.ones(rows, bk - 1, dtype=torch.bool, device=dev)], 1)
            blk = draw(feed(ids, blocks, v)[:, -bk:])
            out[:, :bk] = blk
            start = 1
        else:
            h = feed(prompt, None, valid)[:, -1:]
            for j in range(bk):  # block 0 token by token
                out[:, j:j + 1] = draw(h)
                if j < bk - 1:
                    h = feed(out[:, j:j + 1])[:, -1:]
            bridge = torch.cat([out[:, bk - 1: bk], boi[:b].expand(b, bk - 1)], 1)
            if nb > 1:
                out[:, bk:2 * bk] = draw(feed(bridge, next_block_ids(bk)))
            start = 2
        for k in range(start, nb):
            prev = out[:, (k - 1) * bk: k * bk]
            out[:, k * bk:(k + 1) * bk] = draw(feed(prev, next_block_ids(bk)))
        return out
