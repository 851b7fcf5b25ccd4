"""Scenes source: determinism, split disjointness, caption parsing, and the scorers on known values."""
from __future__ import annotations

import random

import numpy as np
import pytest

from evaluation.captions import bleu4, cider_d
from train.scenes import (CANVAS, FILLERS, NAMES, PHRASINGS, PLACES, SPLITS, CellReader, ItemPools, Scenes,
                          all_captions, compose_caption, parse_caption, score_captions)


@pytest.fixture(scope="module")
def fake_pools():
    """200 fake 28x28 items per source: each item's pixels are its row number (so rows are recognisable)."""
    rng = np.random.default_rng(0)
    x = np.stack([np.full((28, 28), i % 251 + 1, dtype=np.uint8) for i in range(400)])
    return ItemPools.from_sources({"mnist": (x[:200], rng.integers(0, 10, 200)),
                                   "fashion_mnist": (x[200:], rng.integers(10, 20, 200))})


def test_scenes_are_deterministic(fake_pools):
    a, b = Scenes(fake_pools, "train", 50, seed=3), Scenes(fake_pools, "train", 50, seed=3)
    for i in range(50):
        assert np.array_equal(a.image(i), b.image(i))
        assert a.captions(i) == b.captions(i)
    c = Scenes(fake_pools, "train", 50, seed=4)
    assert any(a.layout(i) != c.layout(i) for i in range(50))
    img = a.image(0)
    assert img.shape == (CANVAS, CANVAS) and img.dtype == np.uint8
    counts = [sum(t >= 0 for t in a.truth(i)) for i in range(50)]
    assert min(counts) >= 1 and max(counts) <= 4


def test_splits_never_share_a_source_item(fake_pools):
    pools = fake_pools.pools
    for s in SPLITS:
        for t in SPLITS:
            if s < t:
                assert not set(pools[s]) & set(pools[t])
    assert sum(len(p) for p in pools.values()) == 400
    used = {s: Scenes(fake_pools, s, 300, seed=0).item_rows() for s in SPLITS}
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    for s in SPLITS:
        assert used[s] <= set(pools[s])


def test_real_pools_are_disjoint_and_cover_both_sources():
    pools = ItemPools.load(0)
    assert len(pools.images) == 75_000
    rows = [set(pools.pools[s].tolist()) for s in SPLITS]
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    assert set(np.unique(pools.classes[pools.pools["test"]])) == set(range(20))
    scenes = Scenes(pools, "test", 20)
    truth = scenes.truth(0)
    img = scenes.image(0)
    for k, c in enumerate(truth):  # an empty cell is black, a filled one is not
        cell = img[(k // 2) * 28:(k // 2) * 28 + 28, (k % 2) * 28:(k % 2) * 28 + 28]
        assert (cell.max() == 0) == (c < 0)


def test_every_phrasing_parses_back_to_the_truth():
    rng = random.Random(0)
    for _ in range(200):
        truth = [-1] * 4
        for k in rng.sample(range(4), rng.randint(1, 4)):
            truth[k] = rng.randrange(20)
        caps = all_captions(truth)
        assert len(caps) == len(PHRASINGS) * len(FILLERS)
        for cap in caps:
            assert parse_caption(cap) == (truth, 0), cap


def test_parser_on_hand_written_captions():
    assert compose_caption([7, -1, -1, 17], 0, 0) == "a 7 at the top left and a sneaker at the bottom right"
    assert parse_caption("a t-shirt at the top left and a shirt at the top right") == ([10, 16, -1, -1], 0)
    assert parse_caption("an ankle boot at the bottom left and a sandal at the bottom right") == ([-1, -1, 19, 15], 0)
    cells, stray = parse_caption("a 7 at the top left, a 3 at the top left and a bag")
    assert cells == [-2, -1, -1, -1] and stray == 1
    assert parse_caption("on a dark background") == ([-1] * 4, 0)
    assert PLACES[3] == "bottom right" and NAMES[17] == "sneaker"


def test_score_captions():
    truths = [[7, -1, -1, 17], [-1, 18, -1, -1]]
    refs = [all_captions(t) for t in truths]
    perfect = score_captions([refs[0][0], refs[1][5]], truths, refs)
    assert perfect["slot"].tolist() == [1.0, 1.0] and perfect["scene"].all() and perfect["exact"].all()
    wrong = score_captions(["a 1 at the top left and a sneaker at the bottom right", "a bag at the top right and a 3"],
                           truths, refs)
    assert wrong["slot"].tolist() == [0.75, 1.0]
    assert wrong["scene"].tolist() == [False, False]  # the stray "a 3" spoils the second scene
    assert not wrong["exact"].any()
    assert perfect["bleu4"] == pytest.approx(1.0) and wrong["bleu4"] < 1.0


# Known values computed with pycocoevalcap 1.2's BleuScorer(option="closest") and CiderScorer(sigma=6) on the
# same word lists (its Java tokenizer not used).
KNOWN = [
    (["a 7 at the top left and a sneaker at the bottom right", "a bag at the top right",
      "there is a 3 in the bottom left corner"],
     [["a 7 at the top left and a sneaker at the bottom right", "top left: a 7, bottom right: a sneaker"],
      ["a bag at the top right, on a dark background", "at the top right a bag"],
      ["there is a 5 in the bottom left corner", "a 5 at the bottom left"]],
     0.8818922672413197, 5.18420931154976),
    (["the cat sat on the mat", "a dog runs in the park today"],
     [["the cat is on the mat", "there is a cat on the mat"], ["a dog is running in a park", "the dog runs in the park"]],
     0.5287179049586679, 4.191919647725078),
]


@pytest.mark.parametrize("cands,refs,bleu,cider", KNOWN)
def test_scorers_match_known_values(cands, refs, bleu, cider):
    assert bleu4(cands, refs) == pytest.approx(bleu, rel=1e-8)
    assert cider_d(cands, refs) == pytest.approx(cider, rel=1e-10)


def test_scorer_edge_cases():
    assert bleu4(["completely different words"], [["a 7 at the top left"]]) == 0.0
    assert bleu4(["a 7"], [["a 7 at the top left"]]) == 0.0  # no 3-gram or 4-gram
    short = bleu4(["a 7 at the top left"], [["a 7 at the top left on a dark background"]])
    assert 0 < short < 1  # all precisions 1, brevity penalty < 1
    assert cider_d([], []) == 0.0
    with pytest.raises(ValueError):
        bleu4(["a"], [])


def test_cell_reader_reads_real_test_scenes():
    pools = ItemPools.load(0)
    reader = CellReader(pools, "val", per_class=25)
    scenes = Scenes(pools, "test", 60, seed=1)
    acc = reader.accuracy(scenes.images(), [scenes.truth(i) for i in range(60)])
    assert acc.mean() > 0.8  # empty cells always right, items mostly
