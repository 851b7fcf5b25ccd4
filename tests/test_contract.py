"""Contract tests: what every registered objective (models.objectives.OBJECTIVES) and every registered vision
tokenizer kind (vision_tokenizers.registry.KINDS) promises the rest of the project, checked on tiny models.

Objectives (built through the LM training module, MultimodalLMModule + DataSpec, as the CLI builds them):
  1. the loss on a fixed batch is finite, back-propagates finite gradients, and falls after 15 AdamW steps on it;
  2. KV-cached sampling (the objective's own `generate`, left-padded prompts, classifier-free guidance, top-k)
     draws exactly what the uncached training forward draws under the same torch.Generator seed;
  3. the inference folder (Bundle.save -> load_bundle) and the Lightning .ckpt form give the same logits, the
     same loss and the same images (Pipeline.draw_images) as the model that was saved;
  4. Pipeline.can_caption is honest: a model that offers captions draws the greedy text continuation of the
     captioning prompt (stopping at <eos>), one that cannot refuses with a clear error.
Vision tokenizers (built through their training modules): encode -> decode shapes, registry save/load round trip
with equal outputs, and a finite training loss.

A new objective or tokenizer kind fails `test_every_registered_*_has_a_case` until it is given a case here.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from conftest import TINY_VQ
from mmar import Pipeline
from models import objectives
from models.bundle import load_bundle
from models.objectives import OBJECTIVES, NextBlockPrediction, NextTokenPrediction, XARFlowMatching
from models.sampling import id_range_mask, left_pad
from models.vocab import VocabLayout
from train.datamodules import DataSpec
from train.latent_data import LatentCollate
from train.lm_module import MultimodalLMModule
from train.sources import load_source
from vision_tokenizers import registry
from vision_tokenizers.kl import KLConfig

TINY_KL = KLConfig(image_size=8, pad=0, channels=(8, 16), latent_channels=4)
MAX_LEN = 64  # prompt + xAR teacher forcing (clean and noisy latents: 2 x 16)
PROMPTS = ["a handwritten 3", "a seven written by hand"]  # different lengths: the batch is left-padded


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    """8 real 8x8 digits in [-1, 1] [8, 1, 8, 8] and one caption each."""
    data = load_source("digits")
    x = torch.stack([data.image(i, 1, 8) for i in range(8)])
    return x, [data.captions[i][0] for i in range(8)]


# ---- objectives ----------------------------------------------------------------------------------------------
XAR = dict(dim=64, latent_channels=4, grid=4, entity_size=2, steps=2, head_width=32, head_depth=1)
OBJECTIVE_CASES = {
    "ntp": lambda: NextTokenPrediction(),
    "nbp-condition": lambda: NextBlockPrediction(4, "condition"),
    "nbp-tokens": lambda: NextBlockPrediction(4, "tokens"),  # the paper's hybrid first block: its own code path
    "xar-cell-backbone": lambda: XARFlowMatching(entity="cell", predictor="backbone", **XAR),
    "xar-subsample-mlp-tf": lambda: XARFlowMatching(entity="subsample", predictor="mlp", noisy_context=False, **XAR),
}


def test_every_registered_objective_has_a_case():
    assert {objectives.describe(make())["name"] for make in OBJECTIVE_CASES.values()} == set(OBJECTIVES)


def _continuous(obj) -> bool:
    return getattr(obj, "continuous", False)


def build_module(case: str, tokenizer) -> MultimodalLMModule:
    """The LM training module for a case, with a random tiny vision tokenizer (VQ codes or KL latents)."""
    torch.manual_seed(0)
    obj = OBJECTIVE_CASES[case]()
    if _continuous(obj):
        vision = registry.build("kl", dataclasses.asdict(TINY_KL)).eval()
        layout = VocabLayout(tokenizer.vocab_size, 0)
        arch = dict(preset="xar-demo", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)
    else:
        vision = registry.build("vq", dataclasses.asdict(TINY_VQ)).eval()
        layout = VocabLayout(tokenizer.vocab_size, TINY_VQ.codebook_size)
        arch = dict(preset="tiny")
    module = MultimodalLMModule(DataSpec(tokenizer, layout, vision, MAX_LEN), obj, **arch)
    module.configure_model()
    return module


def fixed_batch(module, digits) -> dict[str, torch.Tensor]:
    """A collated text->image batch, as the objective's data module makes it."""
    x, captions = digits
    b = module.bundle()
    fmt = b.format
    with torch.no_grad():
        if _continuous(b.objective):
            z = b.vision.encode(x)
            return LatentCollate(b.tokenizer.pad_id)([(fmt.t2i_prompt(c), z[i]) for i, c in enumerate(captions)])
        codes = b.vision.encode(x)
        return fmt.collate([fmt.t2i_sample(codes[i], c) for i, c in enumerate(captions)])


def eval_loss(module, batch) -> float:
    """The loss with the objective's own randomness (xAR's times and noise) fixed."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return float(module.objective.loss(module.lm, batch)["loss"])


@pytest.fixture(scope="module", params=list(OBJECTIVE_CASES))
def trained(request, caption_tokenizer, digits):
    """(case, module after 15 AdamW steps on one fixed batch, the batch, loss before, loss after, grads finite).
    The later checks use the trained weights, so no part (adaLN, heads) is still at its zero initialisation."""
    module = build_module(request.param, caption_tokenizer)
    batch = fixed_batch(module, digits)
    module.train()
    before = eval_loss(module, batch)
    params = [p for p in [*module.lm.parameters(), *module.objective.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    grads_finite = True
    for _ in range(15):
        loss = module.objective.loss(module.lm, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        grads_finite &= all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        opt.step()
    after = eval_loss(module, batch)
    module.eval()
    return request.param, module, batch, before, after, grads_finite


def test_loss_is_finite_and_falls_on_a_fixed_batch(trained):
    case, module, batch, before, after, grads_finite = trained
    assert math.isfinite(before) and math.isfinite(after) and grads_finite, (case, before, after)
    out = module.objective.loss(module.lm, batch)
    assert "loss" in out and "nll" in out and out["loss"].ndim == 0  # what the training module logs
    assert after < 0.7 * before, (case, before, after)


class UncachedLM:
    """The backbone without a KV cache, for the objectives' own `generate`: `new_cache` hands out a log of what
    was fed, and every call reruns the whole sequence so far through the plain training forward (explicit
    positions, block ids and validity), returning the hidden states of the new slots. The log fills in what a
    call leaves out as the KV cache documents (models/cache.py): positions continue each row's last real
    position, block ids continue the last block (one block per slot), slots are valid."""

    def __init__(self, lm):
        self.lm, self.head, self.cfg, self.norm = lm, lm.head, lm.cfg, lm.norm

    class Log:
        def __init__(self, rows: int):
            self.pos = 0
            self.ids = torch.zeros(rows, 0, dtype=torch.long)
            self.positions, self.block = torch.zeros_like(self.ids), torch.zeros_like(self.ids)
            self.valid = torch.zeros(rows, 0, dtype=torch.bool)
            self.next_position = torch.zeros(rows, 1, dtype=torch.long)

    def new_cache(self, rows: int, max_len: int | None = None, dtype=None, device=None) -> "UncachedLM.Log":
        return self.Log(rows)

    def __call__(self, ids, position_ids=None, block_ids=None, valid=None, cache=None, **unsupported):
        assert cache is not None and not unsupported, unsupported
        rows, t = ids.shape
        v = torch.ones(rows, t, dtype=torch.bool) if valid is None else valid
        if position_ids is None:
            position_ids = (cache.next_position + v.long().cumsum(-1) - 1).clamp(min=0)
        if block_ids is None:
            last = cache.block[:, -1:] if cache.pos else torch.full((rows, 1), -1)
            block_ids = last + 1 + torch.arange(t)
        cache.next_position = torch.where(v.any(-1, keepdim=True), position_ids[:, -1:] + 1, cache.next_position)
        cache.ids, cache.valid = torch.cat([cache.ids, ids], 1), torch.cat([cache.valid, v], 1)
        cache.positions = torch.cat([cache.positions, position_ids.expand(rows, t)], 1)
        cache.block = torch.cat([cache.block, block_ids.expand(rows, t)], 1)
        cache.pos += t
        h = self.lm(cache.ids, position_ids=cache.positions, block_ids=cache.block, valid=cache.valid)
        return h[:, -t:]


def guided_prompts(bundle):
    """Left-padded conditional prompts, then as many unconditional ones (the guided batch every entry point builds)."""
    fmt = bundle.format
    rows = [fmt.t2i_prompt(p) for p in PROMPTS]
    return left_pad(rows + [fmt.t2i_prompt(None)] * len(rows), bundle.tokenizer.pad_id)


def draw(bundle, lm, seed, **kw):
    ids, valid = guided_prompts(bundle)
    g = torch.Generator().manual_seed(seed)
    if _continuous(bundle.objective):
        return bundle.objective.generate(lm, ids, valid=valid, cfg_scale=2.0, steps=2, sampler="em", generator=g, **kw)
    lo, n = bundle.layout.image_offset, bundle.vision.num_tokens
    allowed = id_range_mask(bundle.lm.cfg.vocab_size, lo, lo + bundle.layout.image_codes)
    return bundle.objective.generate(lm, ids, n, valid=valid, temperature=1.0, top_k=20, allowed=allowed,
                                     cfg_scale=2.0, generator=g)


def test_cached_generation_equals_uncached(trained):
    case, module, *_ = trained
    b = module.bundle()
    if _continuous(b.objective):  # xAR has its own uncached reference path
        cached, uncached = draw(b, b.lm, seed=5), draw(b, b.lm, seed=5, use_cache=False)
        assert cached.shape == (2, *b.vision.code_shape)
        torch.testing.assert_close(cached, uncached, atol=1e-5, rtol=0)
    else:  # the same ids, and the same logits at every sampling step (ids alone miss small differences)
        seen = []
        hook = b.lm.head.register_forward_hook(lambda mod, inp, out: seen.append(out.detach().clone()))
        try:
            cached = draw(b, b.lm, seed=5)
            n_cached = len(seen)
            uncached = draw(b, UncachedLM(b.lm), seed=5)
        finally:
            hook.remove()
        lo = b.layout.image_offset
        assert cached.shape == (2, b.vision.num_tokens)
        assert ((cached >= lo) & (cached < lo + b.layout.image_codes)).all()
        assert torch.equal(cached, uncached), (case, cached, uncached)
        assert 2 * n_cached == len(seen)
        for a, c in zip(seen[:n_cached], seen[n_cached:]):
            torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert torch.equal(draw(b, b.lm, seed=5), cached)  # the seed decides everything
    assert not torch.equal(draw(b, b.lm, seed=6), cached)


@pytest.mark.parametrize("case", list(OBJECTIVE_CASES))
def test_captioning_is_greedy_text_continuation_or_refused(case, caption_tokenizer, digits):
    """Pipeline.can_caption promises captions: the greedy continuation of `<bos> <i2t> <boi> codes <eoi>` by text ids,
    ending at <eos> (what the uncached forward's argmax gives, token by token). A model that cannot do that
    (xAR) says so and refuses with a clear error, as the demo and `mmar eval` rely on can_caption.
    On a fresh model with a sharpened head (varied, well-separated logits; the briefly trained ones repeat one id)."""
    module = build_module(case, caption_tokenizer).eval()
    with torch.no_grad():
        module.lm.head.weight.mul_(10)
    b = module.bundle()
    pipe = Pipeline(b)
    x = digits[0][:2]
    if not pipe.can_caption:
        with pytest.raises(ValueError, match="caption"):
            pipe.draw_captions(x)
        return
    captions = pipe.draw_captions(x, max_new_tokens=8)
    tok = b.tokenizer
    allowed = torch.zeros(b.lm.cfg.vocab_size, dtype=torch.bool)
    allowed[:b.layout.text_size] = True
    allowed[tok.special_ids] = False
    allowed[tok.eos_id] = True
    with torch.no_grad():
        for img, got in zip(x, captions):
            seq = b.format.caption_prompt(b.vision.encode(img[None])[0])
            text = []
            for _ in range(8):
                logits = b.lm.head(b.lm(torch.tensor([seq + text])))[0, -1]
                nxt = int(logits.masked_fill(~allowed, float("-inf")).argmax())
                if nxt == tok.eos_id:
                    break
                text.append(nxt)
            want = tok.decode(text)
            assert got == want, f"{case}: caption {got!r} is not the greedy text continuation {want!r} (ids {text})"


@pytest.mark.parametrize("case", list(OBJECTIVE_CASES))
def test_generate_has_one_signature_and_refuses_what_it_cannot_honour(case, caption_tokenizer):
    """Every objective takes the same options (Objective.generate); one that does not apply is a ValueError,
    never silently ignored: flow steps for token objectives, a stop id for NBP (no text is trained), token
    options for xAR."""
    import inspect

    from models.objectives.base import Objective

    module = build_module(case, caption_tokenizer).eval()
    b = module.bundle()
    want = list(inspect.signature(Objective.generate).parameters)
    assert list(inspect.signature(type(b.objective).generate).parameters)[:len(want)] == want
    ids, valid = guided_prompts(b)
    refused = ({"temperature": 0.5}, {"top_k": 3}, {"stop_id": 1}) if _continuous(b.objective) else \
        ({"steps": 2}, {"sampler": "em"}, {"cfg_schedule": "constant"},
         *(({"stop_id": 1},) if not b.objective.captions else ()))
    for opt in refused:
        with pytest.raises(ValueError, match=f"does not take {next(iter(opt))}"):
            b.objective.generate(b.lm, ids, b.vision.num_tokens, valid=valid, cfg_scale=2.0, **opt)


def _lightning_ckpt(module, path):
    """The .ckpt the trainer writes: prefixed weights + the module's "mmar" entry (on_save_checkpoint)."""
    ckpt = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(ckpt)
    torch.save(ckpt, path)
    return path


def test_save_load_round_trip_gives_identical_outputs(trained, tmp_path):
    case, module, batch, *_ = trained
    b = module.bundle()
    b.save(tmp_path / "model")
    for path in (tmp_path / "model", _lightning_ckpt(module, tmp_path / "lm.ckpt")):
        again = load_bundle(path)
        assert again.meta() == b.meta(), path
        assert type(again.objective) is type(b.objective) and again.objective.config == b.objective.config
        with torch.no_grad():
            assert torch.equal(again.lm.head(again.lm(batch["ids"])), b.lm.head(b.lm(batch["ids"]))), path
        assert eval_loss(again, batch) == eval_loss(b, batch), path
        kw = dict(steps=2, sampler="em") if _continuous(b.objective) else dict(temperature=1.0, top_k=20)
        images = [Pipeline(m).draw_images(PROMPTS, 1, cfg=2.0, generator=torch.Generator().manual_seed(3), **kw)
                  for m in (b, again)]
        assert images[0].shape == (2, 1, 8, 8) and torch.equal(images[0], images[1]), path


# ---- vision tokenizers -----------------------------------------------------------------------------------------
TINY_VIDEO = dict(in_channels=1, image_size=32, frames=5, patch=4, channels=[8, 16], spatial_down=[True],
                  time_down=[True], levels=[5, 4])


def _vq_case(tmp_path):
    from train.tokenizer_module import VQTokenizerModule

    m = VQTokenizerModule(TINY_VQ)

    def loss(x):
        recon, extra, _ = m.reconstruct(x)
        return m._recon(recon, x) + extra

    return m.tokenizer, loss, lambda x: x


def _kl_case(tmp_path):
    from train.kl_module import KLTokenizerModule

    m = KLTokenizerModule(TINY_KL)
    return m.tokenizer, lambda x: m._losses(x)["loss"], lambda x: x


def _video_case(tmp_path):
    from train.video.modules import VideoTokenizerModule
    from vision_tokenizers.video import VideoTokenizerConfig

    m = VideoTokenizerModule(VideoTokenizerConfig(**TINY_VIDEO))

    def loss(x):
        recon, extra, _ = m.reconstruct(x)
        return m._recon(recon, x) + extra

    def clips(x):  # 8x8 digits -> [B, 1, 5, 32, 32] clips of the digit moving right a pixel per frame
        big = torch.nn.functional.interpolate(x, size=32, mode="nearest")
        return torch.stack([big.roll(k, -1) for k in range(5)], 2)

    return m.tokenizer, loss, clips


def _seed_case(tmp_path):
    from train.seed import SEEDStage2Module
    from vision_tokenizers.diffusion_detok import DetokenizerConfig, DiffusionDetokenizer
    from vision_tokenizers.seed import SEEDConfig, SEEDTokenizer

    cfg = SEEDConfig(in_channels=1, image_size=8, patch_size=2, encoder_dim=32, encoder_depth=1, encoder_heads=2,
                     num_queries=8, qformer_dim=32, qformer_layers=2, qformer_heads=2, text_vocab_size=400,
                     max_text_len=16, contrastive_dim=16, codebook_size=32, code_dim=8, head_heads=2,
                     recon_layers=1, gen_layers=1, reverse_qformer_layers=1, gen_dim=16)
    detok = DiffusionDetokenizer(DetokenizerConfig(image_size=8, embed_dim=16, channels=(16, 16), sample_steps=2))
    tok = SEEDTokenizer(cfg).attach_detokenizer(detok)
    registry.save(tok, tmp_path / "stage1.safetensors")
    m = SEEDStage2Module(init_from=str(tmp_path / "stage1.safetensors"))  # stage 2's loss on that tokenizer
    return m.tokenizer, lambda x: m._step(x)["loss"], lambda x: x


TOKENIZER_CASES = {"vq": _vq_case, "kl": _kl_case, "video": _video_case, "seed": _seed_case}


def test_every_registered_tokenizer_kind_has_a_case():
    assert set(TOKENIZER_CASES) == set(registry.KINDS)


@pytest.mark.parametrize("kind", list(TOKENIZER_CASES))
def test_tokenizer_contract(kind, digits, tmp_path):
    torch.manual_seed(0)
    tok, loss_fn, inputs = TOKENIZER_CASES[kind](tmp_path)
    assert registry.kind_of(tok) == kind
    x = inputs(digits[0][:4])
    # a finite training loss with finite gradients
    tok.train()
    loss = loss_fn(x)
    assert loss.ndim == 0 and torch.isfinite(loss), (kind, loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.grad is not None)
    # encode -> decode shapes
    tok.eval()
    with torch.no_grad():
        codes = tok.encode(x)
        assert codes.shape == (len(x), *tok.code_shape)
        if getattr(tok, "continuous", False):  # latents [c, h, w]: h * w LM positions of c channels
            assert tok.num_tokens == math.prod(tok.code_shape[1:])
            assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
        else:  # one LM position per code
            assert tok.num_tokens == math.prod(tok.code_shape)
            assert codes.dtype == torch.long and 0 <= codes.min() and codes.max() < tok.config.codebook_size
        out = tok.decode(codes)
        assert out.shape == x.shape and out.abs().max() <= 1.0, (kind, out.shape, x.shape)
    # the registry's file round trip: same kind, config, weights and outputs
    registry.save(tok, tmp_path / "tok.safetensors")
    again = registry.load(tmp_path / "tok.safetensors")
    assert registry.describe(again) == registry.describe(tok)
    a, b = tok.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(again.encode(x), codes)
        assert torch.equal(again.decode(codes), out)
