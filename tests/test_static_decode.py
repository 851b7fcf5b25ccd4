"""Static-cache decoding (models.sampling.make_step_fn(static=True)): the fixed-shape step, eager and through
torch.compile, draws the same tokens as the plain decode loop under the same generator; its mask hides padding and
unfilled slots; a second call of the same shape does not recompile. Tiny random models built here."""
import pytest
import torch

from models.cache import StaticCacheView
from models.config import LMConfig
from models.sampling import generate, id_range_mask, left_pad, make_step_fn, static_step
from models.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(LMConfig.from_preset("tiny", qkv_bias=True)).eval()  # GQA: 4 heads over 2 kv heads


@pytest.fixture(scope="module")
def compiled(model):
    return make_step_fn(model, static=True, compile=True)


def product_batch():
    """2 conditional prompts of 4 and 2 tokens, left-padded, then 2 unconditional ones."""
    return left_pad([[5, 6, 7, 8], [9, 10], [5], [5]], pad_id=0)


def run(model, step_fn, **kw):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    return generate(model, prompt, 16, generator=torch.Generator().manual_seed(4), step_fn=step_fn, **kw)


def run_guided(model, step_fn):
    ids, valid = product_batch()
    return generate(model, ids, 12, valid=valid, cfg_scale=2.0, temperature=0.8, top_k=40, top_p=0.9,
                    allowed=id_range_mask(256, 100, 256), generator=torch.Generator().manual_seed(6), step_fn=step_fn)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=50, top_p=0.9), dict(temperature=0.7, top_p=0.8),
                                dict(temperature=1.3, top_k=7)])
def test_eager_static_equals_the_plain_loop(model, kw):
    assert torch.equal(run(model, make_step_fn(model, static=True), **kw), run(model, None, **kw))


def test_eager_static_guided_left_padded_equals_the_plain_loop(model):
    assert torch.equal(run_guided(model, make_step_fn(model, static=True)), run_guided(model, None))


def test_compiled_static_equals_eager_static_guided_and_left_padded(model, compiled):
    eager = run_guided(model, make_step_fn(model, static=True))
    assert torch.equal(run_guided(model, compiled), eager)
    assert eager.min() >= 100  # only allowed ids


def test_compiled_static_equals_eager_static_sampling_and_greedy(model, compiled):
    kw = dict(temperature=0.9, top_k=50, top_p=0.9)
    assert torch.equal(run(model, compiled, **kw), run(model, make_step_fn(model, static=True), **kw))
    assert torch.equal(run(model, compiled, temperature=0), run(model, None, temperature=0))


def test_compiled_static_does_not_recompile_on_a_second_call_of_the_same_shape(model, compiled):
    run_guided(model, compiled)
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_guided(model, make_step_fn(model, static=True, compile=True))  # a new StaticStep reuses the graph
        run_guided(model, compiled)


def test_stop_id_and_forward_hooks(model):
    """Captioning's stop id ends rows the same way; forward hooks (progress bars) see one call per step."""
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        a = run(model, make_step_fn(model, static=True), temperature=0, stop_id=7)
    finally:
        handle.remove()
    assert torch.equal(a, run(model, None, temperature=0, stop_id=7))
    assert len(calls) == a.shape[1]  # the prefill + one per later token


def test_the_mask_hides_padding_and_unfilled_slots(model):
    """Poison the values of padded and not-yet-written slots: the static step's logits must not change."""
    ids, valid = product_batch()
    rows, t = ids.shape
    with torch.inference_mode():
        cache = model.new_cache(rows, t + 6)
        model(ids, valid=valid, cache=cache)
        tok = torch.tensor([11, 12])
        pos = torch.tensor([cache.pos])

        def step():
            probs, idx = static_step(model, tok, [k.clone() for k in cache.k], [v.clone() for v in cache.v], cache.valid, pos,
                                     cache.next_position, 2.0, None, 1.0, None, None)
            assert idx is None
            return probs

        clean = step()
        hidden = ~cache.valid.clone()  # [rows, S_max] padding
        hidden[:, t + 1:] = True  # slots after the one written now
        assert hidden[:, :t].any() and not hidden[:, t].any()
        for buf in cache.k + cache.v:
            buf.masked_fill_(hidden[:, None, :, None], 1e4)
        torch.testing.assert_close(step(), clean, atol=1e-6, rtol=1e-5)
        # and the mask itself: slot <= pos and valid, nothing else
        view = StaticCacheView(cache.k, cache.v, cache.valid, pos, cache.next_position)
        assert torch.equal(view.mask[:, 0, 0], ~hidden)


def test_pipeline_compile_draws_and_captions_as_eager(tiny_bundle):
    """Pipeline(bundle, compile=True) (mmar t2i / caption --compile): the same images and captions as eager."""
    from mmar.pipeline import Pipeline

    eager, fast = Pipeline(tiny_bundle), Pipeline(tiny_bundle, compile=True)
    draw = lambda p: p.draw_images(["a 3", "a 7"], 2, cfg=2.0, top_k=20, generator=torch.Generator().manual_seed(1))
    images = draw(eager)
    assert torch.equal(draw(fast), images)
    caps = lambda p: p.draw_captions(images, 8, temperature=0.0)
    assert caps(fast) == caps(eager)
