import itertools

import pytest
import torch

from models.config import LMConfig
from models.sampling import cfg_combine, generate, id_range_mask, left_pad, sample, top_p_filter
from models.transformer import Transformer


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.4, 0.1, 0.3, 0.15]])
    kept = torch.isfinite(top_p_filter(probs.log(), 0.8))
    # sorted: 0.4, 0.3, 0.15 (cum 0.85 >= 0.8) -> exactly these three
    assert kept.tolist() == [[False, True, False, True, True]]
    kept = torch.isfinite(top_p_filter(probs.log(), 0.7))
    assert kept.tolist() == [[False, True, False, True, False]]  # 0.4 + 0.3 reaches 0.7


def _reference_distribution(logits, temperature, top_k, top_p):
    """Brute force: the sampling distribution of one row, written from the definitions."""
    p = (logits / temperature).softmax(-1).tolist()
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = order[:top_k]
    kp = [p[i] / sum(p[j] for j in keep) for i in keep]  # renormalised over the top k
    out, mass = [0.0] * len(p), 0.0
    for i, q in zip(keep, kp):  # smallest prefix of the top k whose mass reaches top_p
        out[i] = q
        mass += q
        if mass >= top_p:
            break
    z = sum(out)
    return torch.tensor([x / z for x in out])


@pytest.mark.parametrize("top_k,top_p,temperature", [(4, 0.6, 1.0), (6, 0.9, 0.7), (3, 1.0, 1.5)])
def test_top_k_and_top_p_combined_match_brute_force(top_k, top_p, temperature):
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.2, -0.5, -1.0, 0.9])
    want = _reference_distribution(logits, temperature, top_k, top_p)
    n = 40_000
    ids = sample(logits.expand(n, -1), temperature, top_k, top_p, generator=torch.Generator().manual_seed(0))
    got = torch.bincount(ids, minlength=len(logits)).float() / n
    assert torch.equal(got > 0, want > 0)  # exactly the reference's support
    torch.testing.assert_close(got, want, atol=0.01, rtol=0)


def test_masked_ids_never_drawn():
    g = torch.Generator().manual_seed(0)
    logits = torch.zeros(10_000, 50)
    logits[:, :10] = 5.0  # the disallowed ids are the most likely ones
    allowed = id_range_mask(50, 10, 30)
    ids = sample(logits, temperature=1.0, allowed=allowed, generator=g)
    assert ((ids >= 10) & (ids < 30)).all()
    assert len(ids.unique()) == 20


def test_top_k_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).expand(2000, 4)
    g = torch.Generator().manual_seed(1)
    ids = sample(logits, top_k=2, generator=g)
    assert set(ids.tolist()) == {1, 2}
    assert sample(logits[:1], temperature=0).item() == 1


def test_cfg_combine():
    c, u = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    torch.testing.assert_close(cfg_combine(torch.cat([c, u]), 3.0), u + 3.0 * (c - u))


def _model():
    torch.manual_seed(0)
    return Transformer(LMConfig.from_preset("tiny")).eval()


def test_same_seed_same_tokens():
    m = _model()
    prompt = torch.randint(0, 256, (2, 5))
    run = lambda s: generate(m, prompt, 12, top_k=50, top_p=0.9, generator=torch.Generator().manual_seed(s))
    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_greedy_generation_matches_uncached_argmax():
    m = _model()
    prompt = torch.randint(0, 256, (1, 6))
    out = generate(m, prompt, 8, temperature=0)
    seq = prompt
    for _ in range(8):
        seq = torch.cat([seq, m.head(m(seq))[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 6:])


def test_temperature_to_zero_equals_greedy():
    m = _model()
    prompt = torch.randint(0, 256, (3, 4))
    greedy = generate(m, prompt, 10, temperature=0)
    cold = generate(m, prompt, 10, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)


def test_guidance_scale_one_equals_conditional_sampling():
    """cfg 1: u + 1 * (c - u) = c, so the guided batch draws what the conditional rows alone draw."""
    m = _model()
    cond, uncond = [3, 4, 5, 6], [3]
    ids, valid = left_pad([cond, cond, uncond, uncond], pad_id=0)
    guided = generate(m, ids, 12, valid=valid, cfg_scale=1.0, generator=torch.Generator().manual_seed(7))
    alone = generate(m, torch.tensor([cond, cond]), 12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(guided, alone)


def test_left_padded_batch_equals_single_prompts():
    m = _model()
    a, b = [5, 6, 7, 8, 9], [10, 11]
    ids, valid = left_pad([a, b], pad_id=0)
    both = generate(m, ids, 6, valid=valid, temperature=0)
    for row, p in zip(both, (a, b)):
        single = generate(m, torch.tensor([p]), 6, temperature=0)
        assert torch.equal(row, single[0])


def test_cfg_generation_and_allowed_range():
    m = _model()
    cond, uncond = [1, 2, 3, 4], [1]
    ids, valid = left_pad([cond, cond, uncond, uncond], pad_id=0)
    allowed = id_range_mask(256, 100, 120)
    out = generate(m, ids, 10, valid=valid, cfg_scale=lambda s: 1.0 + s, allowed=allowed,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 10)
    assert ((out >= 100) & (out < 120)).all()


def test_guidance_with_odd_rows_is_a_clear_error():
    m = _model()
    with pytest.raises(ValueError, match="guidance needs conditional and unconditional rows in equal number, got 3"):
        generate(m, torch.zeros(3, 4, dtype=torch.long), 2, cfg_scale=2.0)


def test_stop_id_ends_generation():
    m = _model()
    out = generate(m, torch.tensor([[1, 2]]), 50, allowed=id_range_mask(256, 7, 8), stop_id=7)
    assert out.tolist() == [[7]]


def test_cached_decoding_equals_uncached_with_padding_and_guidance():
    """The product path (left padding + a guided batch) token for token against uncached forwards."""
    m = _model()
    rows = [[9, 8, 7, 6, 5], [4, 3], [9], [9]]  # two conditional prompts, then two unconditional
    ids, valid = left_pad(rows, pad_id=0)
    out = generate(m, ids, 6, valid=valid, cfg_scale=2.5, temperature=0)
    seqs = [list(r) for r in rows]
    for step in range(6):
        lg = torch.stack([m.head(m(torch.tensor([s])))[0, -1] for s in seqs])
        tok = cfg_combine(lg, 2.5).argmax(-1)
        assert torch.equal(tok, out[:, step])
        for s, t in zip(seqs, itertools.chain(tok.tolist(), tok.tolist())):
            s.append(t)
