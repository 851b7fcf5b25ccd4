"""The caption corpus of an image-caption source, text only: what PRIOR's reference model is trained on.

It splits the source and builds the text tokenizer exactly as `train.datamodules.ImageTextDataModule` (or, for
`source: scenes` or `cells`, `train.understanding.data.ScenesDataModule`) does with the same settings (source, path, holdout /
n_train, seed, text_tokenizer, bpe_vocab_size), so the reference model reads captions with the tokenizer of the
vision-language model it will weight; `train.prior.PriorWeighting` checks it. Only training captions are used:
the held-out images' captions stay unseen by the reference as well.
"""
from __future__ import annotations

from torch.utils.data import Dataset

from models.sequence import SequenceConfig, SequenceFormat
from train.datamodules import TokenizedDataModule, caption_tokenizer
from train.resume import visit_rng
from train.sources import ImageTextSet
from vision_tokenizers import registry


class CaptionTextDataset(Dataset):
    """One `<bos> caption <eos>` sequence per image; which of its captions is drawn per visit (EpochSampler)."""

    def __init__(self, data: ImageTextSet, fmt: SequenceFormat, fixed_seed: int | None = None):
        self.data, self.format, self.fixed_seed = data, fmt, fixed_seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        i, rng = visit_rng(item, self.fixed_seed)
        return self.format.text_sample(rng.choice(self.data.captions[i]), where=self.data.where(i))


class CaptionTextDataModule(TokenizedDataModule):
    """Captions alone, for PRIOR's text-only reference LM (train it with `train.lm_module.MultimodalLMModule`).

    Args:
        vision_tokenizer: the vision tokenizer of the model PRIOR will weight; only its codebook size is used,
            so the reference's vocabulary layout equals that model's (text ids come first in every layout, so a
            reference also serves a model with another codebook, or none, that reads the same text tokenizer).
        source: digits | mnist | fashion_mnist of train.sources, jsonl | folder | wds, or scenes / cells
            (train/scenes.py, train/cells.py: `n_train` training canvases, validation on the val split's).
        path: the user source's file, folder or shard glob.
        text_tokenizer: a tokenizer.json; unset: the byte-level BPE trained on the training captions.
        bpe_vocab_size: vocabulary size of that BPE.
        holdout: samples kept out (a count >= 1 or a share < 1), as in the vision-language data module.
        n_train: training scenes (source scenes only), as in the scenes data module.
        seed: seed of the split and of the caption draws.
        batch_size: captions per step.
        val_size: held-out captions used for validation.
        max_len: longest caption sequence in tokens.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, vision_tokenizer: str, source: str = "mnist", path: str | None = None,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 512, holdout: int | float = 0.1,
                 n_train: int = 20_000, seed: int = 0, batch_size: int = 64, val_size: int = 256, max_len: int = 64,
                 num_workers: int = 0):
        super().__init__(seed, batch_size, num_workers)
        if source in ("scenes", "cells"):
            from train.understanding.data import make_task, scenes_tokenizer

            train = make_task(source, "train", n_train, seed)
            self.train_data, self.val_data = train.as_set(), make_task(source, "val", val_size, seed).as_set()
            tokenizer = scenes_tokenizer(train, text_tokenizer, bpe_vocab_size)
        else:
            self.split(source, path, holdout, val_size)
            tokenizer = caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size)
        vision = registry.load(vision_tokenizer)
        self.tokenize(tokenizer, vision, vision.config.codebook_size, SequenceConfig(max_len=max_len),
                      self.train_data.class_names)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = CaptionTextDataset(self.train_data, self.format)
        self.val_set = CaptionTextDataset(self.val_data, self.format, fixed_seed=self.seed)
