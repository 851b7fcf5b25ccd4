"""Caption (class) + continuous latent pairs for the xAR objective, latents from a frozen KL tokenizer.

A sample is the text->image prompt of the sequence format, `<bos> <t2i> caption <boi>` (the caption dropped
with probability `p_drop_caption`: the unconditional form used for guidance), plus the image's scaled latents.
Batches left-pad the prompts (so the latents of every row start at the same column) and carry
ids / valid [B, P] and latents [B, c, h, w]. Latents are encoded once and cached on disk per tokenizer file.
"""
from __future__ import annotations

import torch

from models.sampling import left_pad
from models.sequence import SequenceConfig
from train.datamodules import CodeCaptionDataset, TokenizedDataModule, caption_tokenizer, encode_images
from vision_tokenizers import registry


class LatentCaptionDataset(CodeCaptionDataset):
    """(prompt ids, latents) per image; caption template and guidance drop drawn per visit (fixed per
    index for validation)."""

    def sample(self, latents, caption, rng, where):
        return self.format.t2i_prompt(self.format.drop_caption(caption, rng, where)), latents


class LatentCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples) -> dict[str, torch.Tensor]:
        ids, valid = left_pad([s[0] for s in samples], self.pad_id)  # [B, P]
        return {"ids": ids, "valid": valid, "latents": torch.stack([s[1] for s in samples])}  # [B, c, h, w]


class LatentDataModule(TokenizedDataModule):
    """Image-caption pairs as (prompt, latents) for continuous-latent objectives (models/objectives/xar.py).

    max_len must hold the longest prompt plus the latent tokens (twice them for teacher forcing)."""

    cache_name = "latents"

    def __init__(self, vision_tokenizer: str, source: str = "mnist", path: str | None = None,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 512, holdout: int | float = 0.1,
                 seed: int = 0, batch_size: int = 64, val_size: int = 256, max_len: int = 160,
                 p_drop_caption: float = 0.1, cache_dir: str | None = "results/cache", num_workers: int = 0):
        super().__init__(seed, batch_size, num_workers)
        self.vision_path, self.cache_dir = vision_tokenizer, cache_dir
        self.split(source, path, holdout, val_size)
        vision = registry.load(vision_tokenizer)
        if not getattr(vision, "continuous", False):
            raise ValueError(f"{vision_tokenizer}: a {registry.kind_of(vision)!r} tokenizer has discrete codes; "
                             f"the latent data module needs a continuous one (kind 'kl')")
        self.tokenize(caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size), vision, 0,
                      SequenceConfig(max_len, 1.0, p_drop_caption), self.train_data.class_names)
        self.collate = LatentCollate(self.tokenizer.pad_id)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        z_train, z_val = (self.encoded(d, tag, lambda: encode_images(self.vision, d))["codes"]
                          for d, tag in ((self.train_data, "train"), (self.val_data, "val")))
        self.train_set = LatentCaptionDataset(z_train, self.train_data, self.format)
        self.val_set = LatentCaptionDataset(z_val, self.val_data, self.format, fixed_seed=self.seed)
