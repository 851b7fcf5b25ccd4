"""PRIOR: weight each caption token by how much it needs the image (DESIGN §5, "Prioritizing Image-Related
Tokens"; no released code).

A text-only reference LM, trained on the captions alone and frozen, gives each caption token its probability
from the text before it; the weight is the paper's `w_i = (1 - P_ref(t_i | t_<i))^alpha` (alpha 1), optionally
raised to a `floor` (`max(., floor)`: an ablation, 0 by default as in the paper), normalised per caption so that
the weights of its tokens average 1. Tokens the text alone predicts (templates, fillers, grammar) count less;
tokens only the image can tell (which item, where) count more. The weights apply only to the caption tokens of
image->text samples (never to image codes, prompts or text->image samples), so the loss equals plain next-token
prediction wherever they do not apply and when every weight is 1.

The reference model is any inference folder or .ckpt of our LM trained on the same text tokenizer
(`configs/*_prior_ref.yaml` trains one on a data module's captions). It is kept outside the module's
parameters and state: it is not trained, not optimised and not saved with the model it helps train.

Oracle control (`oracle_words`, no reference model): raw weight 1 on the tokens of the given words (the class
words) and 0 on every other caption token, normalised per caption the same way: what PRIOR would give if the
reference knew the text perfectly and the class words not at all.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from models.sequence import caption_targets


def normalise_per_caption(raw: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Raw weights [B, T] (>= 0) at the caption positions `sel` [B, T] (one caption per row), scaled to mean 1
    over each row's caption; 1 elsewhere. A caption whose raw weights are all 0 (every token certain under the
    reference with no floor, or no oracle word in it) has nothing to prefer: it keeps weight 1 on every token
    (plain next-token prediction for that caption), never NaN; so every caption's weights always average 1."""
    raw = raw.float() * sel
    total = raw.sum(1, keepdim=True)  # [B, 1]
    count = sel.sum(1, keepdim=True)  # [B, 1]
    norm = torch.where(total > 0, raw * count / torch.where(total > 0, total, 1.0), 1.0)
    return torch.where(sel, norm, torch.ones_like(norm))


def prior_weights(p_ref: torch.Tensor, sel: torch.Tensor, alpha: float = 1.0, floor: float = 0.0) -> torch.Tensor:
    """Weights [B, T] from reference probabilities `p_ref` [B, T] at the caption positions `sel` [B, T] (one
    caption per row): `max((1 - p)^alpha, floor)` normalised to mean 1 over each row's caption (floor 0: the
    paper's `1 - p`); 1 elsewhere. A caption whose raw weights are all 0: see `normalise_per_caption`."""
    raw = (1.0 - p_ref.float()).clamp(min=0.0).pow(alpha).clamp(min=floor)  # [B, T]
    return normalise_per_caption(raw, sel)


def word_token_ids(tokenizer, words) -> list[int]:
    """Sorted ids of every token of `words` as a caption spells them (with and without a leading space)."""
    return sorted({i for word in words for w in (word, " " + word) for i in tokenizer.encode(w)})


class PriorWeighting(nn.Module):
    """The PRIOR loss component of next-token prediction (models.objectives.ntp): per-token caption weights from
    a frozen reference LM, or (`oracle_words`) from a fixed list of class words.

    Args:
        reference: the text-only reference model (inference folder or .ckpt), trained with the same text
            tokenizer as the model being trained. Required unless `oracle_words` is given.
        alpha: exponent of `1 - P_ref` (1: the paper's form).
        floor: smallest raw weight, in [0, 1]; 0 (default): the paper's formula; > 0 (e.g. 0.05, this
            project's first setting): an ablation so that no caption token is ignored completely.
        cache: keep each caption's reference probabilities in memory after the first visit (captions repeat
            every epoch); off: run the reference model on every batch.
        oracle_words: the oracle control instead of a reference: raw weight 1 on every token of these words (as a
            caption tokenises them, with and without a leading space), 0 on every other caption token,
            normalised per caption like PRIOR's (a caption with none of them keeps weight 1 everywhere).
    """

    def __init__(self, reference: str | None = None, alpha: float = 1.0, floor: float = 0.0, cache: bool = True,
                 oracle_words: list[str] | None = None):
        super().__init__()
        if reference is None and not oracle_words:
            raise ValueError("PriorWeighting needs a reference model (reference) or an oracle word list (oracle_words)")
        if reference is not None and oracle_words:
            raise ValueError("PriorWeighting takes a reference model or oracle_words, not both")
        if not alpha > 0:
            raise ValueError(f"prior alpha must be > 0, got {alpha}")
        if not 0 <= floor <= 1:
            raise ValueError(f"prior floor must be in [0, 1], got {floor}")
        self.reference, self.alpha, self.floor, self.use_cache = reference, alpha, floor, cache
        self.oracle_words = list(oracle_words) if oracle_words else None
        self._ref = []  # a list: not a submodule, so never trained, optimised or saved with the model
        if reference is not None:
            from models.bundle import load_bundle  # the reference is a bundle like any other model

            if not Path(reference).exists():
                raise FileNotFoundError(f"{reference}: PRIOR reference model not found "
                                        f"(train it with a *_prior_ref recipe)")
            ref = load_bundle(reference)
            ref.lm.eval().requires_grad_(False)
            self._ref.append(ref)
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        self.tokenizer = self.ref.tokenizer if self._ref else None  # the oracle's comes from bind
        self.item_ids: torch.Tensor | None = None  # token ids that occur in item names (for the logged share)
        self.oracle_ids: torch.Tensor | None = None  # token ids of oracle_words (set by bind)

    @property
    def ref(self):
        if not self._ref:
            raise RuntimeError("this PriorWeighting is an oracle (oracle_words): it has no reference model")
        return self._ref[0]

    def bind(self, tokenizer, item_names: list[str] = ()) -> None:
        """Check that the model being trained reads text with the reference's tokenizer (oracle: take that
        tokenizer and its ids of the oracle words); note item-name tokens."""
        if self._ref and tokenizer.to_json() != self.ref.tokenizer.to_json():
            raise ValueError(f"{self.reference}: the PRIOR reference model was trained with another text tokenizer; "
                             f"train both on the same tokenizer.json (data.text_tokenizer)")
        self.tokenizer = tokenizer
        self.item_ids = torch.tensor(word_token_ids(tokenizer, item_names), dtype=torch.long)
        if self.oracle_words:
            self.oracle_ids = torch.tensor(word_token_ids(tokenizer, self.oracle_words), dtype=torch.long)

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
        if self.tokenizer is None or (self.oracle_words and self.oracle_ids is None):
            raise RuntimeError("PriorWeighting.bind(tokenizer, class_names) must be called before use")
        target = ids[:, 1:]
        sel = caption_targets(ids, flag, modality, self.tokenizer)  # [B, T-1]
        rows = sel.any(1).nonzero()[:, 0].tolist()
        if self.oracle_words:
            w = normalise_per_caption(torch.isin(target, self.oracle_ids.to(ids.device)), sel)
        else:
            p_ref = torch.zeros(target.shape, device=ids.device)
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
