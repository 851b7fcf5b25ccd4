"""The continuous KL tokenizer: shapes, the registry, the measured scale, a real diffusers folder, a short fit."""
from __future__ import annotations

import pytest
import torch

from vision_tokenizers import registry
from vision_tokenizers.kl import KLConfig, KLTokenizer, main as kl_main

TINY = KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4)


def test_shapes_and_padding():
    torch.manual_seed(0)
    tok = KLTokenizer(KLConfig(image_size=28, pad=2, channels=(8, 16, 16))).eval()  # 32 / 4 = 8
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    z = tok.encode(x)
    assert z.shape == (2, 4, 8, 8) and tok.code_shape == (4, 8, 8) and tok.num_tokens == 64
    y = tok.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    with pytest.raises(ValueError, match="multiple"):
        KLConfig(image_size=28, pad=1, channels=(8, 16, 16))


def test_registry_round_trip_keeps_the_scale(tmp_path):
    torch.manual_seed(0)
    tok = KLTokenizer(TINY).eval()
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    tok.config.scale_factor = tok.measure_scale(x)
    registry.save(tok, tmp_path / "kl.safetensors")
    again = registry.load(tmp_path / "kl.safetensors")
    assert again.config.scale_factor == tok.config.scale_factor and registry.kind_of(again) == "kl"
    assert torch.allclose(again.encode(x), tok.encode(x)) and abs(again.encode(x).std().item() - 1) < 1e-4


def test_loads_a_real_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16, scaling_factor=0.2325).eval()
    vae.save_pretrained(tmp_path / "vae")
    tok = KLTokenizer.from_diffusers(tmp_path / "vae")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * 0.2325
        assert torch.allclose(tok.encode(x), want, atol=1e-6)
        assert torch.allclose(tok.decode(want), vae.decode(want / 0.2325).sample.clamp(-1, 1), atol=1e-6)
    assert kl_main([str(tmp_path / "vae"), str(tmp_path / "kl.safetensors")]) == 0  # the command-line import
    assert registry.load(tmp_path / "kl.safetensors").config.scale_factor == pytest.approx(0.2325)
    assert kl_main([str(tmp_path / "missing"), str(tmp_path / "x.safetensors")]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_fit_lowers_reconstruction_and_stores_the_scale(tmp_path):
    from conftest import LossRecorder, make_trainer
    from train.datamodules import ImageDataModule
    from train.kl_module import KLTokenizerModule

    torch.manual_seed(0)
    out = tmp_path / "kl.safetensors"
    module = KLTokenizerModule(TINY, lr=3e-3, warmup_steps=5, scale_images=128, export_path=str(out))
    rec = LossRecorder("train/rec")
    trainer = make_trainer(tmp_path, 60, [rec], val_check_interval=30)
    trainer.fit(module, ImageDataModule("digits", holdout=200, image_size=8, batch_size=32, val_size=32))
    assert sum(rec.losses[-10:]) / 10 < 0.6 * sum(rec.losses[:5]) / 5
    tok = registry.load(out)
    assert tok.config.scale_factor != 1.0 and "val/psnr" in trainer.callback_metrics
    x = torch.stack([module.trainer.datamodule.train_set[i] for i in range(128)])
    assert abs(tok.encode(x).std().item() - 1) < 0.01  # measured on those same 128 training images
