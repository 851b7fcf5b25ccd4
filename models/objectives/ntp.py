"""Next-token prediction: every flagged token is predicted from the ones before it (cross-entropy)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.objectives.base import Objective, token_mean
from models.sampling import generate, make_step_fn
from models.sequence import IMAGE, TEXT


class NextTokenPrediction(Objective):
    """Cross-entropy on the next token, on positions whose loss flag is set.

    `text_weight` scales text tokens against image tokens in the loss (1 = every token counts the
    same): a caption has ~6 tokens against an image's 49, so captioning otherwise gets a small share
    of the gradient. `prior` (train.prior.PriorWeighting, training only: not stored with the model)
    further weights each caption token of image->text samples by how much it needs the image. The
    reported `nll` is always the plain per-token mean, so runs compare.

    Args:
        text_weight: weight of text tokens relative to image tokens (> 0; 1 = all equal).
        prior: a caption-token weighting module, e.g. train.prior.PriorWeighting (PRIOR's weights from a text-only
            reference LM): `bind(tokenizer, class_names)`, then `(ids, flag, modality) -> (weights [B, T-1], figures)`.
    """

    compiles = True

    @dataclass
    class Config:
        text_weight: float = 1.0

    def __init__(self, text_weight: float = 1.0, prior: nn.Module | None = None):
        super().__init__()
        if not text_weight > 0:
            raise ValueError(f"text_weight must be > 0, got {text_weight}")
        self.config = self.Config(text_weight)
        self.prior = prior

    def bind(self, tokenizer, class_names: list[str] = ()) -> None:
        if self.prior is not None:
            self.prior.bind(tokenizer, class_names)

    def loss(self, lm, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ids, flag, modality = batch["ids"], batch["loss"], batch["modality"]
        # Right padding under a causal mask: real tokens never see the padding, so no mask is needed.
        pos = batch.get("position_ids")
        h = lm(ids[:, :-1], position_ids=None if pos is None else pos[:, :-1])  # [B, T-1, D]
        logits = lm.head(h)  # [B, T-1, V]
        target, flag, mod = ids[:, 1:], flag[:, 1:], modality[:, 1:]
        tok_loss = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none").view_as(target)
        weight = flag * torch.where(mod == TEXT, self.config.text_weight, 1.0)  # [B, T-1]
        figures = {}
        if self.prior is not None and torch.is_grad_enabled():  # training only: validation nll stays plain
            prior_w, figures = self.prior(ids, batch["loss"], modality)  # [B, T-1]
            weight = weight * prior_w
        out = {**figures, "loss": token_mean((tok_loss * weight).sum(), weight.sum()),
               "nll": (tok_loss * flag).sum().detach() / flag.sum().clamp(min=1)}
        for name, m in (("text", TEXT), ("image", IMAGE)):
            sel = flag & (mod == m)
            out[f"nll_{name}"] = (tok_loss * sel).sum().detach() / sel.sum().clamp(min=1)
        return out

    def generate(self, lm, prompt: torch.Tensor, max_new_tokens: int | None = None, *, valid=None, temperature=None,
                 top_k=None, top_p=None, allowed=None, cfg_scale=None, stop_id=None, steps=None, sampler=None,
                 cfg_schedule=None, generator=None, compile: bool = False) -> torch.Tensor:
        """Token by token through the KV cache (models.sampling.generate); flow steps and samplers do not apply.

        `compile=True`: every token after the prompt through the compiled static-cache step
        (make_step_fn(static=True, compile=True)); the same tokens, compiled once per batch shape."""
        self.refuse(steps=steps, sampler=sampler, cfg_schedule=cfg_schedule)
        step_fn = make_step_fn(lm, static=True, compile=True) if compile else None
        return generate(lm, prompt, max_new_tokens, valid=valid, temperature=1.0 if temperature is None else temperature,
                        top_k=top_k, top_p=top_p, allowed=allowed, cfg_scale=cfg_scale, stop_id=stop_id,
                        generator=generator, step_fn=step_fn)
