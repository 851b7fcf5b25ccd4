"""Caption (class) + continuous latent pairs for the xAR objective, latents from a frozen KL tokenizer.

A sample is the text->image prompt of the sequence format, `<bos> <t2i> caption <boi>` (the caption dropped
with probability `p_drop_caption`: the unconditional form used for guidance), plus the image's scaled latents.
Batches left-pad the prompts (so the latents of every row start at the same column) and carry
ids / valid [B, P] and latents [B, c, h, w]. Latents are encoded once and cached on disk per tokenizer file.
"""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from common.weights import atomic_save_file
from models.sampling import left_pad
from models.sequence import SequenceConfig, SequenceFormat
from models.vocab import VocabLayout
from train.datamodules import DataSpec, caption_tokenizer, split_source
from train.resume import resumable_loader, visit_rng
from train.sources import ImageTextSet
from vision_tokenizers import registry


@torch.inference_mode()
def encode_latents(vision, data: ImageTextSet, batch: int = 256) -> torch.Tensor:
    """All images of `data` -> scaled latents [N, c, h, w] (float32)."""
    c, s = vision.config.in_channels, vision.config.image_size
    return torch.cat([vision.encode(torch.stack([data.image(j, c, s) for j in range(i, min(i + batch, len(data)))]))
                      for i in range(0, len(data), batch)]).float()


def cached_latents(vision, vision_path: str, data: ImageTextSet, key: str, cache_dir: str | None) -> torch.Tensor:
    if cache_dir is None:
        return encode_latents(vision, data)
    tag = f"{registry.file_hash(vision_path)}|{key}|{len(data)}|latents"
    path = Path(cache_dir) / f"latents-{hashlib.sha256(tag.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        z = load_file(str(path))["latents"]
        if len(z) == len(data):
            return z
    z = encode_latents(vision, data)
    atomic_save_file({"latents": z}, path)
    return z


class LatentCaptionDataset(Dataset):
    """(prompt ids, latents) per image; caption template and guidance drop drawn per visit (fixed per
    index for validation)."""

    def __init__(self, latents: torch.Tensor, data: ImageTextSet, fmt: SequenceFormat, fixed_seed: int | None = None):
        self.latents, self.data, self.format, self.fixed_seed = latents, data, fmt, fixed_seed

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, item):
        i, rng = visit_rng(item, self.fixed_seed)
        cap = rng.choice(self.data.captions[i])
        dropped = rng.random() < self.format.cfg.p_drop_caption
        return self.format.t2i_prompt(None if dropped else cap), self.latents[i]


class LatentCollate:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, samples) -> dict[str, torch.Tensor]:
        ids, valid = left_pad([s[0] for s in samples], self.pad_id)  # [B, P]
        return {"ids": ids, "valid": valid, "latents": torch.stack([s[1] for s in samples])}  # [B, c, h, w]


class LatentDataModule(L.LightningDataModule):
    """Image-caption pairs as (prompt, latents) for continuous-latent objectives (models/objectives/xar.py).

    max_len must hold the longest prompt plus the latent tokens (twice them for teacher forcing)."""

    def __init__(self, vision_tokenizer: str, source: str = "mnist", path: str | None = None,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 512, holdout: int | float = 0.1,
                 seed: int = 0, batch_size: int = 64, val_size: int = 256, max_len: int = 160,
                 p_drop_caption: float = 0.1, cache_dir: str | None = "results/cache", num_workers: int = 0):
        super().__init__()
        self.vision_path, self.source, self.path = vision_tokenizer, source, path
        self.holdout, self.seed, self.batch_size, self.val_size = holdout, seed, batch_size, val_size
        self.cache_dir, self.num_workers = cache_dir, num_workers
        self.train_data, self.held_data = split_source(source, path, holdout, seed)
        self.tokenizer = caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size)
        self.vision = registry.load(vision_tokenizer)
        if not getattr(self.vision, "continuous", False):
            raise ValueError(f"{vision_tokenizer}: a {registry.kind_of(self.vision)!r} tokenizer has discrete codes; "
                             f"the latent data module needs a continuous one (kind 'kl')")
        self.layout = VocabLayout(self.tokenizer.vocab_size, 0)
        self.format = SequenceFormat(self.tokenizer, self.layout, SequenceConfig(max_len, 1.0, p_drop_caption))
        self.spec = DataSpec(self.tokenizer, self.layout, self.vision, max_len, self.train_data.class_names)
        self.collate = LatentCollate(self.tokenizer.pad_id)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        key = f"{self.source}|{self.path}|{self.holdout}|{self.seed}"
        val = self.held_data.subset(range(min(self.val_size, len(self.held_data))))
        z_train = cached_latents(self.vision, self.vision_path, self.train_data, key + "|train", self.cache_dir)
        z_val = cached_latents(self.vision, self.vision_path, val, key + "|val", self.cache_dir)
        self.train_set = LatentCaptionDataset(z_train, self.train_data, self.format)
        self.val_set = LatentCaptionDataset(z_val, val, self.format, fixed_seed=self.seed)

    def train_dataloader(self):
        return resumable_loader(self, self.train_set, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.collate, num_workers=self.num_workers)
