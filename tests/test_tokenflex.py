"""TokenFLEX on scenes (synthetic items, tiny sizes): the token count drawn per batch from the mix, one model
captioning at two (and any square) counts, through the pipeline and the caption script."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import train.scenes as scenes
from conftest import make_trainer
from train.understanding.data import SceneCollate, ScenesDataModule
from train.understanding.module import UnderstandingLMModule

VIT = dict(vit_dim=32, vit_depth=1, vit_heads=2, counts=[16, 36], default_tokens=36)


@pytest.fixture(autouse=True)
def synthetic_items(monkeypatch):
    pools = scenes.ItemPools.synthetic()
    monkeypatch.setattr(scenes, "_load_pools", lambda *a: pools)


def _data(**kw) -> ScenesDataModule:
    kw = {"token_mix": {16: 0.3, 36: 0.7}, **kw}
    return ScenesDataModule(None, n_train=64, n_val=8, batch_size=8, max_len=96, p_caption_first=0.0, **kw)


def test_token_count_is_drawn_per_batch_from_the_mix():
    dm = _data()
    dm.setup()
    collate = SceneCollate(dm.format, None, {16: 0.3, 36: 0.7})
    items = [dm.train_set[(i, 1000 + i)] for i in range(8)]
    batch = collate(items)
    slots = dm.format.image_slots(batch["ids"])
    n = int(slots[0].sum())
    assert n in (16, 36) and (slots.sum(1) == n).all()  # one count per batch, in every row
    assert not batch["loss"][slots].any()  # the vectors are never targets
    assert torch.equal(collate(items)["ids"], batch["ids"])  # a function of the samples' seeds
    counts = Counter(collate.count([s]) for s in range(4000))
    assert set(counts) == {16, 36} and abs(counts[16] / 4000 - 0.3) < 0.03
    assert SceneCollate(dm.format, 36, None).count([5]) == 36
    with pytest.raises(ValueError, match="tokens or token_mix"):
        ScenesDataModule(None, n_train=8, p_caption_first=0.0)
    with pytest.raises(ValueError, match="vision_tokenizer"):
        ScenesDataModule(None, n_train=8, tokens=16, p_caption_first=0.5)


@pytest.fixture(scope="module")
def flexible_model(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    pools = scenes.ItemPools.synthetic()
    mp.setattr(scenes, "_load_pools", lambda *a: pools)
    tmp = tmp_path_factory.mktemp("tokenflex")
    torch.manual_seed(0)
    dm = _data()
    module = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", projector_hidden=32, vit=VIT,
                                   lr=3e-3, warmup_steps=2, export_path=str(tmp / "lm"))
    trainer = make_trainer(tmp, 6)
    trainer.fit(module, dm)
    trainer.save_checkpoint(tmp / "lm.ckpt")
    mp.undo()
    return tmp, dm


def test_one_model_captions_at_two_token_counts(flexible_model):
    from mmar.pipeline import Pipeline
    from models.bundle import load_bundle

    tmp, dm = flexible_model
    b = load_bundle(tmp / "lm.ckpt")
    assert b.vision is None and b.visual.config.counts == [16, 36]
    images = dm.val_scenes.images(range(4))
    seen = []
    real_call = b.lm.forward

    def spy(ids, **kw):
        if kw.get("embeds") is not None:
            seen.append(kw["embeds"].shape[0] // len(ids))
        return real_call(ids, **kw)

    b.lm.forward = spy
    for tokens in (16, 36, 25, None):
        caps = Pipeline(b).draw_captions(images, 10, tokens=tokens)
        assert len(caps) == 4 and all(isinstance(c, str) for c in caps)
    assert seen == [16, 36, 25, 36]  # slots per image: the count asked for (default: the model's)
    with pytest.raises(ValueError, match="square"):
        Pipeline(b).draw_captions(images, 4, tokens=20)


def test_caption_script_takes_tokens(flexible_model, capsys):
    from mmar.cli import run
    from vision_tokenizers.image_io import save_png

    tmp, dm = flexible_model
    folder = tmp / "images"
    folder.mkdir(exist_ok=True)
    for i, img in enumerate(dm.val_scenes.images(range(3))):
        save_png(img, folder / f"{i}.png")
    for tokens in ("16", "36"):
        assert run("caption", ["--ckpt", str(tmp / "lm"), "--tokens", tokens, str(folder)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and all("\t" in line for line in lines)
    assert run("caption", ["--ckpt", str(tmp / "lm"), "--tokens", "20", str(folder)]) == 2
    assert "square" in capsys.readouterr().err


def test_fixed_count_model_trains(tmp_path):
    torch.manual_seed(0)
    dm = _data(token_mix=None, tokens=16)
    module = UnderstandingLMModule(dm.spec, preset="tiny", inputs="vit_pool", projector_hidden=32,
                                   vit={**VIT, "counts": [16], "default_tokens": 16})
    before = module.visual.encoder.patch_embed.proj.weight.clone()
    make_trainer(tmp_path, 2).fit(module, dm)
    assert not torch.equal(before, module.visual.encoder.patch_embed.proj.weight)  # the ViT is trained here


def test_max_len_is_checked_against_the_longest_possible_caption():
    from train.understanding.data import longest_caption

    dm = _data()
    longest = longest_caption(dm.tokenizer)
    seen = max(len(dm.tokenizer.encode(c)) for i in range(len(dm.train_scenes)) for c in dm.train_scenes.captions(i))
    assert longest >= seen  # a bound over every scene, not a sample of them
    with pytest.raises(ValueError, match="too short"):
        ScenesDataModule(None, n_train=64, n_val=8, batch_size=8, max_len=longest + 36 + 5, p_caption_first=0.0,
                         token_mix={16: 0.3, 36: 0.7})  # the caption + 36 slots + 5 specials: refused (1 spare asked)
