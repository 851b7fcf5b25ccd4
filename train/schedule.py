"""Optimizer + cosine-with-warmup schedule shared by every training module."""
from __future__ import annotations

import math

import torch


def adamw_cosine(module: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                 warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1):
    """AdamW (decay on matrices only) with linear warmup then cosine decay to min_lr_ratio * lr."""
    params = [p for p in module.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=betas)
    total = max(total_steps, warmup_steps + 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / (total - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return opt, {"scheduler": sched, "interval": "step"}
