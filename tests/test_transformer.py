import pytest
import torch

from models.config import PRESETS, LMConfig
from models.masks import block_ids_from_sizes
from models.transformer import Transformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(LMConfig.from_preset("tiny", qkv_bias=True)).eval()


@pytest.mark.parametrize(
    "name,published", [("vicuna-7b", 6.74e9), ("qwen2.5-1.5b", 1.54e9)]
)
def test_real_presets_parameter_count(name, published):
    with torch.device("meta"):
        m = Transformer(PRESETS[name])
    n = m.num_params()
    assert abs(n - published) / published < 0.01, n


def test_nbp_preset_builds_on_meta():
    with torch.device("meta"):
        m = Transformer(PRESETS["nbp-700m"])
    print(f"nbp-700m parameters: {m.num_params() / 1e6:.1f}M")
    assert 5e8 < m.num_params() < 1e9


def test_sdpa_fast_path_equals_explicit_mask(model):
    ids = torch.randint(0, 256, (2, 12))
    a = model(ids)
    b = model(ids, block_ids=torch.arange(12).expand(2, 12))  # explicit causal mask
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_right_padding_does_not_change_real_positions(model):
    ids = torch.randint(0, 256, (1, 10))
    padded = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], 1)
    valid = torch.arange(14)[None] < 10
    torch.testing.assert_close(model(padded, valid=valid)[:, :10], model(ids), atol=1e-5, rtol=0)


def test_kv_cache_token_by_token_matches_uncached(model):
    ids = torch.randint(0, 256, (3, 20))
    full = model(ids)
    cache = model.new_cache(3, 24)
    steps = [model(ids[:, :8], cache=cache)]
    for i in range(8, 20):
        steps.append(model(ids[:, i:i + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_block_by_block_matches_uncached(model):
    # first 4 positions causal (prompt), then blocks of 4 decoded one block per step
    ids = torch.randint(0, 256, (2, 16))
    blocks = block_ids_from_sizes(16, 4, first=4).expand(2, 16)
    full = model(ids, block_ids=blocks)
    cache = model.new_cache(2, 16)
    out = [model(ids[:, :4], block_ids=blocks[:, :4], cache=cache)]
    for s in range(4, 16, 4):
        out.append(model(ids[:, s:s + 4], block_ids=blocks[:, s:s + 4], cache=cache))
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_kv_cache_with_left_padding(model):
    ids = torch.randint(1, 256, (1, 9))
    ref = model(ids)[:, -1]
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    valid = torch.arange(12)[None] >= 3
    pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.new_cache(1, 16)
    out = model(padded[:, :-1], position_ids=pos[:, :-1], valid=valid[:, :-1], cache=cache)
    last = model(padded[:, -1:], position_ids=pos[:, -1:], valid=valid[:, -1:], cache=cache)[:, -1]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(last, ref, atol=1e-5, rtol=0)


def test_overlong_sequence_is_rejected(model):
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.zeros(1, 513, dtype=torch.long))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_tied_embeddings_share_storage():
    m = Transformer(LMConfig.from_preset("tiny", tie_embeddings=True))
    assert m.head.weight.data_ptr() == m.tok_emb.weight.data_ptr()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        LMConfig.from_preset("nope")


def test_custom_backward_matches_autograd():
    """RMSNorm and SwiGLU have hand-written backwards; check them against plain autograd formulas."""
    import torch.nn.functional as F

    from models.transformer import RMSNorm, SwiGLU

    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = norm.weight.detach().clone().requires_grad_(True)
    (norm(x) * torch.arange(16.0)).sum().backward()
    (F.rms_norm(ref_x, (16,), ref_w, norm.eps) * torch.arange(16.0)).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm.weight.grad, ref_w.grad, atol=1e-5, rtol=1e-5)

    mlp = SwiGLU(16, 24)
    y = torch.randn(2, 4, 16, requires_grad=True)
    y2 = y.detach().clone().requires_grad_(True)
    mlp(y).pow(2).sum().backward()
    g_ours = [p.grad.clone() for p in mlp.parameters()]
    for p in mlp.parameters():
        p.grad = None
    gate, up = F.linear(y2, mlp.gate_up.weight).chunk(2, -1)
    F.linear(F.silu(gate) * up, mlp.down.weight).pow(2).sum().backward()
    torch.testing.assert_close(y.grad, y2.grad, atol=1e-5, rtol=1e-5)
    for a, p in zip(g_ours, mlp.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-5)
