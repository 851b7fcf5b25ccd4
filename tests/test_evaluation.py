"""The demo's and the benchmarks' evaluation pieces: caption checking, deskewing, the held-out classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.judges import HeldOutClassifier, caption_correct, deskew, named_classes, psnr, shifted
from train.sources import FASHION_CLASSES, load_digits_set


def test_caption_checks_name_exactly_one_class():
    assert caption_correct("a handwritten 7", 7) and caption_correct("the digit seven", 7)
    assert not caption_correct("a 7 or a 1", 7) and not caption_correct("a handwritten", 7)
    assert not caption_correct("seventy", 7)  # whole words only
    assert named_classes("a photo of a t-shirt", FASHION_CLASSES) == {0}  # not also "shirt"
    assert caption_correct("a grayscale picture of a ankle boot", 9, FASHION_CLASSES)


def _moments(img: np.ndarray) -> tuple[float, float, float]:
    rows, cols = np.mgrid[:img.shape[0], :img.shape[1]]
    t = img.sum()
    r0, c0 = (rows * img).sum() / t, (cols * img).sum() / t
    return r0, c0, ((rows - r0) * (cols - c0) * img).sum() / t


def test_deskew_straightens_and_centres_a_slanted_stroke():
    img = np.zeros((28, 28))
    for r in range(4, 20):  # a stroke leaning right, off centre
        img[r, 2 + r // 2: 4 + r // 2] = 1.0
    assert abs(_moments(img)[2]) > 1.0
    out = deskew(img[None])[0]
    r0, c0, cov = _moments(out)
    assert abs(cov) < 0.2 * abs(_moments(img)[2])
    assert abs(r0 - 14) < 1 and abs(c0 - 14) < 1
    assert deskew(np.zeros((1, 28, 28))).sum() == 0  # blank images pass through


def test_shifted_adds_four_one_pixel_shifts():
    x = np.arange(2 * 3 * 3, dtype=float).reshape(2, 3, 3) + 1
    out = shifted(x)
    assert out.shape == (10, 3, 3)
    np.testing.assert_array_equal(out[:2], x)
    np.testing.assert_array_equal(out[2, 1:], x[0, :2])  # moved down by one row, zero row on top
    assert out[2, 0].sum() == 0


def test_held_out_classifier_reads_real_digits():
    data = load_digits_set()
    images = torch.stack([data.image(i, 1, 28) for i in range(500)])
    clf = HeldOutClassifier(images[:300], data.labels[:300], deskew=True)
    assert clf.accuracy(images[300:], data.labels[300:500]) > 0.85
    assert len(clf.svm.support_) > 0 and clf.svm.shape_fit_[0] == 5 * 300  # trained with the shifted copies


def test_psnr_falls_with_noise():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    small, large = psnr(x + 0.01 * torch.randn_like(x), x), psnr(x + 0.2 * torch.randn_like(x), x)
    assert small > large > 0


def test_wilson_interval_known_values():
    from evaluation.judges import wilson_interval

    lo, hi = wilson_interval(95, 100)  # textbook value: 0.8882 - 0.9785
    assert abs(lo - 0.8882) < 1e-3 and abs(hi - 0.9785) < 1e-3
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-3


def test_demo_ckpt_missing_is_one_line(tmp_path, capsys):
    from train.demo import main
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and err.endswith(f"{tmp_path / 'nope.ckpt'}: checkpoint not found")
    assert not (tmp_path / "out").exists()
