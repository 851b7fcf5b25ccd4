"""The sequence format: the one place that says how samples and prompts are laid out as token ids.

Training (train/) builds samples with it and generation (generate/) builds prompts with it, and every
inference prompt is literally the first part of a training sample of the same task:

    text->image:  <bos> <t2i> caption <boi> v_1 .. v_N <eoi> <eos>     prompt: <bos> <t2i> caption <boi>
    unconditional <bos> <t2i> <boi> v_1 .. v_N <eoi> <eos>             prompt: <bos> <t2i> <boi>
    image->text:  <bos> <i2t> <boi> v_1 .. v_N <eoi> caption <eos>     prompt: <bos> <i2t> <boi> v.. <eoi>
    continuous:   <bos> <i2t> <boi> [N slots] <eoi> caption <eos>      (projector outputs at the N slots)

The task token after <bos> tells the tasks apart: without it a caption-dropped text->image sample
starts exactly like an image->text one, so the model learns that an image may end the text
(empty captions) and the unconditional share of image spans is far above the configured drop rate.
The caption of a text->image sample is dropped (the unconditional form, used for classifier-free
guidance) with probability `p_drop_caption`; the two tasks are drawn with `p_caption_first`.

Every position carries: token id, modality id, loss flag, position id, block id (causal: the
position) and whether it is real or padding. No Lightning here: generation imports this module.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from models.text_tokenizer import TextTokenizer
from models.vocab import VocabLayout

TEXT, IMAGE = 0, 1  # modality ids


@dataclass
class SequenceConfig:
    max_len: int = 128  # longest sample in tokens (checked when a sample is built)
    p_caption_first: float = 0.5  # share of text->image samples (the rest are image->text)
    p_drop_caption: float = 0.1  # text->image samples whose caption is dropped (guidance)

    def __post_init__(self) -> None:
        for name in ("p_caption_first", "p_drop_caption"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.max_len < 4:
            raise ValueError(f"max_len must be >= 4, got {self.max_len}")


@dataclass
class Sample:
    ids: torch.Tensor  # [T] long
    loss: torch.Tensor  # [T] bool: this token is a prediction target
    modality: torch.Tensor  # [T] long (TEXT / IMAGE)
    task: str  # "t2i" | "i2t" | "text"
    conditional: bool  # False for a caption-dropped text->image sample


class SequenceFormat:
    """Builds training samples, inference prompts and padded batches for one tokenizer + vocabulary."""

    def __init__(self, tokenizer: TextTokenizer, layout: VocabLayout, cfg: SequenceConfig | None = None):
        self.tok, self.layout, self.cfg = tokenizer, layout, cfg or SequenceConfig()

    # ---- pieces ---------------------------------------------------------------------------------
    def caption_ids(self, caption: str, where: str = "caption") -> list[int]:
        if not caption.strip():
            raise ValueError(f"{where}: empty caption")
        return self.tok.encode(caption)

    def image_ids(self, codes: torch.Tensor) -> list[int]:
        """`v_1 .. v_N` for codes of any shape (flattened row-major)."""
        return self.layout.image_to_ids(codes.flatten().long()).tolist()

    # ---- inference prompts -------------------------------------------------------------------------
    def t2i_prompt(self, caption: str | None) -> list[int]:
        """`<bos> <t2i> caption <boi>`; caption None gives the unconditional prompt `<bos> <t2i> <boi>`."""
        text = [] if caption is None else self.caption_ids(caption, "prompt")
        return [self.tok.bos_id, self.tok.t2i_id, *text, self.tok.boi_id]

    def caption_prompt(self, codes: torch.Tensor) -> list[int]:
        """`<bos> <i2t> <boi> codes <eoi>`."""
        return [self.tok.bos_id, self.tok.i2t_id, self.tok.boi_id, *self.image_ids(codes), self.tok.eoi_id]

    # ---- continuous image inputs (vision_tokenizers/projectors.py) -------------------------------------
    # An image read as N vectors (codebook embeddings, pooled ViT features) has the same layout with N
    # embedding slots inside <boi> .. <eoi>: `<bos> <i2t> <boi> [N slots] <eoi> caption <eos>`. Slots hold
    # <pad> as a placeholder id that the vectors replace; the token count is the span's length.
    def caption_prompt_slots(self, n: int) -> list[int]:
        """`<bos> <i2t> <boi> [n slots] <eoi>`: the captioning prompt for an image read as n vectors."""
        return [self.tok.bos_id, self.tok.i2t_id, self.tok.boi_id, *[self.tok.pad_id] * n, self.tok.eoi_id]

    def i2t_slots_sample(self, n: int, caption: str, where: str = "sample") -> Sample:
        """The image->text training sample with n embedding slots (loss on the caption and <eos> only)."""
        s = self.i2t_sample(torch.zeros(n, dtype=torch.long), caption, where)
        s.ids[3:3 + n] = self.tok.pad_id
        s.loss[3:3 + n] = False  # vectors are inputs, never targets
        return s

    def image_slots(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, T] ids -> [B, T] bool, True strictly inside each `<boi> .. <eoi>` span (image codes or slots)."""
        depth = (ids == self.tok.boi_id).long().cumsum(-1) - (ids == self.tok.eoi_id).long().cumsum(-1)
        return (depth > 0) & (ids != self.tok.boi_id)

    # ---- training samples ------------------------------------------------------------------------
    def t2i_sample(self, codes: torch.Tensor, caption: str | None, where: str = "sample",
                   caption_loss: bool = True) -> Sample:
        """`<bos> <t2i> caption <boi> codes <eoi> <eos>`; `caption_loss` False: only the codes, <eoi> and <eos>
        are targets (the caption is the condition alone, as for text->video)."""
        prompt = self.t2i_prompt(caption)
        rest = [*self.image_ids(codes), self.tok.eoi_id, self.tok.eos_id]
        modality = [TEXT] * (len(prompt) - 1) + [IMAGE] * len(rest) + [TEXT]  # <boi> .. <eoi> are IMAGE
        s = self._sample(prompt + rest, modality, "t2i", caption is not None, where)
        if not caption_loss:
            s.loss[:len(prompt)] = False
        return s

    def i2t_sample(self, codes: torch.Tensor, caption: str, where: str = "sample") -> Sample:
        prompt = self.caption_prompt(codes)
        rest = [*self.caption_ids(caption, where), self.tok.eos_id]
        modality = [TEXT, TEXT] + [IMAGE] * (len(prompt) - 2) + [TEXT] * len(rest)
        return self._sample(prompt + rest, modality, "i2t", True, where)

    def text_sample(self, caption: str, where: str = "sample") -> Sample:
        """`<bos> caption <eos>`, text only: what PRIOR's reference model learns (train/prior.py reads its
        probabilities for a caption's tokens from `<bos> c_1 .. c_k-1` the same way)."""
        ids = [self.tok.bos_id, *self.caption_ids(caption, where), self.tok.eos_id]
        s = self._sample(ids, [TEXT] * len(ids), "text", True, where)
        s.loss[1] = True  # no task token: every token after <bos> is predicted
        return s

    def drop_caption(self, caption: str, rng: random.Random, where: str = "sample") -> str | None:
        """The caption of a text->image sample, or None (dropped: the unconditional form) with p_drop_caption.
        The one place the guidance drop is drawn; an empty caption is an error even when it would be dropped."""
        if rng.random() >= self.cfg.p_drop_caption:
            return caption
        self.caption_ids(caption, where)
        return None

    def build(self, codes: torch.Tensor, caption: str, rng: random.Random, where: str = "sample",
              slots: bool = False) -> Sample:
        """One training sample from image codes and a caption: task and guidance drop drawn from `rng`.
        `slots`: an image->text sample holds len(codes) embedding slots instead (i2t_slots_sample)."""
        if rng.random() < self.cfg.p_caption_first:
            return self.t2i_sample(codes, self.drop_caption(caption, rng, where), where)
        if slots:
            return self.i2t_slots_sample(codes.numel(), caption, where)
        return self.i2t_sample(codes, caption, where)

    def _sample(self, ids: list[int], modality: list[int], task: str, conditional: bool, where: str) -> Sample:
        if len(ids) > self.cfg.max_len:
            raise ValueError(f"{where}: sequence of {len(ids)} tokens exceeds max_len {self.cfg.max_len}")
        loss = torch.ones(len(ids), dtype=torch.bool)
        loss[:2] = False  # <bos> and the task token are given, never predicted
        return Sample(torch.tensor(ids), loss, torch.tensor(modality), task, conditional)

    # ---- batches ---------------------------------------------------------------------------------
    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sample: ids, loss, modality, valid, position_ids, block_ids [B, T].
        Padding has the pad id, no loss and valid=False; block ids are causal (one block per position)."""
        t = max(len(s.ids) for s in samples)
        b = len(samples)
        ids = torch.full((b, t), self.tok.pad_id, dtype=torch.long)
        loss = torch.zeros((b, t), dtype=torch.bool)
        modality = torch.zeros((b, t), dtype=torch.long)
        valid = torch.zeros((b, t), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s.ids)
            ids[i, :n], loss[i, :n], modality[i, :n], valid[i, :n] = s.ids, s.loss, s.modality, True
        positions = torch.arange(t).expand(b, t)
        return {"ids": ids, "loss": loss, "modality": modality, "valid": valid,
                "position_ids": positions, "block_ids": positions}


# ---- reading batches back ---------------------------------------------------------------------------
def is_i2t(ids: torch.Tensor, tok: TextTokenizer) -> torch.Tensor:
    """[B, T] ids laid out by this format -> [B] bool, True for image->text rows: the one place a batch's task is
    read back (from the task token after <bos>); no module guesses it from the ids itself."""
    return ids[:, 1] == tok.i2t_id


def caption_targets(ids: torch.Tensor, flag: torch.Tensor, modality: torch.Tensor, tok: TextTokenizer) -> torch.Tensor:
    """[B, T-1] True at the next-token targets that are caption tokens (and the closing <eos>) of image->text
    samples: text targets with a loss flag after the image span of the rows `is_i2t` selects."""
    after_image = (modality != TEXT).long().cumsum(1) > 0  # [B, T]
    return is_i2t(ids, tok)[:, None] & flag[:, 1:] & (modality[:, 1:] == TEXT) & after_image[:, :-1]
