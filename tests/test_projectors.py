"""Projectors and continuous visual inputs: shapes, gradients, the slot layout of the sequence format, the
embeddings reaching the backbone (training and KV-cached decoding), and bundles with a visual input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.bundle import Bundle, load_bundle
from models.config import LMConfig
from models.objectives import NextTokenPrediction
from models.sampling import generate
from models.sequence import SequenceFormat
from models.transformer import Transformer
from models.vocab import VocabLayout
from vision_tokenizers.projectors import (CodebookInput, CodebookInputConfig, ETTProjector, TokenFlexProjector,
                                          ViTPoolInput, ViTPoolInputConfig, WithEmbeds, build, describe, grid_side)
from vision_tokenizers.vq import VQConfig, VQTokenizer

SCENE_VQ = VQConfig(in_channels=1, image_size=56, channels=(8, 16, 16, 16), latent_dim=8, codebook_size=32,
                    mid_attention=False, restart_dead_codes=False)
TINY_VIT = ViTPoolInputConfig(vit_dim=32, vit_depth=1, vit_heads=2, lm_dim=64, hidden=32, counts=[16, 36],
                              default_tokens=36)


def _grads_everywhere(module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_ett_projector_shapes_and_gradients():
    torch.manual_seed(0)
    proj = ETTProjector(8, 64, 32)
    x = torch.randn(2, 49, 8, requires_grad=True)
    y = proj(x)
    assert y.shape == (2, 49, 64)
    y.square().mean().backward()
    assert _grads_everywhere(proj) and x.grad.abs().sum() > 0
    assert torch.allclose(y, proj.fc2(F.gelu(proj.fc1(x))))  # Linear - GELU - Linear


@pytest.mark.parametrize("n", [1, 4, 6, 8, 14])
def test_tokenflex_projector_any_count(n):
    torch.manual_seed(0)
    proj = TokenFlexProjector(32, 64, 48)
    grid = torch.randn(2, 32, 14, 14, requires_grad=True)
    y = proj(grid, n)
    assert y.shape == (2, n * n, 64)
    y.square().mean().backward()
    assert _grads_everywhere(proj) and grid.grad.abs().sum() > 0


def test_tokenflex_pools_cells_in_row_major_order():
    proj = TokenFlexProjector(1, 1, 4)
    grid = torch.arange(16.0).view(1, 1, 4, 4)
    pooled = F.adaptive_avg_pool2d(grid, 2).flatten(2).transpose(1, 2)  # what forward pools: [1, 4, 1]
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    with torch.no_grad():  # a zero SwiGLU branch and identity output map: the projector returns the pooled cells
        proj.down.weight.zero_()
        proj.out.weight.fill_(1.0)
        proj.out.bias.zero_()
    assert torch.equal(proj(grid, 2), pooled)


def test_codebook_input_is_the_codebook_rows_and_tunes_the_tokenizer():
    torch.manual_seed(0)
    vq = VQTokenizer(SCENE_VQ)
    visual = CodebookInput(CodebookInputConfig(code_dim=8, lm_dim=64, hidden=32))
    images = torch.rand(2, 1, 56, 56) * 2 - 1
    with torch.no_grad():
        codes = vq.encode(images)  # [2, 7, 7]
        want = visual.projector(vq.quantizer.embed(codes).flatten(2).transpose(1, 2))
    vq.eval()
    out = visual(images, vq)
    assert out.shape == (2, 49, 64) and torch.allclose(out, want, atol=1e-6)
    out.square().mean().backward()  # gradient reaches the projector, the codebook and (straight through) the encoder
    assert _grads_everywhere(visual)
    assert vq.quantizer.embedding.weight.grad[codes.unique()].abs().sum() > 0
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert visual.count(vq) == 49
    with pytest.raises(ValueError, match="TokenFLEX"):
        visual(images, vq, tokens=16)


def test_vit_pool_input_counts():
    torch.manual_seed(0)
    visual = ViTPoolInput(TINY_VIT)
    images = torch.rand(2, 1, 56, 56) * 2 - 1
    for tokens, want in ((None, 36), (16, 16), (25, 25), (196, 196)):
        assert visual(images, tokens=tokens).shape == (2, want, 64)
    visual(images, tokens=16).sum().backward()
    assert visual.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="square"):
        visual(images, tokens=20)
    with pytest.raises(ValueError, match="grid"):
        visual(images, tokens=225)
    assert grid_side(64) == 8
    rebuilt = build(describe(visual))
    assert isinstance(rebuilt, ViTPoolInput) and rebuilt.config == visual.config


def test_slot_layout_in_the_sequence_format(caption_tokenizer):
    fmt = SequenceFormat(caption_tokenizer, VocabLayout(caption_tokenizer.vocab_size, 0))
    prompt = fmt.caption_prompt_slots(5)
    s = fmt.i2t_slots_sample(5, "a handwritten 7")
    assert s.ids[:len(prompt)].tolist() == prompt  # the prompt is the start of the training sample
    slots = fmt.image_slots(s.ids[None])[0]
    assert slots.sum() == 5 and slots[3:8].all()
    assert not s.loss[slots].any() and s.loss[-1]  # slots are inputs only; the caption and <eos> are targets
    t2i = fmt.t2i_sample(torch.arange(4), "a handwritten 7")
    assert fmt.image_slots(t2i.ids[None])[0].sum() == 4


def _tiny_lm(vocab, max_len=64):
    torch.manual_seed(0)
    return Transformer(LMConfig.from_preset("tiny", vocab_size=vocab, max_len=max_len)).eval()


def test_embeds_reach_the_backbone_in_training_and_decoding(caption_tokenizer):
    fmt = SequenceFormat(caption_tokenizer, VocabLayout(caption_tokenizer.vocab_size, 0))
    lm = _tiny_lm(caption_tokenizer.vocab_size)
    ids = torch.tensor([fmt.caption_prompt_slots(4)] * 2)
    mask = fmt.image_slots(ids)
    embeds = torch.randn(8, lm.cfg.dim)
    direct = lm(ids, embeds=embeds, embed_mask=mask)
    assert torch.equal(WithEmbeds(lm, embeds, mask)(ids), direct)
    assert not torch.allclose(lm(ids), direct)  # the vectors matter
    # KV-cached greedy decoding with the vectors in the prefill == step-by-step full forwards
    out = generate(WithEmbeds(lm, embeds, mask), ids, 6, temperature=0.0)
    seq = ids
    for _ in range(6):
        full_mask = torch.cat([mask, torch.zeros(2, seq.shape[1] - ids.shape[1], dtype=torch.bool)], 1)
        nxt = lm.head(lm(seq, embeds=embeds, embed_mask=full_mask)[:, -1]).argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq[:, ids.shape[1]:])
    # training: the objective sees ids[:, :-1]; the slots all lie before the last column
    sample = fmt.i2t_slots_sample(4, "a handwritten 7")
    batch = fmt.collate([sample, sample])
    m = fmt.image_slots(batch["ids"])
    loss = NextTokenPrediction().loss(WithEmbeds(lm, embeds, m), batch)["loss"]
    assert torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["codebook", "vit_pool"])
def test_bundle_with_a_visual_input_round_trips(kind, caption_tokenizer, tmp_path):
    from mmar.pipeline import Pipeline

    torch.manual_seed(0)
    if kind == "codebook":
        vision = VQTokenizer(SCENE_VQ).eval()
        visual = CodebookInput(CodebookInputConfig(8, 64, 32))
        layout = VocabLayout(caption_tokenizer.vocab_size, SCENE_VQ.codebook_size)
    else:
        vision, visual = None, ViTPoolInput(TINY_VIT)
        layout = VocabLayout(caption_tokenizer.vocab_size, 0)
    b = Bundle(_tiny_lm(layout.size, 96), caption_tokenizer, layout, vision, 96, NextTokenPrediction(), visual.eval())
    assert b.image_size == 56 and b.image_channels == 1
    b.save(tmp_path / "m")
    assert (tmp_path / "m" / "vision_tokenizer.safetensors").exists() == (kind == "codebook")
    b2 = load_bundle(tmp_path / "m")
    images = torch.rand(3, 1, 56, 56) * 2 - 1
    assert Pipeline(b).draw_captions(images, 6) == Pipeline(b2).draw_captions(images, 6)
    for (k, v), (k2, v2) in zip(b.visual.state_dict().items(), b2.visual.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_real_size_ett_and_tokenflex_on_meta():
    from vision_tokenizers.projectors import real_size_summary

    s = real_size_summary()
    assert s["ett"]["codebook"] == [131_072, 256] and s["ett"]["codebook_params"] == 131_072 * 256
    assert s["ett"]["downsample"] == 16 and s["ett"]["codes_per_image"] == 256
    assert s["tokenflex"]["grid"] == [27, 27]
    assert {int(k): v[0] for k, v in s["tokenflex"]["tokens"].items()} == {64: 64, 144: 144, 256: 256}
    assert 380e6 < s["tokenflex"]["encoder_params"] < 430e6  # SigLIP-so400m's size
