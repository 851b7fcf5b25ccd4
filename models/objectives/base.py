"""The interface every objective implements (see models/objectives/__init__.py)."""
from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn


class Objective(nn.Module, abc.ABC):
    """Targets + loss + sampling step on top of the backbone (models.transformer.Transformer).

    Subclasses define a dataclass `Config` (their constructor arguments, stored in checkpoints) and set
    `self.config`; `loss` takes a collated batch (models.sequence.SequenceFormat.collate) and returns a
    dict with "loss" (what is optimised) and detached figures to log; `generate` continues prompts.
    """

    Config: Any
    config: Any

    @abc.abstractmethod
    def loss(self, lm: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Training loss of `lm` on a collated batch."""

    @abc.abstractmethod
    def generate(self, lm: nn.Module, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Continue `prompt` [B, T] by up to `max_new_tokens` ids [B, N] (KV-cached)."""
