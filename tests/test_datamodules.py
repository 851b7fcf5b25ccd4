"""The data modules' shared parts: one encoded-code cache for images, KL latents and video clips, and sample
rules (task, caption drop) read from the sequence format only."""
from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

import train.datamodules as dm_mod
from models.sequence import SequenceConfig, SequenceFormat, caption_targets, is_i2t
from models.vocab import VocabLayout
from train.datamodules import ImageTextDataModule, encoded_cache
from train.latent_data import LatentDataModule
from train.video.modules import VideoTextDataModule
from vision_tokenizers import registry


def test_encoded_cache_encodes_once_per_tokenizer_file_and_key(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"tokenizer a")
    b.write_bytes(b"tokenizer b")
    calls = []

    def encode():
        calls.append(1)
        return {"codes": torch.arange(6, dtype=torch.int32).view(3, 2), "failed": torch.tensor([1])}

    first = encoded_cache(str(a), "src|train", 3, encode, str(tmp_path / "c"))
    again = encoded_cache(str(a), "src|train", 3, encode, str(tmp_path / "c"))
    assert len(calls) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    (file,) = (tmp_path / "c").glob("codes-*.safetensors")
    assert torch.equal(load_file(str(file))["failed"], torch.tensor([1]))  # safetensors: no pickle
    encoded_cache(str(b), "src|train", 3, encode, str(tmp_path / "c"))  # another tokenizer file: encoded again
    encoded_cache(str(a), "src|val", 3, encode, str(tmp_path / "c"))  # another data key: encoded again
    assert len(calls) == 3 and len(list((tmp_path / "c").glob("codes-*.safetensors"))) == 3
    encoded_cache(str(a), "src|train", 4, encode, str(tmp_path / "c"))  # a file of other rows is not trusted
    encoded_cache(str(a), "src|train", 3, encode, None)  # no cache dir: always encoded
    assert len(calls) == 5 and not list(tmp_path.glob("*.tmp*"))


@pytest.fixture
def spy(monkeypatch):
    """Every call of the one cache function: (key, rows) plus whether it had to encode."""
    seen = []
    real = dm_mod.encoded_cache

    def wrapped(vision_path, key, rows, encode, cache_dir, name):
        def counted():
            seen.append((key, rows, "encoded"))
            return encode()

        out = real(vision_path, key, rows, counted, cache_dir, name)
        seen.append((key, rows, "returned"))
        return out

    monkeypatch.setattr(dm_mod, "encoded_cache", wrapped)
    return seen


def _kl_path(tmp_path):
    from vision_tokenizers.kl import KLConfig, KLTokenizer

    torch.manual_seed(0)
    path = tmp_path / "kl.safetensors"
    registry.save(KLTokenizer(KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4)).eval(), path)
    return path


def _video_path(tmp_path):
    from vision_tokenizers.video import VideoTokenizer, VideoTokenizerConfig

    torch.manual_seed(0)
    path = tmp_path / "video.safetensors"
    cfg = VideoTokenizerConfig(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16],
                               spatial_down=[True], time_down=[True], levels=[5, 4])
    registry.save(VideoTokenizer(cfg).eval(), path)
    return path


@pytest.mark.parametrize("kind", ["image", "latent", "video"])
def test_every_encoded_dataset_goes_through_the_one_cache(kind, spy, tiny_vq_path, tmp_path):
    """Image codes, KL latents and video codes are all cached by encoded_cache (the second module reads the
    files back without encoding), and no module keeps a copy of its own."""
    cache = str(tmp_path / "cache")
    if kind == "image":
        make = lambda: ImageTextDataModule(str(tiny_vq_path), source="digits", holdout=50, val_size=8,  # noqa: E731
                                           bpe_vocab_size=200, max_len=48, cache_dir=cache)
    elif kind == "latent":
        kl = _kl_path(tmp_path)
        make = lambda: LatentDataModule(str(kl), source="digits", holdout=50, val_size=8,  # noqa: E731
                                        bpe_vocab_size=200, cache_dir=cache)
    else:
        vid = _video_path(tmp_path)
        make = lambda: VideoTextDataModule(str(vid), n_train=4, n_val=2, max_len=128, bpe_vocab_size=200,  # noqa: E731
                                           cache_dir=cache)
    first = make()
    first.setup()
    assert sum(s == "encoded" for *_, s in spy) == 2  # training and validation data, once each
    files = sorted((tmp_path / "cache").glob(f"{first.cache_name}-*.safetensors"))
    assert len(files) == 2 and sorted((tmp_path / "cache").iterdir()) == files
    second = make()
    second.setup()
    assert sum(s == "encoded" for *_, s in spy) == 2 and sum(s == "returned" for *_, s in spy) == 4
    assert torch.equal(second.train_set.codes, first.train_set.codes)
    assert sorted((tmp_path / "cache").iterdir()) == files
    import train.latent_data
    import train.video.modules
    for mod in (dm_mod, train.latent_data, train.video.modules):
        assert not [n for n in vars(mod) if n.startswith("cached_")]


def test_task_and_caption_targets_come_from_the_format(caption_tokenizer):
    fmt = SequenceFormat(caption_tokenizer, VocabLayout(caption_tokenizer.vocab_size, 32), SequenceConfig(max_len=48))
    rng = random.Random(0)
    samples = [fmt.build(torch.arange(4), "a handwritten 7", rng) for _ in range(16)]
    samples.append(fmt.build(torch.arange(4), "a handwritten 7", random.Random(1), slots=True))
    batch = fmt.collate(samples)
    tasks = is_i2t(batch["ids"], caption_tokenizer)
    assert tasks.tolist() == [s.task == "i2t" for s in samples] and 0 < tasks.sum() < len(samples)
    sel = caption_targets(batch["ids"], batch["loss"], batch["modality"], caption_tokenizer)
    assert not sel[~tasks].any() and sel[tasks].any(1).all()


def test_caption_drop_is_drawn_by_the_format_for_every_dataset(caption_tokenizer, monkeypatch):
    """drop_caption is the one draw: codes, latents and video samples all drop through it."""
    from train.datamodules import CodeCaptionDataset
    from train.latent_data import LatentCaptionDataset
    from train.sources import ImageTextSet
    from train.video.modules import VideoCaptionDataset

    fmt = SequenceFormat(caption_tokenizer, VocabLayout(caption_tokenizer.vocab_size, 32),
                         SequenceConfig(48, p_caption_first=1.0, p_drop_caption=0.5))
    rate = sum(fmt.drop_caption("a 7", random.Random(i)) is None for i in range(2000)) / 2000
    assert abs(rate - 0.5) < 0.05
    with pytest.raises(ValueError, match="empty caption"):
        fmt.drop_caption("  ", random.Random(1))  # an empty caption is refused even when it is dropped
    monkeypatch.setattr(SequenceFormat, "drop_caption", lambda self, cap, rng, where="": None)
    data = ImageTextSet("d", [None] * 2, [["a handwritten 7"]] * 2)
    codes = torch.zeros(2, 4, dtype=torch.int32)
    uncond = fmt.t2i_prompt(None)
    assert CodeCaptionDataset(codes, data, fmt, fixed_seed=0)[0].ids[:3].tolist() == uncond
    assert LatentCaptionDataset(torch.zeros(2, 4, 2, 2), data, fmt, fixed_seed=0)[0][0] == uncond
    video = VideoCaptionDataset(codes, data, fmt, fixed_seed=0)[0]
    assert video.ids[:3].tolist() == uncond and not video.loss[:3].any() and video.loss[3:].all()
