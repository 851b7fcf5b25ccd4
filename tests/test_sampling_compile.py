"""torch.compile'd decode step (generate.sampling.make_step_fn(compile=True)) against the eager step.

Slow (Inductor compiles a few graphs, one to two minutes on 2 CPU cores): `make test-slow`.
"""
import pytest
import torch

from generate.sampling import generate, make_step_fn
from models.config import LMConfig
from models.transformer import Transformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # GQA (4 heads over 2 kv heads) and a qkv bias, so both paths of the graph are exercised.
    return Transformer(LMConfig.from_preset("tiny", qkv_bias=True)).eval()


@pytest.fixture(scope="module", params=[False, True], ids=["linear", "transposed_weights"])
def compiled(request, model):
    return make_step_fn(model, compile=True, transposed_weights=request.param)


def _compare_steps(model, compiled, n_steps=6):
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(0, 256, (3, n_steps), generator=torch.Generator().manual_seed(2))
    eager, comp = model.new_cache(3, 16), model.new_cache(3, 16)
    with torch.inference_mode():
        model(ids, cache=eager)
        model(ids, cache=comp)
        for i in range(n_steps):
            tok = steps[:, i:i + 1]
            ref = model(tok, cache=eager)[:, -1]
            got = compiled(tok, comp)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert comp.pos == eager.pos
    torch.testing.assert_close(comp.k, eager.k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comp.v, eager.v, atol=1e-6, rtol=1e-6)


def test_compiled_step_logits_match_eager(model, compiled):
    _compare_steps(model, compiled)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=50, top_p=0.9)])
def test_generate_same_tokens_with_and_without_compile(model, compiled, kw):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    run = lambda fn: generate(model, prompt, 20, generator=torch.Generator().manual_seed(4), step_fn=fn, **kw)
    assert torch.equal(run(compiled), run(None))


def test_compiled_step_with_cfg_batch(model, compiled):
    prompt = torch.randint(0, 256, (4, 5), generator=torch.Generator().manual_seed(5))
    run = lambda fn: generate(model, prompt, 12, cfg_scale=2.0, generator=torch.Generator().manual_seed(6),
                              step_fn=fn)
    assert torch.equal(run(compiled), run(None))


def test_compiled_step_follows_weight_updates(model, compiled):
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight.mul_(1.5)  # in place: the transposed copies must be rebuilt
            model.head.weight.add_(0.01)
        _compare_steps(model, compiled, n_steps=2)
    finally:
        model.load_state_dict(saved)


def test_compiled_step_rejects_padded_cache(model, compiled):
    cache = model.new_cache(1, 8)
    with torch.inference_mode():
        model(torch.tensor([[0, 5, 6]]), valid=torch.tensor([[False, True, True]]), cache=cache)
        with pytest.raises(ValueError, match="plain causal"):
            compiled(torch.tensor([[7]]), cache)
