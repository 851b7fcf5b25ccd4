"""Scenes (train/scenes.py) or cells (train/cells.py) as LM batches for image understanding: images travel with the batch, because what the LM reads of
an image (code ids, codebook embeddings, pooled ViT features) is computed by the model while it trains
(ETT's stage 2 tunes the tokenizer, TokenFLEX trains its encoder).

Each batch carries the sequence format's ids / loss / modality / valid / positions (models/sequence.py) with
the image span still unfilled, plus the images [B, C, S, S]. image->text samples get N slots (`<pad>`
placeholders, loss on the caption only); text->image samples hold placeholder codes that the module replaces
by the tokenizer's code ids (they are targets). N is the tokenizer's grid for discrete / codebook inputs, or
drawn once per batch from `token_mix` for TokenFLEX (the draw is a function of the batch's samples' seeds, so a
resumed run repeats it).
"""
from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from models.sequence import SequenceConfig, SequenceFormat
from models.text_tokenizer import TextTokenizer
from train.datamodules import DataModule, ImageDataset, TokenizedDataModule
from train.resume import visit_rng
from train.cells import WORDS, Cells, digit_pools
from train.scenes import NAMES, ItemPools, Scenes, all_captions
from train.sources import ImageTextSet
from vision_tokenizers import registry
from vision_tokenizers.image_io import array_to_tensor


class SceneSamples(Dataset):
    """(image [C, S, S], caption drawn for this visit, the visit's seed) per scene."""

    def __init__(self, data: ImageTextSet, channels: int, size: int, fixed_seed: int | None = None):
        self.data, self.channels, self.size, self.fixed_seed = data, channels, size, fixed_seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        i, rng = visit_rng(item, self.fixed_seed)
        image = array_to_tensor(self.data.items[i], self.channels, self.size)
        return image, rng.choice(self.data.captions[i]), rng.getrandbits(62), f"{self.data.name}[{i}]"


class SceneCollate:
    """Builds a batch: the task of each sample (and guidance drop) from its seed, N image positions each."""

    def __init__(self, fmt: SequenceFormat, tokens: int | None, token_mix: dict[int, float] | None):
        self.format, self.tokens, self.mix = fmt, tokens, token_mix

    def count(self, seeds: list[int]) -> int:
        if not self.mix:
            return self.tokens
        rng = random.Random(seeds[0])
        counts, weights = zip(*sorted(self.mix.items()))
        return int(rng.choices(counts, weights)[0])

    def __call__(self, items) -> dict[str, torch.Tensor]:
        images, caps, seeds, where = zip(*items)
        n = self.count(list(seeds))
        zeros = torch.zeros(n, dtype=torch.long)
        batch = self.format.collate([self.format.build(zeros, cap, random.Random(seed), where=w, slots=True)
                                     for cap, seed, w in zip(caps, seeds, where)])
        batch["images"] = torch.stack(images)
        return batch


TASKS = ("scenes", "cells")


def make_task(task: str, split: str, n: int, seed: int = 0, pool_seed: int = 0, p_empty: float = 0.25):
    """The `split` canvases of a task: `scenes` (train/scenes.py, 56 px, MNIST + Fashion-MNIST items, free
    phrasings) or `cells` (train/cells.py, 64 px, digits, one fixed caption order)."""
    if task == "scenes":
        return Scenes(ItemPools.load(pool_seed), split, n, seed)
    if task == "cells":
        return Cells(digit_pools(pool_seed), split, n, seed, p_empty)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def scenes_tokenizer(train: Scenes | Cells, text_tokenizer: str | None, vocab_size: int) -> TextTokenizer:
    """The given tokenizer.json, or a byte-level BPE on every caption variant of the first 2,000 training scenes
    (all phrasings and fillers occur there; deterministic). Cells: on a fixed corpus (Cells.tokenizer_corpus),
    so that models trained with any data seed read text with one tokenizer."""
    if text_tokenizer:
        return TextTokenizer.from_file(text_tokenizer)
    if isinstance(train, Cells):
        return TextTokenizer.train_bpe(Cells.tokenizer_corpus(), vocab_size)
    return TextTokenizer.train_bpe((c for i in range(min(2000, len(train))) for c in train.captions(i)), vocab_size)


def longest_caption(tokenizer: TextTokenizer, task: str = "scenes") -> int:
    """Tokens of the longest caption any canvas can have. Scenes: four items of one class, every phrasing and
    filler, every class (a caption's parts are separated by words, so its length adds up over its items)."""
    if task == "cells":
        return max(len(tokenizer.encode(c)) for c in Cells.longest_captions())
    return max(len(tokenizer.encode(c)) for k in range(len(NAMES)) for c in all_captions([k] * 4))


def check_class_words(tokenizer: TextTokenizer, where: str) -> None:
    """Cells: every class word must be one token where captions use it (after a space), so that a cell's answer
    is one prediction (teacher-forced accuracy and class-token NLL read it there)."""
    long = [w for w in WORDS if len(tokenizer.encode(" " + w)) != 1]
    if long:
        raise ValueError(f"{where}: class words {long} are not single tokens; train the BPE on cells captions")


class ScenesDataModule(TokenizedDataModule):
    """Scenes (train/scenes.py) or cells (train/cells.py) for captioning and text-to-image with continuous or
    discrete image inputs.

    Args:
        task: scenes | cells (the discriminating task: 64 px, one fixed caption order; see make_task).
        vision_tokenizer: a discrete image tokenizer file (registry .safetensors): its code ids are the targets of
            text->image samples and, for `inputs: codes` models, the LM's view of the image; its codebook
            embeddings feed ETT models. Unset (TokenFLEX): no codes, image->text only.
        p_empty: cells only: the chance that a cell is empty.
        n_train / n_val: scenes generated for training / validation (items from disjoint pools).
        seed: seed of the scenes and of the per-sample draws; pool_seed: seed of the item pools' split.
        image_size / channels: what the images are resized to (default: the tokenizer's, else the task's / 1).
        tokens: visual tokens per image when there is no tokenizer and no token_mix (TokenFLEX fixed count).
        token_mix: {token count: weight} drawn per training batch (TokenFLEX: e.g. {16: 0.2, 36: 0.3, 64: 0.5}).
        val_tokens: token count of validation batches (default: the largest of the mix, or `tokens`).
        p_caption_first: share of text->image samples (0 without a tokenizer); p_drop_caption: guidance drop.
        text_tokenizer / bpe_vocab_size: a tokenizer.json, or a BPE trained on the training captions.
    """

    def __init__(self, vision_tokenizer: str | None = None, task: str = "scenes", p_empty: float = 0.25,
                 n_train: int = 20_000, n_val: int = 256, seed: int = 0, pool_seed: int = 0, image_size: int | None = None, channels: int = 1, tokens: int | None = None,
                 token_mix: dict[int, float] | None = None, val_tokens: int | None = None,
                 p_caption_first: float = 0.5, p_drop_caption: float = 0.1, text_tokenizer: str | None = None,
                 bpe_vocab_size: int = 512, batch_size: int = 32, max_len: int = 128, num_workers: int = 0):
        super().__init__(seed, batch_size, num_workers)
        vision = registry.load(vision_tokenizer) if vision_tokenizer else None
        if vision is not None:
            image_size = image_size or vision.config.image_size
            channels = vision.config.in_channels
            n_tokens = vision.num_tokens
            if tokens is not None and tokens != n_tokens or token_mix:
                raise ValueError(f"{vision_tokenizer}: images are {n_tokens} tokens for this tokenizer; tokens / "
                                 f"token_mix are for tokenizer-free (TokenFLEX) data")
            tokens = n_tokens
        else:
            if p_caption_first:
                raise ValueError("text->image samples need a vision_tokenizer (set p_caption_first: 0)")
            token_mix = {int(k): float(v) for k, v in (token_mix or {}).items()}
            if tokens is None and not token_mix:
                raise ValueError("set tokens or token_mix (visual tokens per image) when there is no vision_tokenizer")
        self.image_size, self.channels = image_size or (64 if task == "cells" else 56), channels
        self.tokens, self.token_mix = tokens, token_mix or None
        self.val_tokens = val_tokens or (max(self.token_mix) if self.token_mix else tokens)
        self.train_scenes = make_task(task, "train", n_train, seed, pool_seed, p_empty)
        self.val_scenes = make_task(task, "val", n_val, seed, pool_seed, p_empty)
        tokenizer = scenes_tokenizer(self.train_scenes, text_tokenizer, bpe_vocab_size)
        if task == "cells":
            check_class_words(tokenizer, text_tokenizer or "the cells BPE")
        self.tokenize(tokenizer, vision,
                      vision.config.codebook_size if vision is not None else 0,
                      SequenceConfig(max_len, p_caption_first, p_drop_caption), self.train_scenes.as_set().class_names)
        self.collate = SceneCollate(self.format, self.tokens, self.token_mix)
        self.val_collate = SceneCollate(self.format, self.val_tokens, None)
        longest = longest_caption(self.tokenizer, task)
        if longest + max([*(self.token_mix or {}), self.tokens or 0, self.val_tokens or 0]) + 6 > max_len:
            raise ValueError(f"max_len {max_len} is too short for {longest}-token captions and the image tokens")

    def setup(self, stage: str | None = None) -> None:
        self.train_set = SceneSamples(self.train_scenes.as_set(), self.channels, self.image_size)
        self.val_set = SceneSamples(self.val_scenes.as_set(), self.channels, self.image_size, fixed_seed=self.seed)


class ScenesImageDataModule(DataModule):
    """Scene (or cells) images only, for training an image tokenizer on them (configs/scenes_tokenizer.yaml,
    cells_tokenizer.yaml); the same training / validation canvases (same seeds) as ScenesDataModule, so test items
    stay unseen. image_size: default the task's (56 / 64)."""

    def __init__(self, task: str = "scenes", p_empty: float = 0.25, n_train: int = 20_000, n_val: int = 256,
                 seed: int = 0, pool_seed: int = 0, image_size: int | None = None, channels: int = 1,
                 batch_size: int = 64, num_workers: int = 0):
        super().__init__(seed, batch_size, num_workers)
        make_task(task, "val", 1, seed, pool_seed, p_empty)  # a bad task / p_empty fails here, not in setup
        self.task, self.p_empty, self.n_train, self.n_val, self.pool_seed = task, p_empty, n_train, n_val, pool_seed
        self.image_size, self.channels = image_size or (64 if task == "cells" else 56), channels

    def setup(self, stage: str | None = None) -> None:
        args = (self.seed, self.pool_seed, self.p_empty)
        self.train_set = ImageDataset(make_task(self.task, "train", self.n_train, *args).as_set(), self.channels,
                                      self.image_size)
        self.val_set = ImageDataset(make_task(self.task, "val", self.n_val, *args).as_set(), self.channels,
                                    self.image_size)
