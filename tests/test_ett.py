"""ETT's three stages on scenes (synthetic items, tiny sizes): what each stage trains and freezes, the stage-2
loss, stage chaining, the YAML recipes, and text-to-image with the tuned tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train.scenes as scenes
from conftest import make_trainer
from train.understanding.data import ScenesDataModule
from train.understanding.module import UnderstandingLMModule
from vision_tokenizers import registry
from vision_tokenizers.vq import VQConfig, VQTokenizer

SCENE_VQ = VQConfig(in_channels=1, image_size=56, channels=(8, 16, 16, 16), latent_dim=8, codebook_size=32,
                    mid_attention=False, restart_dead_codes=False)
STAGES = {1: dict(train_lm=False, train_projector=True, train_tokenizer=False),
          2: dict(train_lm=True, train_projector=True, train_tokenizer=True),
          3: dict(train_lm=True, train_projector=True, train_tokenizer=False)}


@pytest.fixture(autouse=True)
def synthetic_items(monkeypatch):
    pools = scenes.ItemPools.synthetic()
    monkeypatch.setattr(scenes, "_load_pools", lambda *a: pools)


@pytest.fixture(scope="module")
def scene_vq(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("scene_vq") / "vq.safetensors"
    registry.save(VQTokenizer(SCENE_VQ), path)
    return str(path)


def _data(vq: str, **kw) -> ScenesDataModule:
    return ScenesDataModule(vq, n_train=64, n_val=8, batch_size=8, max_len=112, **kw)


def _module(dm, stage: int, **kw) -> UnderstandingLMModule:
    return UnderstandingLMModule(dm.spec, preset="tiny", inputs="codebook", projector_hidden=32, warmup_steps=1,
                                 lr=1e-2, **STAGES[stage], **kw)


def _snapshot(module) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.detach().clone() for k, v in part.state_dict().items()}
            for name, part in module.parts().items() if part is not None}


def _changed(before, after) -> dict[str, bool]:
    return {name: any(not torch.equal(v, after[name][k]) for k, v in part.items() if v.is_floating_point())
            for name, part in before.items()}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_each_stage_trains_only_its_parts(stage, scene_vq, tmp_path):
    torch.manual_seed(0)
    dm = _data(scene_vq)
    module = _module(dm, stage)
    before = _snapshot(module)
    make_trainer(tmp_path, 2).fit(module, dm)
    changed = _changed(before, _snapshot(module))
    flags = STAGES[stage]
    assert changed == {"lm": flags["train_lm"], "projector": flags["train_projector"],
                       "tokenizer": flags["train_tokenizer"]}


def test_stage2_loss_is_caption_plus_alpha_vq(scene_vq):
    torch.manual_seed(0)
    dm = _data(scene_vq)
    dm.setup()
    module = _module(dm, 2, vq_weight=0.25).train()
    batch = next(iter(dm.train_dataloader()))
    out = module._run(batch)
    assert out["loss"].item() == pytest.approx(out["cap_loss"].item() + 0.25 * (out["vq_rec"] + out["vq_quant"]).item(),
                                               rel=1e-5)
    module.flags["tokenizer"] = False  # without tuning: the plain LM loss
    assert "cap_loss" not in module._run(batch)


def test_stages_chain_and_the_tuned_tokenizer_draws(scene_vq, tmp_path):
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle

    torch.manual_seed(0)
    ckpts = {}
    for stage in (1, 2, 3):
        dm = _data(scene_vq)
        module = _module(dm, stage, init_from=ckpts.get(stage - 1),
                         export_path=str(tmp_path / "lm") if stage == 3 else None)
        trainer = make_trainer(tmp_path / str(stage), 2)
        trainer.fit(module, dm)
        ckpts[stage] = str(tmp_path / f"stage{stage}.ckpt")
        trainer.save_checkpoint(ckpts[stage])
    untuned = registry.load(scene_vq)
    tuned = load_bundle(ckpts[3])
    assert not torch.equal(tuned.vision.encoder.conv_in.weight, untuned.encoder.conv_in.weight)  # stage 2 tuned it
    stage2 = load_bundle(ckpts[2])
    for k, v in tuned.vision.state_dict().items():  # stage 3 kept stage 2's tokenizer
        assert torch.equal(v, stage2.vision.state_dict()[k]), k
    folder = load_bundle(tmp_path / "lm")  # the exported inference folder has the same tokenizer
    assert torch.equal(folder.vision.encoder.conv_in.weight, tuned.vision.encoder.conv_in.weight)
    images = Pipeline(tuned).draw_images(["a 7 at the top left"], n=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 56, 56)
    caps = Pipeline(folder).draw_captions(dm.val_scenes.images(range(2)), 8)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)


def test_codes_baseline_reads_code_ids(scene_vq, tmp_path):
    torch.manual_seed(0)
    dm = _data(scene_vq)
    dm.setup()
    module = UnderstandingLMModule(dm.spec, preset="tiny", inputs="codes")
    assert module.visual is None
    batch = next(iter(dm.train_dataloader()))
    out = module._run(batch)
    assert torch.isfinite(out["loss"])
    with pytest.raises(ValueError, match="train_tokenizer"):
        UnderstandingLMModule(dm.spec, preset="tiny", inputs="codes", train_tokenizer=True)
    with pytest.raises(ValueError, match="frozen"):
        UnderstandingLMModule(dm.spec, preset="tiny", train_lm=False, train_projector=False)


@pytest.mark.parametrize("config", sorted(str(p) for p in Path("configs").glob("scenes_*.yaml")))
def test_scene_recipes_parse(config, scene_vq, tmp_path):
    from train.cli import main

    args = ["--config", config, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
            "--data.init_args.n_train", "16", "--model.init_args.preset", "tiny",
            "--data.init_args.max_len", "160"]  # a BPE of 16 scenes' captions splits them into more tokens
    if "tokenizer" in config:
        args = ["--config", config, "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
                "--model.init_args.tokenizer.channels", "[8, 16, 16, 16]"]
    elif "tokenflex" not in config:
        args += ["--data.init_args.vision_tokenizer", scene_vq]
    if "init_from" in Path(config).read_text():
        args += ["--model.init_args.init_from", "null"]
    cli = main(args, run=False)
    assert cli.model is not None and cli.datamodule is not None
