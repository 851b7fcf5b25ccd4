import torch

from models import masks


def brute(q_block, k_block, valid=None):
    b, tq = q_block.shape
    tk = k_block.shape[1]
    out = torch.zeros(b, 1, tq, tk, dtype=torch.bool)
    for n in range(b):
        for i in range(tq):
            qi = tk - tq + i
            for j in range(tk):
                ok = k_block[n, j] <= q_block[n, i]
                if valid is not None:
                    ok = ok and (bool(valid[n, j]) or j == qi)
                out[n, 0, i, j] = ok
    return out


def test_block_causal_against_bruteforce():
    ids = masks.block_ids_from_sizes(10, 3, first=1)
    assert ids.tolist() == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    m = masks.attention_mask(ids[None], ids[None])
    ref = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    for i in range(10):
        for j in range(10):
            # bidirectional inside a block, causal across blocks
            ref[0, 0, i, j] = ids[j] <= ids[i]
    assert torch.equal(m, ref)
    assert torch.equal(m, brute(ids[None], ids[None]))
    # inside a block every position sees every other one; earlier blocks never see later ones
    assert m[0, 0, 1, 3] and m[0, 0, 3, 1] and not m[0, 0, 3, 4]


def test_padding_combined_with_blocks():
    g = torch.Generator().manual_seed(0)
    ids = masks.block_ids_from_sizes(8, 2).expand(3, 8)
    valid = torch.rand(3, 8, generator=g) > 0.3
    m = masks.attention_mask(ids, ids, valid)
    assert torch.equal(m, brute(ids, ids, valid))
    assert m.any(-1).all()  # no query row is empty (no NaN in softmax)
