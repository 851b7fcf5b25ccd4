"""The interface every objective implements (see models/objectives/__init__.py)."""
from __future__ import annotations

import abc
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def token_mean(total: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`total / weight` where `weight` is this process's share of a token count, made right under DDP.

    DDP averages gradients over ranks; dividing each rank's sum by its own count would weight a token
    by 1 / (its rank's count), so ranks with fewer tokens would count more. Dividing by the mean count
    over ranks makes the averaged gradient that of one process on the whole global batch.
    """
    weight = weight.detach().clamp(min=1e-6)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and total.requires_grad:
        weight = weight.clone()
        dist.all_reduce(weight)
        weight = weight / dist.get_world_size()
    return total / weight


class Objective(nn.Module, abc.ABC):
    """Targets + loss + sampling step on top of the backbone (models.transformer.Transformer).

    Subclasses define a dataclass `Config` (their constructor arguments, stored in checkpoints) and set
    `self.config`; `loss` takes a collated batch (models.sequence.SequenceFormat.collate) and returns a
    dict with "loss" (what is optimised) and detached figures to log; `generate` continues prompts.
    """

    Config: Any
    config: Any
    captions: bool = True  # a model trained with it captions images (text is trained token by token)
    continuous: bool = False  # it draws continuous latents, not token ids
    compiles: bool = False  # its generate takes compile=True (the compiled static-cache decoding step)

    def bind(self, tokenizer, class_names: list[str] = ()) -> None:
        """Called by the training module with its data's text tokenizer and class names; a no-op unless an
        objective's parts depend on them (PRIOR's reference model must share the tokenizer)."""

    @abc.abstractmethod
    def loss(self, lm: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training loss of `lm` on a collated batch."""

    @abc.abstractmethod
    def generate(self, lm: nn.Module, prompt: torch.Tensor, max_new_tokens: int | None = None, *,
                 valid: torch.Tensor | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, allowed: torch.Tensor | None = None, cfg_scale: float | None = None,
                 stop_id: int | None = None, steps: int | None = None, sampler: str | None = None,
                 cfg_schedule: str | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue `prompt` [B, T] (left-padded where `valid` is False; with `cfg_scale` the unconditional rows
        follow the conditional ones) by up to `max_new_tokens` ids [B, N], KV-cached. Every objective takes
        these options; one it cannot honour raises ValueError (`refuse`) instead of being ignored."""

    def refuse(self, **options) -> None:
        """ValueError naming the first option given (not None) that this objective cannot honour."""
        for name, value in options.items():
            if value is not None:
                raise ValueError(f"{type(self).__name__} does not take {name} (got {value!r})")
