"""Stage 1's data: (image, caption ids) pairs, split exactly like the other data modules."""
from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from models.text_tokenizer import TextTokenizer
from train.datamodules import caption_tokenizer, split_source
from train.resume import resumable_loader, visit_rng
from train.sources import ImageTextSet


def tokenizer_json_path(export_path: str | Path) -> Path:
    """Where stage 1 writes the caption tokenizer it trained with: beside the tokenizer file."""
    return Path(export_path).with_suffix(".tokenizer.json")


class ImageCaptionDataset(Dataset):
    """(image [C, S, S], caption ids [T] with [CLS] first). Training draws a caption template per visit from
    the draw seed its sampler hands over (train.resume.EpochSampler); `fixed_seed` draws once per index."""

    def __init__(self, data: ImageTextSet, tok: TextTokenizer, channels: int, size: int, max_len: int,
                 fixed_seed: int | None = None):
        self.data, self.tok, self.channels, self.size = data, tok, channels, size
        self.max_len, self.fixed_seed = max_len, fixed_seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        i, rng = visit_rng(item, self.fixed_seed)
        cap = rng.choice(self.data.captions[i])
        ids = [self.tok.bos_id, *self.tok.encode(cap)][: self.max_len]  # <bos> serves as [CLS]
        return self.data.image(i, self.channels, self.size), torch.tensor(ids), int(self.data.labels[i])


class ImageCaptionDataModule(L.LightningDataModule):
    """Images with caption ids, split exactly like the VQ path (`holdout` images set aside by `seed`),
    so held-out images are never trained on. The caption tokenizer is a byte-level BPE trained on the
    training captions (deterministic), or `text_tokenizer` (a tokenizer.json)."""

    def __init__(self, source: str = "mnist", path: str | None = None, holdout: int | float = 0.1, seed: int = 0,
                 channels: int = 1, image_size: int = 28, batch_size: int = 64, val_size: int = 256,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 256, max_text_len: int = 32,
                 num_workers: int = 0):
        super().__init__()
        self.channels, self.image_size, self.batch_size = channels, image_size, batch_size
        self.val_size, self.max_text_len, self.num_workers, self.seed = val_size, max_text_len, num_workers, seed
        self.train_data, self.held_data = split_source(source, path, holdout, seed)
        self.tokenizer = caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size)

    def setup(self, stage: str | None = None) -> None:
        val = self.held_data.subset(range(min(self.val_size, len(self.held_data))))
        args = (self.tokenizer, self.channels, self.image_size, self.max_text_len)
        self.train_set = ImageCaptionDataset(self.train_data, *args)
        self.val_set = ImageCaptionDataset(val, *args, fixed_seed=self.seed)

    def collate(self, items) -> dict[str, torch.Tensor]:
        images = torch.stack([it[0] for it in items])  # [B, C, S, S]
        t = max(len(it[1]) for it in items)
        text = torch.full((len(items), t), self.tokenizer.pad_id, dtype=torch.long)  # [B, T]
        valid = torch.zeros((len(items), t), dtype=torch.bool)
        for i, (_, ids, _) in enumerate(items):
            text[i, : len(ids)], valid[i, : len(ids)] = ids, True
        labels = torch.tensor([it[2] for it in items])  # [B], -1 where the source has no labels
        return {"images": images, "text": text, "text_valid": valid, "labels": labels}

    def train_dataloader(self):
        return resumable_loader(self, self.train_set, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.collate, num_workers=self.num_workers,
                          generator=torch.Generator())  # private RNG: validation never moves the global one


def batch_images(batch) -> torch.Tensor:
    """The images [B, C, S, S] of a batch from ImageCaptionDataModule (a dict) or ImageDataModule (a tensor)."""
    return batch["images"] if isinstance(batch, dict) else batch
