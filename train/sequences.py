"""Sequence builder (DESIGN §4): image+caption pairs -> id sequences with loss flags and modality ids.

image->caption:  <bos> <boi> v_1 .. v_N <eoi> caption <eos>
caption->image:  <bos> caption <boi> v_1 .. v_N <eoi> <eos>
The two orders are drawn 50/50; in caption->image samples the caption is dropped (empty prompt)
with probability 0.1 so the model also learns the unconditional image distribution for guidance.
Loss is on every real token after <bos> (SEED-LLaMA), never on padding.
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
    max_len: int = 128
    p_caption_first: float = 0.5  # share of caption->image samples
    p_drop_caption: float = 0.1  # caption dropped in caption->image samples (guidance)


@dataclass
class Sample:
    ids: torch.Tensor  # [T] long
    loss: torch.Tensor  # [T] bool: this token is a prediction target
    modality: torch.Tensor  # [T] long


class SequenceBuilder:
    def __init__(self, tokenizer: TextTokenizer, layout: VocabLayout, cfg: SequenceConfig = SequenceConfig()):
        self.tok, self.layout, self.cfg = tokenizer, layout, cfg

    def caption_ids(self, caption: str) -> list[int]:
        if not caption.strip():
            raise ValueError("empty caption")
        return self.tok.encode(caption)

    def t2i_prompt(self, caption: str | None) -> list[int]:
        """Prompt for text->image: `<bos> caption <boi>` (caption None = unconditional)."""
        text = self.caption_ids(caption) if caption is not None else []
        return [self.tok.bos_id, *text, self.tok.boi_id]

    def caption_prompt(self, codes: torch.Tensor) -> list[int]:
        """Prompt for image->text: `<bos> <boi> codes <eoi>`."""
        return [self.tok.bos_id, self.tok.boi_id, *self.layout.image_to_ids(codes.flatten()).tolist(),
                self.tok.eoi_id]

    def build(self, codes: torch.Tensor, caption: str, rng: random.Random, where: str = "sample") -> Sample:
        """One training sequence from image codes [h, w] (or [N]) and a caption."""
        img = [self.tok.boi_id, *self.layout.image_to_ids(codes.flatten()).tolist(), self.tok.eoi_id]
        img_mod = [IMAGE] * len(img)
        if rng.random() < self.cfg.p_caption_first:
            text = [] if rng.random() < self.cfg.p_drop_caption else self.caption_ids(caption)
            ids = [self.tok.bos_id, *text, *img, self.tok.eos_id]
            mod = [TEXT] * (1 + len(text)) + img_mod + [TEXT]
        else:
            text = self.caption_ids(caption)
            ids = [self.tok.bos_id, *img, *text, self.tok.eos_id]
            mod = [TEXT] + img_mod + [TEXT] * (len(text) + 1)
        if len(ids) > self.cfg.max_len:
            raise ValueError(f"{where}: sequence of {len(ids)} tokens exceeds max_len {self.cfg.max_len}")
        loss = torch.ones(len(ids), dtype=torch.bool)
        loss[0] = False
        return Sample(torch.tensor(ids), loss, torch.tensor(mod))

    def collate(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest sample. Padding: pad id, no loss, valid=False."""
        t = max(len(s.ids) for s in samples)
        b = len(samples)
        ids = torch.full((b, t), self.tok.pad_id, dtype=torch.long)
        loss = torch.zeros((b, t), dtype=torch.bool)
        modality = torch.zeros((b, t), dtype=torch.long)
        valid = torch.zeros((b, t), dtype=torch.bool)
        for i, s in enumerate(samples):
            n = len(s.ids)
            ids[i, :n], loss[i, :n], modality[i, :n], valid[i, :n] = s.ids, s.loss, s.modality, True
        return {"ids": ids, "loss": loss, "modality": modality, "valid": valid}
