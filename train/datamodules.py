"""Lightning data modules: images for tokenizer training; code+caption sequences for the LM.

Both split a source the same way (`holdout` images set aside by `seed`), so the held-out images
that the demo evaluates on are never seen by the tokenizer or the language model.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.weights import atomic_save_file
from models.sequence import SequenceConfig, SequenceFormat
from models.text_tokenizer import TextTokenizer
from models.vocab import VocabLayout
from train.resume import resumable_loader, visit, visit_rng
from train.sources import STOP, BadSamples, ImageTextSet, load_source, split_indices
from vision_tokenizers import registry


def holdout_count(holdout: int | float, n: int, source: str = "") -> int:
    """How many of a source's `n` samples to hold out: `holdout` >= 1 is a count, 0 <= `holdout` < 1 a share
    (rounded, at least one sample when it is not 0), so the default suits any dataset size."""
    if isinstance(holdout, float) and holdout >= 1 and not holdout.is_integer():
        raise ValueError(f"holdout {holdout} must be a count (an integer >= 1) or a share in [0, 1)")
    count = int(holdout) if holdout >= 1 else max(1, round(holdout * n)) if holdout > 0 else 0
    if not 0 <= count < n or holdout < 0:
        raise ValueError(f"holdout {holdout} must leave training samples: a count in [0, {n}) or a share in [0, 1) "
                         f"for source {source!r} ({n} samples)")
    return count


def split_source(source: str, path: str | None, holdout: int | float, seed: int,
                 bad: BadSamples = STOP) -> tuple[ImageTextSet, ImageTextSet]:
    """(training, held-out) parts of a source; see holdout_count for `holdout`."""
    data = load_source(source, path, bad)
    train_idx, held_idx = split_indices(len(data), holdout_count(holdout, len(data), source), seed)
    return data.subset(train_idx), data.subset(held_idx)


def caption_tokenizer(train: ImageTextSet, text_tokenizer: str | None, bpe_vocab_size: int) -> TextTokenizer:
    """The given tokenizer.json, or a byte-level BPE trained on the training captions (deterministic)."""
    if text_tokenizer:
        return TextTokenizer.from_file(text_tokenizer)
    return TextTokenizer.train_bpe((c for caps in train.captions for c in caps), bpe_vocab_size)


class ImageDataset(Dataset):
    def __init__(self, data: ImageTextSet, channels: int, size: int):
        self.data, self.channels, self.size = data, channels, size

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item) -> torch.Tensor:
        return self.data.image(visit(item)[0], self.channels, self.size)  # [C, S, S]


def check_image_facts(model, datamodule) -> None:
    """Image facts are set once: a data module's unset `channels` / `image_size` are taken from the model's
    tokenizer (`in_channels` / `image_size`), and a mismatch is refused before training starts, with both values
    named, instead of failing later inside a convolution."""
    exported = getattr(model, "exported_tokenizer", None)
    cfg = getattr(exported(), "config", None) if callable(exported) else None
    if cfg is None:
        return
    for data_key, model_key in (("channels", "in_channels"), ("image_size", "image_size")):
        have, want = getattr(datamodule, data_key), getattr(cfg, model_key, None)
        if want is None:
            continue
        if have is None:
            setattr(datamodule, data_key, want)
        elif have != want:
            raise ValueError(f"data.{data_key} is {have} but the model's tokenizer has {model_key} {want}: set one "
                             f"value (leave data.{data_key} unset to take the tokenizer's)")


class DataModule(L.LightningDataModule):
    """What every data module here shares: `train_set` / `val_set` (built by `setup`) served in batches of
    `batch_size` through `collate` (`val_collate` for validation when it differs; None: default collation).
    Training is resumable (train.resume); validation reads in order on a private RNG, never moving the global one."""

    collate = val_collate = None

    def __init__(self, seed: int = 0, batch_size: int = 64, num_workers: int = 0):
        super().__init__()
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers

    def split(self, source: str, path: str | None, holdout: int | float, val_size: int, bad: BadSamples = STOP):
        """train_data / held_data (split_source) and val_data (the first `val_size` held-out samples)."""
        self.train_data, self.held_data = split_source(source, path, holdout, self.seed, bad)
        self.val_data = self.held_data.subset(range(min(val_size, len(self.held_data))))
        self.key = f"{source}|{path}|{holdout}|{self.seed}"

    def train_dataloader(self):
        return resumable_loader(self, self.train_set, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.val_collate or self.collate,
                          num_workers=self.num_workers, generator=torch.Generator())


class ImageDataModule(DataModule):
    """Images only, for training a vision tokenizer.

    Args:
        source: where the images come from: digits | mnist | fashion_mnist (bundled), jsonl | folder | wds
            (your data; see docs/own_data.md).
        path: the JSONL file, image folder or glob of WebDataset tar shards (user sources; fashion_mnist: the
            IDX folder, default the Debian package's).
        holdout: samples kept out of training: a count (>= 1) or a share of the source (< 1); the same split
            (with the same seed) as the language model's data module, so its held-out images stay unseen.
        seed: seed of the train / held-out split.
        channels: image channels (1 grey, 3 RGB); unset: taken from the model's tokenizer (`in_channels`).
        image_size: square side the images are resized and centre-cropped to; unset: the tokenizer's.
        batch_size: images per training step.
        val_size: held-out images used for validation.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, source: str = "mnist", path: str | None = None, holdout: int | float = 0.1, seed: int = 0,
                 channels: int | None = None, image_size: int | None = None, batch_size: int = 64,
                 val_size: int = 256, num_workers: int = 0):
        super().__init__(seed, batch_size, num_workers)
        self.source, self.path, self.holdout, self.val_size = source, path, holdout, val_size
        self.channels, self.image_size = channels, image_size

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            check_image_facts(self.trainer.lightning_module, self)
        if self.channels is None or self.image_size is None:
            raise ValueError("ImageDataModule: set channels and image_size (when it trains a tokenizer they are "
                             "taken from the tokenizer's config)")
        self.split(self.source, self.path, self.holdout, self.val_size)
        self.train_set = ImageDataset(self.train_data, self.channels, self.image_size)
        self.val_set = ImageDataset(self.val_data, self.channels, self.image_size)


def augmenter(degrees: float = 10.0, translate: float = 0.05, scale: tuple[float, float] = (0.9, 1.1)):
    """Small random affine warps (rotation, shift, zoom) with the background value -1 filled in."""
    from torchvision.transforms import v2

    return v2.RandomAffine(degrees=degrees, translate=(translate, translate), scale=scale, fill=-1.0)


@torch.inference_mode()
def encode_images(vision: torch.nn.Module, data: ImageTextSet, batch: int = 256, augment_copies: int = 0,
                  seed: int = 0, bad: BadSamples = STOP) -> dict[str, torch.Tensor]:
    """All images of `data` -> {"codes": [(1 + augment_copies) * N, ...] (int32 code grids [h, w], or float32
    latents [c, h, w] of a continuous tokenizer), "failed": [k] indices of images that could not be read}.

    Copy k of image i sits at row k * N + i; copy 0 is the image itself, copies 1.. are random affine
    warps of it (drawn from `seed`, so the cache is reproducible). Each image is warped independently.
    An image that cannot be read stops the encoding with its error under the "stop" policy; under "skip"
    it is listed (its rows are blank codes, dropped by the caller)."""
    c, s = vision.config.in_channels, vision.config.image_size
    dtype = torch.float32 if getattr(vision, "continuous", False) else torch.int32
    warp = augmenter() if augment_copies else None
    failed: list[int] = []

    def read(j: int) -> torch.Tensor:
        try:
            return data.image(j, c, s)  # [C, S, S]
        except (ValueError, FileNotFoundError):
            if bad.policy == "stop":
                raise
            failed.append(j)
            return torch.full((c, s, s), -1.0)

    rows = (1 + augment_copies) * len(data)
    if not rows:  # an empty split: no rows, the code grid's shape
        empty = vision.encode(torch.zeros(1, c, s, s))[:0].to(dtype)
        return {"codes": empty, "failed": torch.zeros(0, dtype=torch.int64)}
    out = None  # [rows, h, w], filled batch by batch: no list of batches concatenated at the end
    with torch.random.fork_rng(devices=[]), tqdm(total=rows, desc=f"encoding {data.name}", unit="img",
                                                  disable=None, leave=False) as bar:
        torch.manual_seed(seed)
        for k in range(1 + augment_copies):
            for i in range(0, len(data), batch):
                x = [read(j) if k == 0 else data.image(j, c, s) if j not in failed else torch.full((c, s, s), -1.0)
                     for j in range(i, min(i + batch, len(data)))]
                if k:
                    x = [warp(im) for im in x]
                codes = vision.encode(torch.stack(x)).to(dtype)  # [b, h, w]
                if out is None:
                    out = torch.empty(rows, *codes.shape[1:], dtype=dtype)
                out[k * len(data) + i: k * len(data) + i + len(x)] = codes
                bar.update(len(x))
    return {"codes": out, "failed": torch.tensor(sorted(set(failed)), dtype=torch.int64)}


def encoded_cache(vision_path: str, key: str, rows: int, encode: Callable[[], dict[str, torch.Tensor]],
                  cache_dir: str | None, name: str = "codes") -> dict[str, torch.Tensor]:
    """The one cache of a dataset encoded through a frozen tokenizer (image codes, KL latents, video codes):
    `encode()` -> {"codes": [rows, ...], ...} runs once per (tokenizer file hash, `key`: everything that identifies
    the data); later epochs and runs read `cache_dir`/<name>-<hash>.safetensors back (no pickle), which is written
    atomically, so an interrupted run leaves no half file. `cache_dir` None: encode every time."""
    if cache_dir is None:
        return encode()
    tag = f"{registry.file_hash(vision_path)}|{key}"
    path = Path(cache_dir) / f"{name}-{hashlib.sha256(tag.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        if "codes" in cached and len(cached["codes"]) == rows:
            return cached
    out = encode()
    atomic_save_file(out, path)
    return out


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
        i, rng = visit_rng(item, self.fixed_seed)
        j = i % len(self.data)
        return self.sample(self.codes[i], rng.choice(self.data.captions[j]), rng, f"{self.data.name}[{j}]")

    def sample(self, codes: torch.Tensor, caption: str, rng: random.Random, where: str):
        """The sample of one code row and its drawn caption (subclasses: other sample kinds of the format)."""
        return self.format.build(codes.long(), caption, rng, where=where)


class TokenizedDataModule(DataModule):
    """The set-up every LM data module shares after its split (`split`, or its own source): text tokenizer ->
    vocabulary layout + sequence format + DataSpec (`tokenize`); frozen-tokenizer encodings through the one cache
    (`encoded`)."""

    vision_path: str | None = None
    cache_dir: str | None = None
    cache_name = "codes"  # cache files are <cache_dir>/<cache_name>-<hash>.safetensors

    def tokenize(self, tokenizer: TextTokenizer, vision: torch.nn.Module | None, codebook_size: int,
                 cfg: SequenceConfig, class_names: list[str] = ()) -> None:
        self.tokenizer, self.vision = tokenizer, vision
        self.layout = VocabLayout(tokenizer.vocab_size, codebook_size)
        self.format = SequenceFormat(tokenizer, self.layout, cfg)
        self.spec = DataSpec(tokenizer, self.layout, vision, cfg.max_len, list(class_names))
        self.collate = self.format.collate

    def encoded(self, data, tag: str, encode: Callable[[], dict[str, torch.Tensor]], copies: int = 0):
        """encoded_cache of `data` (rows: (1 + copies) per sample), keyed by this module's data `key` and `tag`."""
        return encoded_cache(self.vision_path, f"{self.key}|{tag}|{len(data)}", (1 + copies) * len(data), encode,
                             self.cache_dir, self.cache_name)


class ImageTextDataModule(TokenizedDataModule):
    """Image-caption pairs as LM sequences; codes come from a frozen vision tokenizer, cached on disk.

    Args:
        vision_tokenizer: the trained vision tokenizer file (.safetensors from a tokenizer recipe's export_path);
            image channels and size come from it.
        source: digits | mnist | fashion_mnist (bundled), jsonl | folder | wds (your data; docs/own_data.md).
        path: the JSONL file, image folder or glob of WebDataset tar shards (user sources).
        text_tokenizer: a tokenizer.json to use; unset: a byte-level BPE trained on the training captions.
        bpe_vocab_size: vocabulary size of that BPE.
        holdout: samples kept out of training: a count (>= 1) or a share of the source (< 1).
        seed: seed of the train / held-out split and of the per-sample draws.
        batch_size: sequences per training step.
        val_size: held-out samples used for validation.
        max_len: longest sequence (tokens); a longer sample is a bad sample (see on_bad_sample).
        p_caption_first: share of caption->image (text-to-image) samples; the rest are image->caption.
        p_drop_caption: share of text-to-image samples whose caption is dropped (for classifier-free guidance).
        cache_dir: where encoded codes are cached (keyed by tokenizer hash and split); unset: no cache.
        num_workers: DataLoader worker processes.
        augment_copies: extra randomly warped copies of each training image (small rotation/shift/zoom),
            encoded once into the cache; an epoch then visits every copy. Small datasets overfit less.
        on_bad_sample: stop (default: one-line error naming the file and line) | skip (drop, count and log it).
        bad_samples_log: file that lists each skipped sample as `<file:line>: <problem>`.
    """

    def __init__(self, vision_tokenizer: str, source: str = "mnist", path: str | None = None,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 512, holdout: int | float = 0.1,
                 seed: int = 0, batch_size: int = 64, val_size: int = 256, max_len: int = 128,
                 p_caption_first: float = 0.5, p_drop_caption: float = 0.1,
                 cache_dir: str | None = "results/cache", num_workers: int = 0, augment_copies: int = 0,
                 on_bad_sample: str = "stop", bad_samples_log: str | None = None):
        super().__init__(seed, batch_size, num_workers)
        if augment_copies < 0:
            raise ValueError(f"augment_copies must be >= 0, got {augment_copies}")
        # a bad sample (missing/corrupt image, empty caption, bad record, over-long sequence) stops the run
        # with one line naming it, or ("skip") is dropped, counted and logged to bad_samples_log
        self.bad = BadSamples(on_bad_sample, bad_samples_log)
        self.vision_path, self.cache_dir, self.augment_copies = vision_tokenizer, cache_dir, augment_copies
        self.split(source, path, holdout, val_size, self.bad)
        vision = registry.load(vision_tokenizer)
        self.tokenize(caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size), vision,
                      vision.config.codebook_size, SequenceConfig(max_len, p_caption_first, p_drop_caption),
                      self.train_data.class_names)

    def _codes(self):
        """({"codes", "failed"} of the training images, for every copy; the same of the validation images)."""
        def codes(data, tag, copies=0):
            return self.encoded(data, f"{tag}|aug{copies}", lambda: encode_images(
                self.vision, data, augment_copies=copies, seed=self.seed, bad=self.bad), copies)

        return codes(self.train_data, "train", self.augment_copies), codes(self.val_data, "val")

    def _keep_good(self, encoded: dict[str, torch.Tensor], data: ImageTextSet, copies: int):
        """Drop samples whose image failed to load or whose sequence exceeds max_len (each reported to the
        bad-sample policy once); returns (codes of the kept samples, for every copy; kept samples)."""
        codes, failed = encoded["codes"], encoded["failed"].tolist()
        n, drop = len(data), set(failed)
        for j in failed:
            self.bad(data.where(j), "image could not be read")
        rng = random.Random(0)
        for j in range(n):
            if j in drop:
                continue
            for cap in data.captions[j]:  # both task orders have the same length
                try:
                    self.format.build(codes[j].long(), cap, rng, where=data.where(j))
                except ValueError as e:
                    self.bad(data.where(j), str(e).removeprefix(f"{data.where(j)}: "))
                    drop.add(j)
                    break
        if not drop:
            return codes, data
        keep = [j for j in range(n) if j not in drop]
        rows = torch.tensor([k * n + j for k in range(1 + copies) for j in keep])
        if not keep:
            raise ValueError(f"{data.name}: every sample was bad ({len(drop)} skipped)")
        return codes[rows], data.subset(keep)

    def prepare_data(self) -> None:
        """Fill the code cache once: Lightning calls this on one process per node before any `setup`, so
        under DDP the ranks read one cache instead of each encoding the dataset."""
        if self.cache_dir is not None:
            self._codes()

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train, val = self._codes()
        train_codes, self.train_data = self._keep_good(train, self.train_data, self.augment_copies)
        val_codes, self.val_images = self._keep_good(val, self.val_data, 0)
        self.train_set = CodeCaptionDataset(train_codes, self.train_data, self.format)
        self.val_set = CodeCaptionDataset(val_codes, self.val_images, self.format, fixed_seed=self.seed)
