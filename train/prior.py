"""PRIOR: weight each caption token by how much it needs the image (DESIGN §5, "Prioritizing Image-Related
Tokens"; no released code).

A text-only reference LM, trained on the captions alone and frozen, gives each caption token its probability
from the text before it; the weight is `w_i = max((1 - P_ref(t_i | t_<i))^alpha, floor)`, normalised per
caption so that the weights of its tokens average 1. Tokens the text alone predicts (templates, fillers,
grammar) count less; tokens only the image can tell (which item, where) count more. The weights apply only to
the caption tokens of image->text samples (never to image codes, prompts or text->image samples), so the loss
equals plain next-token prediction wherever they do not apply and when every weight is 1.

The reference model is any inference folder or .ckpt of our LM trained on the same text tokenizer
(`configs/*_prior_ref.yaml` trains one on a data module's captions). It is kept outside the module's
parameters and state: it is not trained, not optimised and not saved with the model it helps train.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.sequence import caption_targets


def prior_weights(p_ref: torch.Tensor, sel: torch.Tensor, alpha: float = 1.0, floor: float = 0.05) -> torch.Tensor:
    """Weights [B, T] from reference probabilities `p_ref` [B, T] at the caption positions `sel` [B, T] (one
    caption per row): `max((1 - p)^alpha, floor)` normalised to mean 1 over each row's caption; 1 elsewhere."""
    raw = (1.0 - p_ref.float()).clamp(min=0.0).pow(alpha).clamp(min=floor) * sel  # [B, T]
    count = sel.sum(1, keepdim=True)  # [B, 1]
    norm = raw * count / raw.sum(1, keepdim=True).clamp(min=1e-12)
    return torch.where(sel, norm, torch.ones_like(norm))


class PriorWeighting(nn.Module):
    """The PRIOR loss component of next-token prediction (models.objectives.ntp): per-token caption weights from
    a frozen reference LM.

    Args:
        reference: the text-only reference model (inference folder or .ckpt), trained with the same text
            tokenizer as the model being trained.
        alpha: exponent of `1 - P_ref` (1: the paper's form).
        floor: smallest raw weight, so no caption token is ignored completely.
        cache: keep each caption's reference probabilities in memory after the first visit (captions repeat
            every epoch); off: run the reference model on every batch.
    """

    def __init__(self, reference: str, alpha: float = 1.0, floor: float = 0.05, cache: bool = True):
        super().__init__()
        if not alpha > 0:
            raise ValueError(f"prior alpha must be > 0, got {alpha}")
        if not 0 < floor <= 1:
            raise ValueError(f"prior floor must be in (0, 1], got {floor}")
        from models.bundle import load_bundle  # the reference is a bundle like any other model

        if not Path(reference).exists():
            raise FileNotFoundError(f"{reference}: PRIOR reference model not found (train it with a *_prior_ref recipe)")
        ref = load_bundle(reference)
        ref.lm.eval().requires_grad_(False)
        self.reference, self.alpha, self.floor, self.use_cache = reference, alpha, floor, cache
        self._ref = [ref]  # a list: not a submodule, so never trained, optimised or saved with the model
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.item_ids: torch.Tensor | None = None  # token ids that occur in item names (for the logged share)

    @property
    def ref(self):
        return self._ref[0]

    def bind(self, tokenizer, item_names: list[str] = ()) -> None:
        """Check that the model being trained reads text with the reference's tokenizer; note item-name tokens."""
        if tokenizer.to_json() != self.ref.tokenizer.to_json():
            raise ValueError(f"{self.reference}: the PRIOR reference model was trained with another text tokenizer; "
                             f"train both on the same tokenizer.json (data.text_tokenizer)")
        ids = {i for name in item_names for w in (name, " " + name) for i in tokenizer.encode(w)}
        self.item_ids = torch.tensor(sorted(ids), dtype=torch.long)

    @torch.no_grad()
    def _reference_probs(self, captions: list[list[int]], device) -> list[torch.Tensor]:
        """P_ref of each token of each caption (its ids end with <eos>) given <bos> and the tokens before it."""
        out: list[torch.Tensor | None] = [self._cache.get(tuple(c)) if self.use_cache else None for c in captions]
        todo = [i for i, p in enumerate(out) if p is None]
        if todo:
            lm = self.ref.lm.to(device)
            bos, pad = self.ref.tokenizer.bos_id, self.ref.tokenizer.pad_id
            t = max(len(captions[i]) for i in todo)
            x = torch.full((len(todo), t), pad, dtype=torch.long, device=device)  # [N, t]: <bos> c_1 .. c_{k-1}
            y = torch.full((len(todo), t), pad, dtype=torch.long, device=device)  # [N, t]: c_1 .. c_k
            for r, i in enumerate(todo):
                c = torch.tensor(captions[i], device=device)
                x[r, 0], x[r, 1:len(c)], y[r, :len(c)] = bos, c[:-1], c
            probs = lm.head(lm(x)).float().softmax(-1).gather(-1, y[..., None])[..., 0]  # [N, t]; right padding
            for r, i in enumerate(todo):
                out[i] = probs[r, :len(captions[i])].cpu()
                if self.use_cache:
                    self._cache[tuple(captions[i])] = out[i]
        return out

    def forward(self, ids: torch.Tensor, flag: torch.Tensor, modality: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weights [B, T-1] for the next-token targets of a batch, figures to log)."""
        target = ids[:, 1:]
        sel = caption_targets(ids, flag, modality, self.ref.tokenizer)  # [B, T-1]
        p_ref = torch.zeros(target.shape, device=ids.device)
        rows = sel.any(1).nonzero()[:, 0].tolist()
        if rows:
            probs = self._reference_probs([target[r][sel[r]].tolist() for r in rows], ids.device)
            for r, p in zip(rows, probs):
                p_ref[r, sel[r]] = p.to(ids.device)
        w = prior_weights(p_ref, sel, self.alpha, self.floor)
        stats = {}
        if rows:
            ws = w[sel]
            stats = {"prior_w_mean": ws.mean(), "prior_w_min": ws.min(), "prior_w_max": ws.max()}
            if self.item_ids is not None and len(self.item_ids):
                item = torch.isin(target, self.item_ids.to(ids.device)) & sel
                stats["prior_item_weight_share"] = w[item].sum() / ws.sum()
        return w, {k: v.detach() for k, v in stats.items()}
