"""The language model's id space: text + specials first, then one contiguous range per visual codebook."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class VocabLayout:
    text_size: int  # text ids + special tokens
    image_codes: int = 0  # size of the discrete image codebook (0 = none)

    @property
    def image_offset(self) -> int:
        return self.text_size

    @property
    def size(self) -> int:
        return self.text_size + self.image_codes

    def image_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        return codes + self.image_offset

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        return cls(**d)
