"""xAR end to end on real data (scikit-learn digits): KL latents -> the LM module -> a .ckpt and an inference
folder -> generate/text_to_image.py picks the xAR path from the checkpoint."""
from __future__ import annotations

import pytest
import torch

from models.bundle import load_bundle
from vision_tokenizers import registry
from vision_tokenizers.kl import KLConfig, KLTokenizer


@pytest.fixture(scope="module")
def xar_ckpt(tmp_path_factory):
    from conftest import LossRecorder, make_trainer
    from models.objectives import XARFlowMatching
    from train.latent_data import LatentDataModule
    from train.lm_module import MultimodalLMModule

    tmp = tmp_path_factory.mktemp("xar")
    torch.manual_seed(0)
    kl = KLTokenizer(KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4)).eval()
    kl_path = tmp / "kl.safetensors"
    registry.save(kl, kl_path)
    dm = LatentDataModule(str(kl_path), source="digits", holdout=200, bpe_vocab_size=200, batch_size=32,
                          max_len=48, cache_dir=str(tmp / "cache"))
    obj = XARFlowMatching(dim=64, latent_channels=4, grid=4, entity="cell", entity_size=2, steps=2)
    module = MultimodalLMModule(dm.spec, obj, preset="xar-demo", dim=64, n_layers=2, n_heads=4, n_kv_heads=4,
                                mlp_dim=128, lr=3e-3, warmup_steps=5)
    rec = LossRecorder()
    trainer = make_trainer(tmp, 40, [rec])
    trainer.fit(module, dm)
    ckpt = tmp / "xar.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, rec.losses, dm, module


def test_lm_module_trains_xar(xar_ckpt):
    _, losses, dm, _ = xar_ckpt
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert len(list((dm.cache_dir and __import__("pathlib").Path(dm.cache_dir)).glob("latents-*"))) == 2


def test_text_to_image_script_draws_from_an_xar_checkpoint(xar_ckpt, tmp_path):
    from mmar.cli import run

    ckpt, _, _, module = xar_ckpt
    b = load_bundle(ckpt)
    assert type(b.objective).__name__ == "XARFlowMatching" and registry.kind_of(b.vision) == "kl"
    folder = tmp_path / "model"
    b.save(folder)  # the inference folder form as well
    for source in (ckpt, folder):
        out = tmp_path / f"out_{source.name}"
        assert run("t2i", ["--ckpt", str(source), "--prompt", "a handwritten 3", "--n", "2", "--steps", "2",
                           "--sampler", "euler", "--cfg-schedule", "constant", "--out", str(out)]) == 0
        assert (out / "grid.png").is_file() and (out / "000_01.png").is_file()


def test_pipeline_steps_and_sampler_reach_the_objective(xar_ckpt):
    from mmar.pipeline import Pipeline

    b = load_bundle(xar_ckpt[0])
    imgs = Pipeline(b).draw_images(["a handwritten 3", "the digit seven"], 2, cfg=2.0, steps=3, sampler="em",
                                   generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (4, 1, 8, 8) and imgs.min() >= -1 and imgs.max() <= 1
    again = Pipeline(b).draw_images(["a handwritten 3", "the digit seven"], 2, cfg=2.0, steps=3, sampler="em",
                                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(imgs, again)
    # the cfg schedule reaches the objective: constant guidance changes the first entity's draw, linear is the default
    kw = dict(cfg=3.0, steps=2, sampler="euler")
    draw = lambda **o: Pipeline(b).draw_images(["a handwritten 3"], 1, generator=torch.Generator().manual_seed(0),  # noqa: E731
                                               **kw, **o)
    assert torch.equal(draw(), draw(cfg_schedule="linear"))
    assert not torch.equal(draw(), draw(cfg_schedule="constant"))
    with pytest.raises(ValueError, match="cfg_schedule"):
        draw(cfg_schedule="cosine")
    with pytest.raises(ValueError, match="does not caption"):
        Pipeline(b).draw_captions(imgs)


def test_bad_input_is_one_line(xar_ckpt, tmp_path, capsys):
    from mmar.cli import run
    from train.latent_data import LatentDataModule

    assert run("t2i", ["--ckpt", str(xar_ckpt[0]), "--prompt", "x", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert run("t2i", ["--ckpt", str(tmp_path / "none.ckpt"), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    from vision_tokenizers.vq import VQConfig, VQTokenizer

    registry.save(VQTokenizer(VQConfig(image_size=8, channels=(8, 16), latent_dim=8, codebook_size=16,
                                       mid_attention=False)), tmp_path / "vq.safetensors")
    with pytest.raises(ValueError, match="continuous"):
        LatentDataModule(str(tmp_path / "vq.safetensors"), source="digits", holdout=200)
