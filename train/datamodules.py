"""Lightning data modules: images for tokenizer training; code+caption sequences for the LM.

Both split a source the same way (`holdout` images set aside by `seed`), so the held-out images
that the demo evaluates on are never seen by the tokenizer or the language model.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from models.sequence import SequenceConfig, SequenceFormat
from models.text_tokenizer import TextTokenizer
from models.vocab import VocabLayout
from models.weights import atomic_save_file
from train.resume import EpochSampler, ResumableLoader, trainer_progress
from train.sources import ImageTextSet, load_source, split_indices
from vision_tokenizers import registry


def split_source(source: str, path: str | None, holdout: int, seed: int) -> tuple[ImageTextSet, ImageTextSet]:
    data = load_source(source, path)
    if not 0 <= holdout < len(data):
        raise ValueError(f"holdout {holdout} must be in [0, {len(data)}) for source {source!r}")
    train_idx, held_idx = split_indices(len(data), holdout, seed)
    return data.subset(train_idx), data.subset(held_idx)


def caption_tokenizer(train: ImageTextSet, text_tokenizer: str | None, bpe_vocab_size: int) -> TextTokenizer:
    """The given tokenizer.json, or a byte-level BPE trained on the training captions (deterministic)."""
    if text_tokenizer:
        return TextTokenizer.from_file(text_tokenizer)
    return TextTokenizer.train_bpe([c for caps in train.captions for c in caps], bpe_vocab_size)


def visit(item: int | tuple[int, int]) -> tuple[int, int | None]:
    """(index, draw seed) of a dataset item: training samplers (train.resume.EpochSampler) pass both,
    evaluation loaders pass a bare index."""
    return (item, None) if isinstance(item, int) else (int(item[0]), int(item[1]))


class ImageDataset(Dataset):
    def __init__(self, data: ImageTextSet, channels: int, size: int):
        self.data, self.channels, self.size = data, channels, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item) -> torch.Tensor:
        return self.data.image(visit(item)[0], self.channels, self.size)  # [C, S, S]


class ImageDataModule(L.LightningDataModule):
    """Images only, for training a vision tokenizer."""

    def __init__(self, source: str = "mnist", path: str | None = None, holdout: int = 1500, seed: int = 0,
                 channels: int = 1, image_size: int = 28, batch_size: int = 64, val_size: int = 256,
                 num_workers: int = 0):
        super().__init__()
        self.source, self.path, self.holdout, self.seed = source, path, holdout, seed
        self.channels, self.image_size = channels, image_size
        self.batch_size, self.val_size, self.num_workers = batch_size, val_size, num_workers

    def setup(self, stage: str | None = None) -> None:
        train, held = split_source(self.source, self.path, self.holdout, self.seed)
        self.train_set = ImageDataset(train, self.channels, self.image_size)
        self.val_set = ImageDataset(held.subset(range(min(self.val_size, len(held)))), self.channels, self.image_size)

    def train_dataloader(self):
        return ResumableLoader(self.train_set, self.batch_size, EpochSampler(len(self.train_set), self.seed),
                               trainer_progress(self), num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers, generator=torch.Generator())


def augmenter(degrees: float = 10.0, translate: float = 0.05, scale: tuple[float, float] = (0.9, 1.1)):
    """Small random affine warps (rotation, shift, zoom) with the background value -1 filled in."""
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale, fill=-1.0)


@torch.inference_mode()
def encode_images(vision: torch.nn.Module, data: ImageTextSet, batch: int = 256, augment_copies: int = 0,
                  seed: int = 0) -> torch.Tensor:
    """All images of `data` -> codes [(1 + augment_copies) * N, h, w] (int32).

    Copy k of image i sits at row k * N + i; copy 0 is the image itself, copies 1.. are random affine
    warps of it (drawn from `seed`, so the cache is reproducible). Each image is warped independently."""
    c, s = vision.config.in_channels, vision.config.image_size
    warp = augmenter() if augment_copies else None
    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for k in range(1 + augment_copies):
            for i in range(0, len(data), batch):
                x = [data.image(j, c, s) for j in range(i, min(i + batch, len(data)))]  # [C, S, S] each
                if k:
                    x = [warp(im) for im in x]
                out.append(vision.encode(torch.stack(x)).to(torch.int32))
    return torch.cat(out)


def cached_codes(vision: torch.nn.Module, vision_path: str, data: ImageTextSet, key: str, cache_dir: str | None,
                 augment_copies: int = 0, seed: int = 0) -> torch.Tensor:
    """Encode once per (tokenizer checkpoint hash, dataset key, augmentation); later epochs and runs read the cache."""
    rows = (1 + augment_copies) * len(data)
    if cache_dir is None:
        return encode_images(vision, data, augment_copies=augment_copies, seed=seed)
    tag = f"{registry.file_hash(vision_path)}|{key}|{len(data)}|aug{augment_copies}|{seed}"
    path = Path(cache_dir) / f"codes-{hashlib.sha256(tag.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        codes = load_file(str(path))["codes"]
        if len(codes) == rows:
            return codes
    codes = encode_images(vision, data, augment_copies=augment_copies, seed=seed)
    atomic_save_file({"codes": codes}, path)
    return codes


@dataclass
class DataSpec:
    """What a model trained on a data module must know about it (linked into the LM module by the CLI)."""

    tokenizer: TextTokenizer
    layout: VocabLayout
    vision: torch.nn.Module  # the frozen vision tokenizer
    max_len: int
    class_names: list[str] = field(default_factory=list)


class CodeCaptionDataset(Dataset):
    """One LM sequence per code row (row r holds a copy of image r % len(data)). Training draws template,
    order and guidance drop anew at each visit, from the draw seed its sampler hands over with the index
    (train.resume.EpochSampler: a function of seed, epoch and index, so a resumed run repeats them);
    validation (`fixed_seed`) draws once per index."""

    def __init__(self, codes: torch.Tensor, data: ImageTextSet, fmt: SequenceFormat, fixed_seed: int | None = None):
        self.codes, self.data, self.format, self.fixed_seed = codes, data, fmt, fixed_seed

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, item):
        i, seed = visit(item)
        if seed is None:
            if self.fixed_seed is None:
                raise ValueError("CodeCaptionDataset without fixed_seed needs (index, draw seed) items "
                                 "(train.resume.EpochSampler)")
            seed = self.fixed_seed * 1_000_003 + i
        rng = random.Random(seed)
        j = i % len(self.data)
        cap = rng.choice(self.data.captions[j])
        return self.format.build(self.codes[i].long(), cap, rng, where=f"{self.data.name}[{j}]")


class ImageTextDataModule(L.LightningDataModule):
    """Image-caption pairs as LM sequences; codes come from a frozen vision tokenizer, cached on disk.

    augment_copies: extra randomly warped copies of each training image (small rotation/shift/zoom),
    encoded once into the cache; an epoch then visits every copy. Small datasets overfit less.
    """

    def __init__(self, vision_tokenizer: str, source: str = "mnist", path: str | None = None,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 512, holdout: int = 1500,
                 seed: int = 0, batch_size: int = 64, val_size: int = 256, max_len: int = 128,
                 p_caption_first: float = 0.5, p_drop_caption: float = 0.1,
                 cache_dir: str | None = "results/cache", num_workers: int = 0, augment_copies: int = 0):
        super().__init__()
        if augment_copies < 0:
            raise ValueError(f"augment_copies must be >= 0, got {augment_copies}")
        self.augment_copies = augment_copies
        self.vision_path, self.source, self.path = vision_tokenizer, source, path
        self.holdout, self.seed, self.batch_size, self.val_size = holdout, seed, batch_size, val_size
        self.cache_dir, self.num_workers = cache_dir, num_workers
        self.seq_cfg = SequenceConfig(max_len, p_caption_first, p_drop_caption)
        self.train_data, self.held_data = split_source(source, path, holdout, seed)
        self.tokenizer = caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size)
        self.vision = registry.load(vision_tokenizer)
        self.layout = VocabLayout(self.tokenizer.vocab_size, self.vision.config.codebook_size)
        self.format = SequenceFormat(self.tokenizer, self.layout, self.seq_cfg)
        self.spec = DataSpec(self.tokenizer, self.layout, self.vision, self.seq_cfg.max_len,
                             self.train_data.class_names)

    def _codes(self) -> tuple[torch.Tensor, torch.Tensor, ImageTextSet]:
        """(training codes, validation codes, validation images), from the cache when it has them."""
        key = f"{self.source}|{self.path}|{self.holdout}|{self.seed}"
        val = self.held_data.subset(range(min(self.val_size, len(self.held_data))))
        train_codes = cached_codes(self.vision, self.vision_path, self.train_data, key + "|train", self.cache_dir,
                                   self.augment_copies, self.seed)
        val_codes = cached_codes(self.vision, self.vision_path, val, key + "|val", self.cache_dir)
        return train_codes, val_codes, val

    def prepare_data(self) -> None:
        """Fill the code cache once: Lightning calls this on one process per node before any `setup`, so
        under DDP the ranks read one cache instead of each encoding the dataset."""
        if self.cache_dir is not None:
            self._codes()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train_codes, val_codes, val = self._codes()
        self.train_set = CodeCaptionDataset(train_codes, self.train_data, self.format)
        self.val_set = CodeCaptionDataset(val_codes, val, self.format, fixed_seed=self.seed)
        self.val_images = val

    def train_dataloader(self):
        return ResumableLoader(self.train_set, self.batch_size, EpochSampler(len(self.train_set), self.seed),
                               trainer_progress(self), collate_fn=self.format.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.format.collate, num_workers=self.num_workers,
                          generator=torch.Generator())  # private RNG: validation never moves the global one
