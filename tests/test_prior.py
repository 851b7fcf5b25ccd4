"""PRIOR: caption-token weights from a frozen text-only reference model (train/prior.py)."""
from __future__ import annotations

import random

import pytest
import torch

from models.bundle import Bundle
from models.config import LMConfig
from models.objectives import NextTokenPrediction
from models.sequence import SequenceConfig, SequenceFormat, caption_targets
from models.text_tokenizer import TextTokenizer
from models.transformer import Transformer
from models.vocab import VocabLayout
from train.prior import PriorWeighting, prior_weights
from vision_tokenizers import registry

WORDS = ["apple", "boat", "cat", "drum", "egg", "fox", "gate", "hat"]


def test_weights_normalise_per_caption_with_a_floor():
    p = torch.tensor([[0.99, 0.10, 0.50, 0.0], [0.2, 0.2, 0.0, 0.0]])
    sel = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = prior_weights(p, sel, alpha=1.0, floor=0.05)
    raw = torch.tensor([0.05, 0.90, 0.50])  # 1 - 0.99 = 0.01 is raised to the floor
    assert torch.allclose(w[0, :3], raw * 3 / raw.sum())
    assert torch.allclose(w[1, :2], torch.ones(2)) and w[0, 3] == 1 and (w[1, 2:] == 1).all()
    for r in range(2):
        assert w[r][sel[r]].mean().item() == pytest.approx(1.0)
    assert w[0, 0] < 0.2 < 1 < w[0, 1]
    w2 = prior_weights(p, sel, alpha=2.0, floor=0.05)
    assert w2[0, 1] / w2[0, 2] == pytest.approx((0.9 / 0.5) ** 2, rel=1e-5)


def test_only_caption_tokens_of_image_to_text_samples_are_selected(caption_tokenizer, tiny_vq_config):
    layout = VocabLayout(caption_tokenizer.vocab_size, tiny_vq_config.codebook_size)
    fmt = SequenceFormat(caption_tokenizer, layout, SequenceConfig(max_len=48))
    codes = torch.arange(4).view(2, 2)
    i2t, t2i = fmt.i2t_sample(codes, "a handwritten 7"), fmt.t2i_sample(codes, "a handwritten 7")
    b = fmt.collate([i2t, t2i])
    sel = caption_targets(b["ids"], b["loss"], b["modality"], caption_tokenizer)
    caption = caption_tokenizer.encode("a handwritten 7") + [caption_tokenizer.eos_id]
    assert b["ids"][0, 1:][sel[0]].tolist() == caption  # the caption and its <eos>, nothing else
    assert not sel[1].any()  # text->image: no PRIOR weight on its prompt, image codes or <eos>


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_vq_path) -> tuple[str, TextTokenizer]:
    """A tiny text-only reference LM trained on "the thing is a <word>" with the word drawn at random: the
    template is predictable from text, the word is not."""
    caps = [f"the thing is a {w}" for w in WORDS]
    tok = TextTokenizer.train_bpe(caps * 4, 300)  # above the 256 byte symbols: each word becomes one token
    vision = registry.load(tiny_vq_path)
    layout = VocabLayout(tok.vocab_size, vision.config.codebook_size)
    fmt = SequenceFormat(tok, layout, SequenceConfig(max_len=32))
    torch.manual_seed(0)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=32))
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(150):
        b = fmt.collate([fmt.text_sample(rng.choice(caps)) for _ in range(32)])
        out = NextTokenPrediction().loss(lm, b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    folder = tmp_path_factory.mktemp("prior") / "ref"
    Bundle(lm.eval(), tok, layout, vision, 32, NextTokenPrediction()).save(folder)
    return str(folder), tok


def test_reference_model_weights_filler_low_and_item_words_high(reference):
    ref, tok = reference
    prior = PriorWeighting(ref, floor=0.05)
    prior.bind(tok, WORDS)
    layout = prior.ref.layout
    fmt = SequenceFormat(tok, layout, SequenceConfig(max_len=32))
    b = fmt.collate([fmt.i2t_sample(torch.zeros(2, 2, dtype=torch.long), f"the thing is a {w}") for w in WORDS[:4]])
    w, stats = prior(b["ids"], b["loss"], b["modality"])
    sel = caption_targets(b["ids"], b["loss"], b["modality"], tok)
    word_ids = set(prior.item_ids.tolist())
    target = b["ids"][:, 1:]
    item = torch.tensor([[t in word_ids for t in row] for row in target.tolist()]) & sel
    filler = sel & ~item
    assert item.any() and filler.any()
    assert w[item].min() > 1.0, w[item]  # the word only the image can tell
    assert w[filler].mean() < 0.5, w[filler]  # "the thing is a" is known from the text
    assert stats["prior_w_mean"].item() == pytest.approx(1.0, abs=1e-5)
    assert stats["prior_item_weight_share"] > item.sum() / sel.sum()
    # the cache serves repeated captions without running the reference again
    assert len(prior._cache) == 4
    w_again, _ = prior(b["ids"], b["loss"], b["modality"])
    assert torch.equal(w, w_again)


def test_prior_loss_equals_ntp_when_weights_are_one_and_differs_otherwise(reference, monkeypatch):
    ref, tok = reference
    prior = PriorWeighting(ref)
    layout = prior.ref.layout
    fmt = SequenceFormat(tok, layout, SequenceConfig(max_len=32))
    codes = torch.zeros(2, 2, dtype=torch.long)
    b = fmt.collate([fmt.i2t_sample(codes, "the thing is a cat"), fmt.t2i_sample(codes, "the thing is a fox")])
    torch.manual_seed(1)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=32))
    plain = NextTokenPrediction().loss(lm, b)
    weighted = NextTokenPrediction(prior=prior).loss(lm, b)
    assert not torch.allclose(plain["loss"], weighted["loss"])
    assert torch.equal(plain["nll"], weighted["nll"])  # the reported nll stays the plain mean
    monkeypatch.setattr(PriorWeighting, "forward", lambda self, ids, flag, mod: (torch.ones(ids[:, 1:].shape), {}))
    ones = NextTokenPrediction(prior=prior).loss(lm, b)
    assert torch.allclose(plain["loss"], ones["loss"])
    with torch.no_grad():  # validation: no weights
        assert torch.allclose(NextTokenPrediction().loss(lm, b)["loss"], NextTokenPrediction(prior=prior).loss(lm, b)["loss"])


def test_reference_with_another_tokenizer_is_refused(reference, caption_tokenizer, tmp_path):
    ref, _ = reference
    with pytest.raises(ValueError, match="another text tokenizer"):
        PriorWeighting(ref).bind(caption_tokenizer)
    with pytest.raises(FileNotFoundError, match="reference model not found"):
        PriorWeighting(str(tmp_path / "nope"))


def test_recipes_train_a_reference_then_a_prior_weighted_model(tmp_path, tiny_vq_path):
    """configs/mnist_prior_ref.yaml then configs/mnist_prior.yaml through the training CLI, shrunk to digits."""
    from models.bundle import load_bundle
    from train.cli import main

    data = ["--data.init_args.vision_tokenizer", str(tiny_vq_path), "--data.init_args.source", "digits",
            "--data.init_args.holdout", "200", "--data.init_args.bpe_vocab_size", "300",
            "--data.init_args.batch_size", "16", "--trainer.max_steps", "4", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0"]
    main(["fit", "--config", "configs/mnist_prior_ref.yaml", "--trainer.default_root_dir", str(tmp_path / "ref"),
          *data])
    ref = tmp_path / "ref" / "checkpoints" / "last.ckpt"
    cli = main(["--config", "configs/mnist_prior.yaml", "--trainer.default_root_dir", str(tmp_path / "lm"),
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", *data,
                "--data.init_args.augment_copies", "0", "--data.init_args.max_len", "48",
                "--data.init_args.cache_dir", str(tmp_path / "cache"), "--model.init_args.preset", "tiny",
                "--model.init_args.objective.init_args.prior.init_args.reference", str(ref)], run=False)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ != "SampleLogger"]
    cli.trainer.fit(cli.model, cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert "train/prior_w_mean" in logged and logged["train/prior_w_max"] > 1.0
    b = load_bundle(tmp_path / "lm" / "checkpoints" / "last.ckpt")  # a plain NTP model: no reference inside
    assert not any("prior" in k for k in b.lm.state_dict()) and b.objective.prior is None


def test_continuous_input_samples_weight_the_same_caption_tokens(caption_tokenizer, tiny_vq_config):
    """An image->text sample with embedding slots (ETT / TokenFLEX inputs) selects exactly its caption, as with codes."""
    layout = VocabLayout(caption_tokenizer.vocab_size, 0)
    fmt = SequenceFormat(caption_tokenizer, layout, SequenceConfig(max_len=48))
    b = fmt.collate([fmt.i2t_slots_sample(9, "a handwritten 7")])
    sel = caption_targets(b["ids"], b["loss"], b["modality"], caption_tokenizer)
    assert b["ids"][0, 1:][sel[0]].tolist() == caption_tokenizer.encode("a handwritten 7") + [caption_tokenizer.eos_id]


def test_scenes_reference_recipe_then_prior_on_a_vit_model(tmp_path, tiny_vq_path):
    """configs/scenes_prior_ref.yaml, then PRIOR added to the continuous-input recipe (configs/scenes_tokenflex.yaml:
    a ViT whose pooled grid enters through a projector), both shrunk, through the training CLI."""
    from train.cli import main

    small = ["--data.init_args.n_train", "64", "--trainer.max_steps", "3", "--trainer.logger", "false",
             "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "0", "--trainer.callbacks", "[]",
             "--model.init_args.preset", "tiny"]
    main(["fit", "--config", "configs/scenes_prior_ref.yaml", "--trainer.default_root_dir", str(tmp_path / "ref"),
          "--data.init_args.vision_tokenizer", str(tiny_vq_path), "--data.init_args.batch_size", "16", *small])
    ref = tmp_path / "ref" / "checkpoints" / "last.ckpt"
    cli = main(["--config", "configs/scenes_tokenflex.yaml", "--trainer.default_root_dir", str(tmp_path / "lm"), *small,
                "--data.init_args.token_mix", "{16: 1.0}", "--data.init_args.batch_size", "8",
                "--model.init_args.export_path", "null",
                "--model.init_args.objective.init_args.prior", "train.prior.PriorWeighting",
                "--model.init_args.objective.init_args.prior.init_args.reference", str(ref)], run=False)
    cli.trainer.fit(cli.model, cli.datamodule)
    logged = cli.trainer.callback_metrics
    assert "train/prior_w_mean" in logged and logged["train/prior_w_max"] > 1.0
    assert 0 < logged["train/prior_item_weight_share"] < 1
