"""Short real fits on scikit-learn digits through the Lightning modules, the CLI and the checkpoints."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.bundle import load_bundle
from train.cli import main as cli_main
from train.datamodules import ImageDataModule, ImageTextDataModule
from train.tokenizer_module import VQTokenizerModule

from conftest import LossRecorder, make_trainer


def _mean(xs):
    return sum(xs) / len(xs)


def test_tokenizer_fit_lowers_reconstruction_loss(tmp_path, tiny_vq_config):
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_vq_config, restart_dead_codes=True)
    module = VQTokenizerModule(cfg, lr=3e-3, warmup_steps=5, export_path=str(tmp_path / "vq.safetensors"))
    rec = LossRecorder("train/rec")
    trainer = make_trainer(tmp_path, 60, [rec], val_check_interval=30)
    trainer.fit(module, ImageDataModule("digits", holdout=200, image_size=8, batch_size=32, val_size=32))
    assert _mean(rec.losses[-10:]) < 0.6 * _mean(rec.losses[:5])
    assert (tmp_path / "vq.safetensors").is_file()  # exported at the end of fit
    assert "val/psnr" in trainer.callback_metrics


def test_lm_fit_lowers_loss(fitted_lm):
    _, losses, _, _ = fitted_lm
    assert _mean(losses[-10:]) < _mean(losses[:5]) - 0.5


def test_codes_are_cached_on_disk(fitted_lm):
    _, _, _, dm = fitted_lm
    files = list((dm.cache_dir and __import__("pathlib").Path(dm.cache_dir)).glob("codes-*.safetensors"))
    assert len(files) == 2  # train and validation splits
    again = ImageTextDataModule(dm.vision_path, source="digits", holdout=200, bpe_vocab_size=200,
                                batch_size=32, max_len=48, cache_dir=dm.cache_dir)
    again.setup()
    assert torch.equal(again.train_set.codes, dm.train_set.codes)


def test_augmented_copies_are_cached_after_the_originals(fitted_lm, tmp_path):
    _, _, _, dm = fitted_lm
    aug = ImageTextDataModule(dm.vision_path, source="digits", holdout=200, bpe_vocab_size=200, batch_size=32,
                              max_len=48, cache_dir=str(tmp_path), augment_copies=2)
    aug.setup()
    n = len(dm.train_set.codes)
    codes = aug.train_set.codes  # [3N, h, w]: originals, then two warped copies
    assert len(aug.train_set) == len(codes) == 3 * n
    assert torch.equal(codes[:n], dm.train_set.codes)
    assert not torch.equal(codes[n:2 * n], codes[:n]) and not torch.equal(codes[2 * n:], codes[n:2 * n])
    assert len(list(tmp_path.glob("codes-*.safetensors"))) == 2
    again = ImageTextDataModule(dm.vision_path, source="digits", holdout=200, bpe_vocab_size=200, batch_size=32,
                                max_len=48, cache_dir=str(tmp_path), augment_copies=2)
    again.setup()  # same seed: the cache is read back, not re-drawn
    assert torch.equal(again.train_set.codes, codes) and len(list(tmp_path.glob("codes-*.safetensors"))) == 2

    class Recorder:  # stands in for the sequence format: returns what it was given
        def build(self, codes, caption, rng, where):
            return codes, caption, where

    aug.train_set.format = Recorder()
    got_codes, cap, where = aug.train_set[(2 * n + 5, 123)]  # a warped copy carries the captions of its image
    assert torch.equal(got_codes, codes[2 * n + 5].long()) and cap in aug.train_data.captions[5]
    assert where.endswith("[5]")
    with pytest.raises(ValueError, match="augment_copies"):
        ImageTextDataModule(dm.vision_path, source="digits", holdout=200, augment_copies=-1)


def test_text_weight_reweights_text_tokens(fitted_lm):
    from models.objectives import NextTokenPrediction
    from models.sequence import TEXT

    module, _, _, dm = fitted_lm
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        base = module.objective.loss(module.lm, batch)
        out = NextTokenPrediction(text_weight=3.0).loss(module.lm, batch)
    flag, mod = batch["loss"][:, 1:], batch["modality"][:, 1:]
    n_text, n_image = (flag & (mod == TEXT)).sum(), (flag & (mod != TEXT)).sum()
    want = (3 * n_text * base["nll_text"] + n_image * base["nll_image"]) / (3 * n_text + n_image)
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["nll"], base["loss"], rtol=1e-5, atol=1e-5)  # the plain mean is unchanged
    with pytest.raises(ValueError, match="text_weight"):
        NextTokenPrediction(text_weight=0.0)


def test_no_empty_captions_at_temperature_one(fitted_lm):
    """Image->text prompts start with <i2t>, never like a caption-dropped text->image sample, so even a
    barely trained model sampled at temperature 1 writes some caption for every image."""
    from mmar.pipeline import Pipeline

    module, _, _, dm = fitted_lm
    images = torch.stack([dm.val_images.image(i, 1, 8) for i in range(len(dm.val_images))])[:200]
    caps = Pipeline(module.bundle()).draw_captions(images, max_new_tokens=12, temperature=1.0,
                                                   generator=torch.Generator().manual_seed(0))
    assert len(caps) == len(images) and all(c.strip() for c in caps), [c for c in caps if not c.strip()][:3]


def test_lightning_checkpoint_loads_weights_only_as_bundle(fitted_lm):
    module, _, ckpt, _ = fitted_lm
    raw = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled code needed
    assert raw["mmar"]["format"] == "mmar-bundle/2" and raw["mmar"]["objective"]["name"] == "ntp"
    b = load_bundle(ckpt)
    ids = torch.randint(0, b.layout.size, (1, 10))
    torch.testing.assert_close(b.lm(ids), module.lm.float().eval()(ids))
    assert b.objective.config == module.objective.config
    assert not list(ckpt.parent.glob(".*.tmp"))  # atomic write left no temp file


def test_print_config(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", "configs/mnist_lm.yaml", "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "train.lm_module.MultimodalLMModule" in out and "gradient_clip_val" in out
    assert "models.objectives.NextTokenPrediction" in out and "text_weight: 4.0" in out


def test_cli_rejects_bad_value(capsys):
    from mmar.cli import main

    assert main(["fit", "--config", "configs/mnist_lm.yaml", "--trainer.max_epochs", "many"]) == 2
    err = capsys.readouterr().err
    assert "max_epochs" in err and err.count("\n") == 1 and "Traceback" not in err
