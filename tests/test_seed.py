"""SEED: the causal Q-Former, codes, the three training stages on 8x8 digits, the diffusion detokenizer,
the SEED-LLaMA LM through both generate scripts, the registry, the real-size shapes and the unCLIP path."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mmar.cli import run
from models.bundle import load_bundle
from train.cli import main as cli_main
from train.datamodules import ImageDataModule, ImageTextDataModule
from train.lm_module import MultimodalLMModule
from train.seed import (ImageCaptionDataModule, SEEDDetokenizerModule, SEEDStage1Module, SEEDStage2Module,
                        contrastive_loss, tokenizer_json_path)
from vision_tokenizers import registry
from vision_tokenizers.diffusion_detok import DetokenizerConfig, DiffusionDetokenizer, unclip_images
from vision_tokenizers.seed import SEEDConfig, SEEDTokenizer, real_size_summary

from conftest import LossRecorder, make_trainer

TINY = SEEDConfig(in_channels=1, image_size=8, patch_size=2, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                  num_queries=8, qformer_dim=32, qformer_layers=2, qformer_heads=2, text_vocab_size=400,
                  max_text_len=16, contrastive_dim=16, codebook_size=32, code_dim=8, restart_dead_codes=True,
                  head_heads=2, recon_layers=1, gen_layers=1, reverse_qformer_layers=1, gen_dim=16)
TINY_DETOK = DetokenizerConfig(channels=(16, 16), attention_levels=1, sample_steps=4, guidance=2.0)
DIGITS = dict(source="digits", holdout=200, seed=0)


def _mean(xs):
    return sum(xs) / len(xs)


def _digits(n=6):
    from train.sources import load_digits_set

    d = load_digits_set()
    return torch.stack([d.image(i, 1, 8) for i in range(n)])  # [n, 1, 8, 8]


# ---- the module itself ------------------------------------------------------------------------

def test_queries_are_causal_and_text_is_bidirectional():
    torch.manual_seed(0)
    qf = SEEDTokenizer(TINY).eval().qformer
    assert torch.equal(qf.causal, torch.ones(8, 8, dtype=torch.bool).tril())
    feats = torch.randn(2, 17, 32)  # [B, P, E]
    base = qf.forward_queries(feats)  # [B, N, D]
    for j in (0, 3, 7):
        saved = qf.queries.detach().clone()
        with torch.no_grad():
            qf.queries[:, j] += torch.randn(32)  # perturb query j
        out = qf.forward_queries(feats)
        with torch.no_grad():
            qf.queries.copy_(saved)
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-5)  # earlier queries can't see it
        assert (out[:, j:] - base[:, j:]).abs().amax(-1).min() > 1e-3  # it and every later query do
    ids, valid = torch.randint(0, 400, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    cls = qf.forward_text(ids, valid)[:, 0]
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 400
    assert (qf.forward_text(ids2, valid)[:, 0] - cls).abs().max() > 1e-3  # [CLS] sees the last token
    valid[:, -1] = False  # ... unless it is padding
    torch.testing.assert_close(qf.forward_text(ids2, valid)[:, 0], qf.forward_text(ids, valid)[:, 0])


def test_qformer_output_depends_on_the_image():
    torch.manual_seed(0)
    tok = SEEDTokenizer(TINY).eval()
    x = _digits(6)
    with torch.no_grad():
        c = tok.causal_embeddings(x)  # [6, N, D]
        swapped = tok.causal_embeddings(x.flip(0))
    torch.testing.assert_close(swapped, c.flip(0))  # each image's own embeddings, whatever the batch
    rel = (c[:, None] - c[None]).norm(dim=-1) / c.norm(dim=-1)[:, None]  # [6, 6, N]
    other = ~torch.eye(6, dtype=torch.bool)
    assert (rel[other] > 1e-3).all()  # every query moves when the image changes (measured: >= 0.009 here)
    x.requires_grad_(True)
    (tok.causal_embeddings(x) * torch.randn(6, 8, 32)).sum().backward()
    assert x.grad.abs().sum(dim=(1, 2, 3)).min() > 0  # and the pixels of every image reach it


def test_queries_and_text_have_separate_feed_forwards():
    feats = torch.randn(2, 17, 32)  # [B, P, E]
    ids, valid = torch.randint(0, 400, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    for changed, same in (("text_ffn", "forward_queries"), ("query_ffn", "forward_text")):
        torch.manual_seed(0)
        qf = SEEDTokenizer(TINY).eval().qformer
        assert all(layer.query_ffn.mlp[0].weight is not layer.text_ffn.mlp[0].weight for layer in qf.layers)
        run = {"forward_queries": lambda: qf.forward_queries(feats), "forward_text": lambda: qf.forward_text(ids, valid)}
        before = {k: f() for k, f in run.items()}
        with torch.no_grad():
            for layer in qf.layers:
                w = getattr(layer, changed).mlp[0].weight
                w.add_(torch.randn_like(w))
        other = "forward_text" if same == "forward_queries" else "forward_queries"
        assert torch.equal(run[same](), before[same])  # the other stream never uses this feed-forward
        assert (run[other]() - before[other]).abs().max() > 1e-2  # its own stream does
    # the reverse Q-Former is query-only: no text feed-forward
    assert all(layer.text_ffn is None for layer in SEEDTokenizer(TINY).gen_head.reverse.layers)


def test_codes_shape_range_and_missing_detokenizer():
    assert SEEDConfig().num_queries == 32 and (SEEDConfig().codebook_size, SEEDConfig().code_dim) == (8192, 32)
    torch.manual_seed(0)
    tok = SEEDTokenizer(TINY).eval()
    x = _digits()
    codes = tok.encode(x)
    assert tok.code_shape == (8,) and tok.num_tokens == 8
    assert codes.shape == (6, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < TINY.codebook_size
    assert tok.decode_embedding(codes).shape == (6, TINY.gen_dim)
    out = tok(x)
    assert out.causal.shape == out.recon.shape == (6, 8, 32) and torch.equal(out.quant.codes, codes)
    with pytest.raises(ValueError, match="no diffusion detokenizer attached"):
        tok.decode(codes)


def test_detokenizer_must_fit_the_tokenizer():
    with pytest.raises(ValueError, match="does not fit"):
        dataclasses.replace(TINY, detokenizer=dataclasses.replace(TINY_DETOK, image_size=8, embed_dim=31))


def test_real_size_shapes_on_meta_device(capsys):
    counts = real_size_summary()
    printed = capsys.readouterr().out
    assert "seed.total" in printed and "lm.total" in printed
    assert 1.0e9 < counts["seed.encoder"] < 1.05e9  # EVA ViT-g/14
    # BERT-base blocks by hand: width 768, FFN 3072, EVA-g features 1408 wide, post-LN LayerNorms (2 x 768 each)
    d, h, e = 768, 3072, 1408
    attn, ln, ffn = 4 * (d * d + d), 2 * d, d * h + h + h * d + d
    cross = 2 * (d * d + d) + 2 * (e * d + d)  # q, out from the queries; k, v from the image features
    # Causal Q-Former: word + position embeddings, embedding LayerNorm, 32 queries; 12 layers with a query and a
    # text feed-forward each; cross-attention in layers 0, 2, ..., 10
    assert counts["seed.qformer"] == (30522 + 32) * d + ln + 32 * d + 12 * (attn + ln + 2 * (ffn + ln)) + 6 * (cross + ln)
    # reverse Q-Former: 1 query + its LayerNorm; 12 layers with the query feed-forward only; 6 cross-attentions
    assert counts["seed.gen_head.reverse"] == d + ln + 12 * (attn + ln + ffn + ln) + 6 * (attn + ln)
    assert 1.3e9 < counts["seed.total"] < 1.4e9
    assert counts["lm.vocab_size"] == 32000 + 7 + 8192
    assert 6.7e9 < counts["lm.total"] < 6.9e9  # Vicuna-7B + 8,199 new embedding/output rows


def test_stage2_uses_the_official_vq_loss_order(tmp_path):
    """L_vq's gradients at stage 2: official order (beta on the codebook term) by default, against the VQ-VAE /
    LlamaGen order on the same weights and input: the codebook gets 0.25x, the encoder side (quant_in) 4x."""
    torch.manual_seed(0)
    registry.save(SEEDTokenizer(TINY), tmp_path / "stage1.safetensors")
    causal = torch.randn(4, TINY.num_queries, TINY.qformer_dim, generator=torch.Generator().manual_seed(1))
    grads = {}
    for order in ("codebook", "commitment"):
        kw = {} if order == "codebook" else {"beta_on": order}  # the default is the official order
        m = SEEDStage2Module(str(tmp_path / "stage1.safetensors"), **kw).eval()
        assert m.tokenizer.quantizer.beta_on == order
        m.tokenizer.quantize(causal).loss.backward()
        grads[order] = (m.tokenizer.quantizer.embedding.weight.grad, m.tokenizer.quant_in[-1].weight.grad)
    (e_official, z_official), (e_ours, z_ours) = grads["codebook"], grads["commitment"]
    assert e_ours.abs().sum() > 0 and z_ours.abs().sum() > 0
    torch.testing.assert_close(e_official, 0.25 * e_ours)
    torch.testing.assert_close(z_official, 4.0 * z_ours)
    with pytest.raises(ValueError, match="beta_on"):
        SEEDStage2Module(str(tmp_path / "stage1.safetensors"), beta_on="encoder")


# ---- training stages (short fits on digits) ---------------------------------------------------

@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Stage 1 -> stage 2 -> detokenizer -> LM, each a short fit exporting the next stage's input."""
    tmp = tmp_path_factory.mktemp("seed")
    out = {}
    torch.manual_seed(0)
    s1 = SEEDStage1Module(TINY, lr=2e-3, warmup_steps=5, export_path=str(tmp / "stage1.safetensors"))
    rec = LossRecorder()
    make_trainer(tmp, 100, [rec], val_check_interval=40).fit(
        s1, ImageCaptionDataModule(**DIGITS, image_size=8, batch_size=32, val_size=64, bpe_vocab_size=400,
                                   max_text_len=16))
    out["stage1"] = (s1, rec.losses)

    s2 = SEEDStage2Module(str(tmp / "stage1.safetensors"), lr=3e-3, warmup_steps=5,
                          export_path=str(tmp / "stage2.safetensors"))
    rec = LossRecorder()
    make_trainer(tmp, 40, [rec]).fit(s2, ImageDataModule(**DIGITS, image_size=8, batch_size=32, val_size=32))
    out["stage2"] = (s2, rec.losses)

    dt = SEEDDetokenizerModule(str(tmp / "stage2.safetensors"), TINY_DETOK, lr=3e-3, warmup_steps=5, ema_decay=0.99,
                               n_samples=4, export_path=str(tmp / "seed.safetensors"))
    rec = LossRecorder()
    make_trainer(tmp, 60, [rec]).fit(
        dt, ImageDataModule(**DIGITS, image_size=8, batch_size=32, val_size=32))
    out["detok"] = (dt, rec.losses)

    dm = ImageTextDataModule(str(tmp / "seed.safetensors"), **DIGITS, bpe_vocab_size=200, batch_size=32, max_len=48,
                             cache_dir=str(tmp / "cache"))
    lm = MultimodalLMModule(dm.spec, preset="tiny", lr=3e-3, warmup_steps=5)
    rec = LossRecorder()
    trainer = make_trainer(tmp, 40, [rec])
    trainer.fit(lm, dm)
    trainer.save_checkpoint(tmp / "lm.ckpt")
    lm.bundle().save(tmp / "lm")
    out["lm"] = (lm, rec.losses)
    out["dir"] = tmp
    return out


def test_stage1_contrastive_loss_decreases_and_exports(stages):
    s1, losses = stages["stage1"]
    assert _mean(losses[-10:]) < _mean(losses[:5]) - 0.1
    assert 0.001 <= float(s1.tokenizer.temp) <= 0.5
    tmp = stages["dir"]
    assert isinstance(registry.load(tmp / "stage1.safetensors"), SEEDTokenizer)
    assert tokenizer_json_path(tmp / "stage1.safetensors").is_file()


def test_contrastive_loss_in_a_world_of_one_is_the_single_process_loss(tmp_path):
    import torch.distributed as dist

    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    temp, eps, b = 0.07, 0.1, 5
    # by hand: cross-entropy with label smoothing eps over both directions, averaged
    by_hand = 0.0
    for logits in (img @ txt.t() / temp, txt @ img.t() / temp):
        logp = logits.log_softmax(-1)
        by_hand += float(-((1 - eps) * logp.diagonal() + eps / b * logp.sum(-1)).mean()) / 2
    single, logits = contrastive_loss(img, txt, torch.tensor(temp), eps)
    assert single.item() == pytest.approx(by_hand, rel=1e-5) and logits.shape == (5, 5)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        in_world, _ = contrastive_loss(img, txt, torch.tensor(temp), eps)
    finally:
        dist.destroy_process_group()
    assert in_world.item() == single.item()


def test_contrastive_loss_is_symmetric_with_label_smoothing():
    img = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    a, _ = contrastive_loss(img, txt, torch.tensor(0.07))
    b, _ = contrastive_loss(txt, img, torch.tensor(0.07))
    torch.testing.assert_close(a, b)
    perfect, _ = contrastive_loss(img, img, torch.tensor(0.001), label_smoothing=0.1)
    assert perfect > 0.1  # smoothing keeps a floor even for perfect pairs


def test_stage2_loss_decreases_with_encoder_and_qformer_frozen(stages):
    s2, losses = stages["stage2"]
    assert _mean(losses[-8:]) < 0.8 * _mean(losses[:4])
    s1 = registry.load(stages["dir"] / "stage1.safetensors")
    s2_file = registry.load(stages["dir"] / "stage2.safetensors")
    for name in ("encoder", "qformer"):  # frozen: identical to stage 1
        a, b = getattr(s1, name).state_dict(), getattr(s2_file, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(s1.quant_in[0].weight, s2_file.quant_in[0].weight)  # the bottleneck trained


def test_detokenizer_loss_decreases_and_export_draws_images(stages):
    _, losses = stages["detok"]
    assert _mean(losses[-10:]) < 0.7 * _mean(losses[:5])
    seed = registry.load(stages["dir"] / "seed.safetensors")
    assert seed.config.detokenizer is not None and seed.detokenizer is not None
    codes = seed.encode(_digits(3))
    images = seed.decode(codes)
    assert images.shape == (3, 1, 8, 8) and images.abs().max() <= 1.0
    torch.testing.assert_close(seed.decode(codes), images)  # a function of the codes ...
    torch.testing.assert_close(seed.decode(codes[1:2]), images[1:2])  # ... independent of the batch


def test_detokenizer_sampling_shape_and_determinism():
    torch.manual_seed(0)
    detok = DiffusionDetokenizer(dataclasses.replace(TINY_DETOK, image_size=7, embed_dim=12)).eval()  # odd size pads
    emb = torch.randn(3, 12)
    draw = lambda s, **kw: detok.sample(emb, generator=torch.Generator().manual_seed(s), **kw)  # noqa: E731
    a = draw(1)
    assert a.shape == (3, 1, 7, 7) and a.abs().max() <= 1.0
    assert torch.equal(a, draw(1))
    assert not torch.equal(a, draw(2))
    assert torch.equal(draw(1, sampler="dpm", steps=3), draw(1, sampler="dpm", steps=3))
    assert draw(1, guidance=1.0).shape == a.shape  # unguided single pass


def test_registry_round_trip(stages, tmp_path):
    seed = registry.load(stages["dir"] / "seed.safetensors")
    assert registry.describe(seed)["kind"] == "seed"
    registry.save(seed, tmp_path / "again.safetensors")
    again = registry.load(tmp_path / "again.safetensors")
    a, b = seed.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = _digits(2)
    assert torch.equal(seed.encode(x), again.encode(x))
    torch.testing.assert_close(seed.decode(seed.encode(x)), again.decode(again.encode(x)))


# ---- SEED-LLaMA: the LM over SEED codes, through both scripts ---------------------------------

def test_lm_on_seed_codes(stages):
    lm, losses = stages["lm"]
    assert _mean(losses[-8:]) < _mean(losses[:4]) - 0.5
    assert lm.vision.code_shape == (8,)
    batch = next(iter(stages["lm"][0].trainer.datamodule.train_dataloader()))
    ids = batch["ids"][0][batch["valid"][0]]
    tok, layout = lm.data.tokenizer, lm.data.layout
    i = ids.tolist().index(tok.boi_id)
    assert ids[i + 9] == tok.eoi_id  # <boi> 8 codes <eoi>
    assert ((ids[i + 1:i + 9] >= layout.image_offset) & (ids[i + 1:i + 9] < layout.size)).all()


@pytest.mark.parametrize("ckpt", ["lm", "lm.ckpt"])
def test_seed_checkpoint_through_both_scripts(stages, ckpt, tmp_path, capsys):
    path = stages["dir"] / ckpt
    assert load_bundle(path).vision.config.detokenizer is not None
    out = tmp_path / "t2i"
    assert run("t2i", ["--ckpt", str(path), "--prompt", "a handwritten 3", "--n", "2",
                                      "--seed", "3", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000_00.png", "000_01.png", "grid.png"]
    first = (out / "000_00.png").read_bytes()
    assert run("t2i", ["--ckpt", str(path), "--prompt", "a handwritten 3", "--n", "2",
                                      "--seed", "3", "--out", str(out)]) == 0
    assert (out / "000_00.png").read_bytes() == first  # same seed, same image
    capsys.readouterr()
    assert run("caption", ["--ckpt", str(path), str(out / "000_00.png"), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith(str(out / "000_00.png") + "\t")


@pytest.mark.parametrize("name", ["stage1", "stage2", "detok", "lm"])
def test_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["fit", "--config", f"configs/mnist_seed_{name}.yaml", "--print_config"])
    assert e.value.code == 0
    assert "train." in capsys.readouterr().out


# ---- unCLIP path (for users with real Stable unCLIP weights) ----------------------------------

def _tiny_unclip_pipeline(tmp_path, embed_dim: int):
    """StableUnCLIPImg2ImgPipeline from tiny random parts (CLIP tokenizer from a vocab written here)."""
    import json

    from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline,
                           UNet2DConditionModel)
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import (CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    words = ["a", "handwritten", "digit"]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in words:
        vocab[w + "</w>"] = len(vocab)
    letters = sorted({c for w in words for c in w})
    for c in letters:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                projection_dim=8)).eval()
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
        patch_size=8, projection_dim=embed_dim)).eval()
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=8, class_embed_type="projection",
                                projection_class_embeddings_input_dim=2 * embed_dim).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=16).eval()
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=16, size=16), image_encoder=image_encoder,
        image_normalizer=StableUnCLIPImageNormalizer(embedding_dim=embed_dim),
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"), tokenizer=tokenizer,
        text_encoder=text_encoder, unet=unet, scheduler=DDIMScheduler(), vae=vae)


def test_unclip_pipeline_takes_seed_embeddings(tmp_path):
    pipe = _tiny_unclip_pipeline(tmp_path, embed_dim=TINY.gen_dim)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    seed = SEEDTokenizer(TINY).eval()
    emb = seed.decode_embedding(seed.encode(_digits(2)))  # [2, G]: what the LM's codes turn into
    draw = lambda: unclip_images(pipe, emb, prompt="a handwritten digit", num_inference_steps=2,  # noqa: E731
                                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    images = draw()
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(images, draw())
    with pytest.raises(ValueError, match=rf"image_embeds must be \[B, {TINY.gen_dim}\]"):
        unclip_images(pipe, emb[:, :5])
