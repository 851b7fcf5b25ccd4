"""The decode loop through torch.compile (models.sampling.make_step_fn(compile=True)) against eager,
on every path: plain, left padding, guidance. Slow (Inductor compiles a few graphs): `make test-slow`.
"""
import pytest
import torch

from models.config import LMConfig
from models.sampling import generate, left_pad, make_step_fn
from models.transformer import Transformer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # GQA (4 heads over 2 kv heads) and a qkv bias
    return Transformer(LMConfig.from_preset("tiny", qkv_bias=True)).eval()


@pytest.fixture(scope="module")
def compiled(model):
    return make_step_fn(model, compile=True)


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(top_k=50, top_p=0.9)])
def test_generate_same_tokens_with_and_without_compile(model, compiled, kw):
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    run = lambda fn: generate(model, prompt, 20, generator=torch.Generator().manual_seed(4), step_fn=fn, **kw)
    assert torch.equal(run(compiled), run(None))


def test_compiled_product_path_padding_and_guidance(model, compiled):
    rows = [[5, 6, 7, 8], [9, 10], [5], [5]]
    ids, valid = left_pad(rows, pad_id=0)
    run = lambda fn: generate(model, ids, 12, valid=valid, cfg_scale=2.0, top_k=40,
                              generator=torch.Generator().manual_seed(6), step_fn=fn)
    assert torch.equal(run(compiled), run(None))


def test_compiled_training_loss_equals_eager(fitted_lm):
    """`compile: true` in the LM recipe runs the objective's loss (backbone + head + loss) through
    torch.compile: same loss and gradients as eager, same state-dict keys."""
    from train.lm_module import MultimodalLMModule

    module, _, _, dm = fitted_lm
    compiled = MultimodalLMModule(dm.spec, preset="tiny", compile=True)
    compiled.configure_model()
    compiled.lm.load_state_dict(module.lm.state_dict())
    assert set(compiled.state_dict()) == set(module.state_dict())
    batch = next(iter(dm.val_dataloader()))
    outs = []
    for m in (module, compiled):
        m.lm.zero_grad(set_to_none=True)
        out = m._run(batch)
        out["loss"].backward()
        outs.append((out["loss"].detach(), [p.grad.clone() for p in m.lm.parameters()]))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert compiled._compiled_loss is not None


def test_compiled_decode_does_not_recompile_per_call(model):
    """Once the prompt graph and the one-token graph exist, another call (new prompt length, longer
    cache, a prompt made outside inference mode) reuses them: no recompile storm."""
    step = make_step_fn(model, compile=True)
    gen = lambda n, new: generate(model, torch.randint(0, 256, (2, n)), new, step_fn=step, top_k=20)
    gen(5, 6)
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert gen(7, 30).shape == (2, 30)


def test_static_compiled_decode_does_not_recompile_per_call(model):
    """The static-cache compiled step (make_step_fn(static=True, compile=True)): a second call of the same shape,
    with a new step object, a new cache and a prompt made outside inference mode, reuses the graph; its tokens are
    the eager loop's."""
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(8))
    gen = lambda step: generate(model, prompt.clone(), 12, step_fn=step, top_k=20,
                                generator=torch.Generator().manual_seed(9))
    first = gen(make_step_fn(model, static=True, compile=True))
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(gen(make_step_fn(model, static=True, compile=True)), first)
    assert torch.equal(gen(None), first)
