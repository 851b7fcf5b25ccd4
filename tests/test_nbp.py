"""Next-block prediction: mask structure, shifted targets, and KV-cached block sampling that computes exactly
what the training forward computes."""
import pytest
import torch

from models import objectives
from models.config import LMConfig
from models.objectives import NextBlockPrediction
from models.sequence import IMAGE, TEXT
from models.transformer import Transformer

V, BOI, N = 64, 3, 12  # vocabulary, <boi> id, codes per sample (3 "frames" of 2x2)


def lm():
    torch.manual_seed(0)
    return Transformer(LMConfig.from_preset("tiny", vocab_size=V, max_len=64)).eval()


def batch(codes, prefixes):
    """A collated text->visual batch: prefix <boi> codes <eoi> <eos>, right-padded."""
    rows = [list(p) + [BOI] + c.tolist() + [4, 2] for p, c in zip(prefixes, codes)]
    t = max(map(len, rows))
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mod = torch.zeros(len(rows), t, dtype=torch.long)
    for i, (r, p) in enumerate(zip(rows, prefixes)):
        ids[i, :len(r)] = torch.tensor(r)
        mod[i, len(p):len(p) + N + 2] = IMAGE
    return {"ids": ids, "modality": mod, "loss": ids > 0, "valid": ids > 0}


@pytest.mark.parametrize("bk,first", [(1, "condition"), (1, "tokens"), (N, "tokens")])
def test_block_size_one_is_next_token_prediction(bk, first):
    """With blocks of one token, or one block drawn token by token (the hybrid first block and nothing after it),
    NBP's loss equals plain next-token cross-entropy on the codes."""
    m = lm()
    codes = torch.randint(10, V, (2, N))
    prefixes = [[1, 5, 6, 7], [1, 5, 8]]
    out = NextBlockPrediction(bk, first).loss(m, batch(codes, prefixes))
    ref = []
    for p, c in zip(prefixes, codes):
        seq = torch.tensor(list(p) + [BOI] + c.tolist())[None]
        logits = m.head(m(seq[:, :-1]))[0, -N:]
        ref.append(torch.nn.functional.cross_entropy(logits, c, reduction="none"))
    assert torch.allclose(out["loss"], torch.cat(ref).mean(), atol=1e-5)


def test_mask_is_block_causal_and_targets_shifted():
    """Changing block b of the codes changes only the predictions of blocks > b (shifted by one block),
    and inside a block every position sees the whole block."""
    m, obj = lm(), NextBlockPrediction(4, "condition")
    codes = torch.randint(10, V, (1, N))
    prefixes = [[1, 5, 6]]

    def logits(c):
        ids, valid, pos, blocks = obj.layout([torch.tensor(p) for p in prefixes], BOI, c)
        return m.head(m(ids, position_ids=pos, block_ids=blocks, valid=valid))[:, -N:]

    base = logits(codes)
    c2 = codes.clone()
    c2[0, 5] = (c2[0, 5] + 1 - 10) % (V - 10) + 10  # block 1, position 1
    diff = (logits(c2) - base).abs().amax(-1)[0]  # [N]
    assert diff[:8].max() == 0  # predictions of blocks 0 and 1 do not see block 1 ... 
    assert (diff[8:] > 0).all()  # ... every position of block 2 does (bidirectional inside block 1)


@pytest.mark.parametrize("first,bk", [("condition", 4), ("tokens", 4), ("condition", 1), ("tokens", 6), ("tokens", N)])
def test_cached_block_sampling_matches_training_forward(first, bk):
    """Greedy block sampling through the KV cache (left-padded prompts, guidance on) reproduces the
    argmax of the training forward on its own output, i.e. training and decoding see the same inputs."""
    m, obj = lm(), NextBlockPrediction(bk, first)
    prefixes = [[1, 5, 6, 7], [1, 5]]
    unc = [[1, 5], [1, 5]]
    rows = [p + [BOI] for p in prefixes + unc]
    t = max(map(len, rows))
    prompt = torch.zeros(4, t, dtype=torch.long)
    valid = torch.zeros(4, t, dtype=torch.bool)
    for i, r in enumerate(rows):
        prompt[i, t - len(r):], valid[i, t - len(r):] = torch.tensor(r), True
    out = obj.generate(m, prompt, N, valid=valid, temperature=0.0, cfg_scale=2.0)
    assert out.shape == (2, N)
    with torch.no_grad():
        def lg(pfx):
            ids, v, pos, blocks = obj.layout([torch.tensor(p) for p in pfx], BOI, out)
            return m.head(m(ids, position_ids=pos, block_ids=blocks, valid=v))[:, -N:]
        guided = lg(unc) + 2.0 * (lg(prefixes) - lg(unc))
    assert torch.equal(guided.argmax(-1), out)


def test_forward_passes_per_sample():
    m = lm()
    calls = []
    m.register_forward_hook(lambda *a: calls.append(1))
    prompt = torch.tensor([[1, 5, 6, BOI]])
    for first, bk, expect in [("condition", 4, 3), ("tokens", 4, 4 + 2), ("condition", 12, 1)]:
        calls.clear()
        NextBlockPrediction(bk, first).generate(m, prompt, N, temperature=1.0)
        assert len(calls) == expect


def test_checkpoint_records_objective_and_bad_config():
    d = objectives.describe(NextBlockPrediction(8, "tokens"))
    assert d == {"name": "nbp", "config": {"block_size": 8, "first_block": "tokens"}}
    assert objectives.build(d).config.block_size == 8
    with pytest.raises(ValueError, match="first_block"):
        NextBlockPrediction(8, "random")
    with pytest.raises(ValueError, match="does not divide"):
        NextBlockPrediction(5).loss(lm(), batch(torch.randint(10, V, (1, N)), [[1, 5]]))
