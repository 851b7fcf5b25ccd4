"""torch.compile'd decode step (generate.sampling.make_step_fn(compile=True)) against the eager step.

Slow (the first run compiles with Inductor, about a minute on 2 CPU cores): `make test-slow`.
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
    return Transformer(LMConfig.from_preset("tiny")).eval()  # GQA: 4 heads over 2 kv heads


@pytest.fixture(scope="module")
def compiled(model):
    return make_step_fn(model, compile=True)


def test_compiled_step_logits_match_eager(model, compiled):
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    steps = torch.randint(0, 256, (3, 6), generator=torch.Generator().manual_seed(2))
    eager, comp = model.new_cache(3, 16), model.new_cache(3, 16)
    with torch.inference_mode():
        model(ids, cache=eager)
        model(ids, cache=comp)
        for i in range(steps.shape[1]):
            tok = steps[:, i:i + 1]
            ref = model(tok, cache=eager)[:, -1]
            got = compiled(tok, comp)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
            assert comp.pos == eager.pos
    torch.testing.assert_close(comp.k, eager.k, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(comp.v, eager.v, atol=1e-6, rtol=1e-6)


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
