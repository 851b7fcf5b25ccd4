"""SEED's losses that are more than one line: the image-text contrastive loss of stage 1."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Every process's x [B, ...] concatenated along dim 0, [W * B, ...], with gradient flowing back to each
    process's own rows, and this process's row offset; (x, 0) when not distributed (or a world of one)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x)), dist.get_rank() * x.shape[0]
    return x, 0


def contrastive_loss(img: Tensor, txt: Tensor, temp: Tensor, label_smoothing: float = 0.1) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE over matching pairs; img, txt [B, K] L2-normalised -> (loss, in-batch logits [B, B]).

    Under DDP the negatives are every process's pairs (as BLIP-2 / SEED gather them): this process's images
    against all W * B texts and its texts against all images; the mean of the per-process losses is then the
    loss of the whole global batch. The returned logits are this process's own [B, B] block (for metrics).
    Label smoothing 0.1 and the learnable temperature come from SEED's official code (BLIP-2's ITC).
    """
    img_all, offset = gather_with_grad(img)  # [W * B, K]
    txt_all, _ = gather_with_grad(txt)
    target = torch.arange(len(img), device=img.device) + offset
    i2t = img @ txt_all.t() / temp  # [B, W * B]: image i vs every text
    t2i = txt @ img_all.t() / temp
    loss = (F.cross_entropy(i2t, target, label_smoothing=label_smoothing)
            + F.cross_entropy(t2i, target, label_smoothing=label_smoothing)) / 2
    return loss, i2t[:, offset:offset + len(img)]
