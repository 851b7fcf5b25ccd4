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
from train.prior import PriorWeighting, prior_weights, word_token_ids
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


def test_paper_formula_and_floor_against_a_hand_computed_batch():
    """Two captions (4 and 3 tokens, right padding); the weights worked out by hand.
    floor 0 (the paper): raw 1 - p; row 0: [0.1, 0.5, 0.8, 0.01], sum 1.41, times 4 / 1.41;
                                     row 1: [1.0, 0.25, 0.0], sum 1.25, times 3 / 1.25.
    floor 0.05:          row 0: [0.1, 0.5, 0.8, 0.05], sum 1.45, times 4 / 1.45;
                         row 1: [1.0, 0.25, 0.05], sum 1.30, times 3 / 1.30."""
    p = torch.tensor([[0.9, 0.5, 0.2, 0.99, 0.3], [0.0, 0.75, 1.0, 0.4, 0.6]])
    sel = torch.tensor([[True, True, True, True, False], [True, True, True, False, False]])
    paper = prior_weights(p, sel, floor=0.0)
    assert paper[0].tolist() == pytest.approx([0.28368794, 1.41843972, 2.26950355, 0.02836879, 1.0], abs=1e-5)
    assert paper[1].tolist() == pytest.approx([2.4, 0.6, 0.0, 1.0, 1.0], abs=1e-5)
    floored = prior_weights(p, sel, floor=0.05)
    assert floored[0].tolist() == pytest.approx([0.27586207, 1.37931034, 2.20689655, 0.13793103, 1.0], abs=1e-5)
    assert floored[1].tolist() == pytest.approx([2.30769231, 0.57692308, 0.11538462, 1.0, 1.0], abs=1e-5)
    assert torch.equal(prior_weights(p, sel), paper)  # floor 0 is the default


def test_a_caption_whose_raw_weights_are_all_zero_keeps_weight_one():
    """Every token certain under the reference, no floor: nothing to prefer, plain NTP on that caption, no NaN."""
    p = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.5, 1.0, 0.0, 0.0]])
    sel = torch.tensor([[True, True, True, False], [True, True, False, False]])
    w = prior_weights(p, sel, floor=0.0)
    assert torch.isfinite(w).all()
    assert w[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert w[1].tolist() == pytest.approx([2.0, 0.0, 1.0, 1.0])
    assert torch.equal(prior_weights(p, torch.zeros_like(sel)), torch.ones(2, 4))  # no caption at all


def test_floor_and_source_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\]"):
        PriorWeighting(oracle_words=["cat"], floor=-0.1)
    with pytest.raises(ValueError, match="needs a reference model"):
        PriorWeighting()
    with pytest.raises(ValueError, match="needs a reference model"):
        PriorWeighting(oracle_words=[])
    with pytest.raises(ValueError, match="not both"):
        PriorWeighting(str(tmp_path), oracle_words=["cat"])
    assert PriorWeighting(oracle_words=["cat"], floor=0.0).floor == 0.0
    with pytest.raises(RuntimeError, match="no reference model"):
        PriorWeighting(oracle_words=["cat"]).ref
    with pytest.raises(RuntimeError, match="bind"):
        PriorWeighting(oracle_words=["cat"])(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.bool),
                                             torch.zeros(1, 3, dtype=torch.long))


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
    prior = PriorWeighting(ref, floor=0.05)  # the ablation; floor 0 below
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
    # the paper's formula (floor 0, the default) weights the predictable template even less
    paper = PriorWeighting(ref)
    paper.bind(tok, WORDS)
    w0, _ = paper(b["ids"], b["loss"], b["modality"])
    assert w0[filler].mean() < w[filler].mean() and w0[item].min() > 1.0
    assert w0[sel].mean().item() == pytest.approx(1.0, abs=1e-5)


def test_oracle_weights_only_the_class_word_tokens(tiny_vq_config):
    """Raw weight 1 on the oracle words' tokens, 0 on the other caption tokens, normalised per caption."""
    tok = TextTokenizer.train_bpe([f"the thing is a {w}" for w in WORDS] * 4, 300)
    oracle = PriorWeighting(oracle_words=["cat", "fox"])
    oracle.bind(tok, WORDS)
    cat, fox = tok.encode(" cat"), tok.encode(" fox")
    assert len(cat) == len(fox) == 1 and tok.encode("cat") == cat and len(tok.encode("the thing is a cat")) == 5
    assert oracle.oracle_ids.tolist() == sorted(cat + fox)
    layout = VocabLayout(tok.vocab_size, tiny_vq_config.codebook_size)
    fmt = SequenceFormat(tok, layout, SequenceConfig(max_len=32))
    codes = torch.zeros(2, 2, dtype=torch.long)
    b = fmt.collate([fmt.i2t_sample(codes, "the thing is a cat"), fmt.i2t_sample(codes, "the thing is a boat"),
                     fmt.i2t_sample(codes, "a cat is a fox"), fmt.t2i_sample(codes, "the thing is a cat")])
    w, stats = oracle(b["ids"], b["loss"], b["modality"])
    sel = caption_targets(b["ids"], b["loss"], b["modality"], tok)
    # caption tokens then <eos>: " the thing is a cat" -> all 6 on "cat"; " a cat is a fox" -> 3 each on "cat", "fox"
    assert w[0][sel[0]].tolist() == [0, 0, 0, 0, 6, 0]
    assert w[1][sel[1]].tolist() == [1] * 6  # no oracle word: weight 1 everywhere, as a caption of certain tokens
    assert w[2][sel[2]].tolist() == [0, 3, 0, 0, 3, 0]
    assert not sel[3].any() and (w[3] == 1).all() and (w[~sel] == 1).all()  # text->image, prompts, image codes
    assert stats["prior_w_mean"].item() == pytest.approx(1.0)
    torch.manual_seed(0)
    lm = Transformer(LMConfig.from_preset("tiny", vocab_size=layout.size, max_len=32))
    out = NextTokenPrediction(prior=oracle).loss(lm, b)
    assert torch.isfinite(out["loss"]) and not torch.allclose(out["loss"], NextTokenPrediction().loss(lm, b)["loss"])


def test_oracle_from_the_training_cli(tmp_path, tiny_vq_path):
    """The oracle control as the CLI builds it: typed init args, no reference, bound to the data's tokenizer."""
    from train.cli import main

    words = ["seven", "7"]
    cli = main(["--config", "configs/mnist_lm.yaml", "--trainer.default_root_dir", str(tmp_path),
                "--trainer.logger", "false", "--data.init_args.vision_tokenizer", str(tiny_vq_path),
                "--data.init_args.source", "digits", "--data.init_args.holdout", "200",
                "--data.init_args.bpe_vocab_size", "300", "--data.init_args.batch_size", "64",
                "--data.init_args.augment_copies", "0", "--data.init_args.max_len", "48",
                "--data.init_args.cache_dir", str(tmp_path / "cache"), "--model.init_args.preset", "tiny",
                "--model.init_args.objective.init_args.prior", "train.prior.PriorWeighting",
                "--model.init_args.objective.init_args.prior.init_args.oracle_words", "[seven, '7']"], run=False)
    prior = cli.model.objective.prior
    assert isinstance(prior, PriorWeighting) and prior.oracle_words == words and prior.reference is None
    tok = cli.datamodule.spec.tokenizer
    assert prior.tokenizer is tok and prior.oracle_ids.tolist() == word_token_ids(tok, words)
    cli.datamodule.setup("fit")
    b = next(iter(cli.datamodule.train_dataloader()))
    w, _ = prior(b["ids"], b["loss"], b["modality"])
    sel = caption_targets(b["ids"], b["loss"], b["modality"], tok)
    on = torch.isin(b["ids"][:, 1:], prior.oracle_ids) & sel
    assert on.any() and (sel.any(1) & ~on.any(1)).any()  # captions of sevens and of other digits
    for r in sel.any(1).nonzero()[:, 0].tolist():
        if on[r].any():
            assert (w[r][sel[r] & ~on[r]] == 0).all()
            assert torch.allclose(w[r][on[r]], sel[r].sum() / on[r].sum() * torch.ones(()))
        else:
            assert (w[r] == 1).all()


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
