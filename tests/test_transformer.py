import pytest
import torch

from models.config import PRESETS, LMConfig
from models.masks import block_ids_from_sizes
from models.transformer import Transformer


class Logits(torch.nn.Module):
    """The backbone with its next-token head: logits [B, T, V] for comparisons."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids, **kw):
        return self.lm.head(self.lm(ids, **kw))

    def new_cache(self, *a, **kw):
        return self.lm.new_cache(*a, **kw)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Logits(Transformer(LMConfig.from_preset("tiny", qkv_bias=True)).eval())


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


def test_block_ids_first_given_at_a_later_position(model):
    """A causal prompt without block ids, then blocks of 3 given from position 5 on: as the uncached mask."""
    ids = torch.randint(0, 256, (2, 11))
    blocks = block_ids_from_sizes(11, 3, first=5).expand(2, 11)  # positions 0-4 causal = their index
    full = model(ids, block_ids=blocks)
    cache = model.new_cache(2, 11)
    out = [model(ids[:, :5], cache=cache)]  # no block ids: the cache's causal default
    out += [model(ids[:, 5:8], block_ids=blocks[:, 5:8], cache=cache),
            model(ids[:, 8:], block_ids=blocks[:, 8:], cache=cache)]
    torch.testing.assert_close(torch.cat(out, 1), full, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_prefill(model):
    ids = torch.randint(0, 256, (2, 14))
    full = model(ids)
    cache = model.new_cache(2, 14)
    chunks = [model(ids[:, a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 14))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=0)


def test_left_padded_chunks_continue_positions(model):
    """A left-padded prompt prefilled in two chunks, then decoded: each row as if it had no padding."""
    a = torch.randint(1, 256, (1, 9))
    b = torch.randint(1, 256, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])  # row 1 has 4 pads
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    cache = model.new_cache(2, 12)
    model(ids[:, :6], valid=valid[:, :6], cache=cache)
    last = model(ids[:, 6:], valid=valid[:, 6:], cache=cache)[:, -1]
    nxt = torch.tensor([[7], [8]])
    step = model(nxt, cache=cache)[:, -1]
    torch.testing.assert_close(last[0], model(a)[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(last[1], model(b)[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step[1], model(torch.cat([b, nxt[1:]], 1))[0, -1], atol=1e-5, rtol=0)


def test_cache_reset_gives_the_same_results(model):
    ids = torch.randint(0, 256, (2, 6))
    cache = model.new_cache(2, 8)
    first = model(ids, valid=torch.tensor([[False] + [True] * 5] * 2), cache=cache)
    cache.reset()
    assert cache.pos == 0 and not cache.has_padding
    again = model(ids, cache=cache)
    torch.testing.assert_close(again, model(ids), atol=1e-5, rtol=0)
    assert not torch.allclose(first, again)


def test_rope_stays_fp32_under_bf16():
    m = Transformer(LMConfig.from_preset("tiny", max_len=4096))
    m.to(torch.bfloat16)
    pos = torch.tensor([[4000]])
    cos, _ = m.rope(pos, torch.float32, 4096)
    e = m.cfg.head_dim
    inv = 1.0 / m.cfg.rope_theta ** (torch.arange(0, e, 2, dtype=torch.float64) / e)
    want = torch.cos(4000 * inv).float()
    torch.testing.assert_close(cos[0, 0, 0, : e // 2], want, atol=1e-5, rtol=0)
    assert "rope" not in " ".join(m.state_dict())  # nothing of RoPE in checkpoints


def test_continuous_embeddings_at_marked_positions():
    torch.manual_seed(0)
    lm = Transformer(LMConfig.from_preset("tiny")).eval()
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:4] = mask[1, 5] = True
    embeds = torch.randn(3, lm.cfg.dim, requires_grad=True)
    out = lm(ids, embeds=embeds, embed_mask=mask)
    # the same as feeding hand-built input vectors through the blocks
    x = lm.tok_emb(ids).detach().clone()
    x[0, 2], x[0, 3], x[1, 5] = embeds[0], embeds[1], embeds[2]
    torch.testing.assert_close(out, _run_from_vectors(lm, x), atol=1e-5, rtol=0)
    out.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_mask"):
        lm(ids, embeds=embeds, embed_mask=torch.zeros(2, 6, dtype=torch.bool))


def _run_from_vectors(lm, x):
    """Forward from input vectors x [B, T, D]: every position marked as a continuous embedding."""
    b, t, d = x.shape
    return lm(torch.zeros(b, t, dtype=torch.long), embeds=x.reshape(-1, d), embed_mask=torch.ones(b, t, dtype=torch.bool))


def test_tied_embeddings_share_storage():
    m = Transformer(LMConfig.from_preset("tiny", tie_embeddings=True))
    assert m.head.weight.data_ptr() == m.tok_emb.weight.data_ptr()


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="divisible"):
        LMConfig(dim=100, n_heads=3)
    with pytest.raises(ValueError, match="unknown preset"):
        LMConfig.from_preset("nope")


def test_adaln_rows_equal_a_per_position_reference():
    """adaLN from C condition rows + cond_index (the modulation computed once per row) equals a hand-written
    per-position block: every weight random, one index for all rows [T] and one per row [B, T]."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    lm = Transformer(LMConfig.from_preset("tiny", adaln=True)).eval()
    for p in lm.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ids, rows = torch.randint(0, 100, (2, 7)), torch.randn(2, 3, lm.cfg.dim)  # [B, T], [B, C, D]

    def reference(cond):  # cond [B, T, D]: the adaLN linear applied at every position
        x = lm.tok_emb(ids)
        cos, sin = lm.rope(torch.arange(7).expand(2, 7), x.dtype, lm.cfg.max_len)
        for i, blk in enumerate(lm.blocks):
            mod = torch.stack([blk.ada(F.silu(cond[:, j])) for j in range(7)], 1)  # [B, T, 6D]
            g1, g2, s1, s2, b1, b2 = mod.chunk(6, dim=-1)
            x = x + (1 + g1) * blk.attn(blk.attn_norm(x) * (1 + s1) + b1, cos, sin, None, True, None, i)
            x = x + (1 + g2) * blk.mlp(blk.mlp_norm(x) * (1 + s2) + b2)
        return lm.norm(x)

    with torch.no_grad():
        idx = torch.tensor([0, 0, 0, 1, 1, 2, 2])
        torch.testing.assert_close(lm(ids, cond=rows, cond_index=idx), reference(rows[:, idx]))
        per_row = torch.tensor([[0, 0, 1, 1, 2, 2, 2], [0, 2, 2, 1, 1, 1, 0]])  # [B, T]
        ref = reference(torch.stack([rows[b, per_row[b]] for b in range(2)]))
        torch.testing.assert_close(lm(ids, cond=rows, cond_index=per_row), ref)
        torch.testing.assert_close(lm(ids, cond=rows[:, idx]), reference(rows[:, idx]))  # per position, no index
        with pytest.raises(ValueError, match="adaLN"):
            lm(ids, cond=rows)
