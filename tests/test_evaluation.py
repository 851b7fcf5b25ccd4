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


def test_heldout_parts_are_the_data_modules_held_out_cut_three_ways():
    from evaluation.splits import heldout_parts
    from train.datamodules import split_source
    from train.sources import load_mnist_set

    parts = heldout_parts(5000)
    assert [len(parts[k]) for k in ("validation", "tuning", "test")] == [250, 750, 500]
    allp = np.concatenate(list(parts.values()))
    assert len(set(allp.tolist())) == 1500
    _, held = split_source("mnist", None, 1500, 0)  # what training leaves out, in the same order
    data = load_mnist_set()
    assert [held.captions[i] for i in range(5)] == [data.captions[int(i)] for i in parts["validation"][:5]]


def test_t2i_prompts_of_tuning_and_test_differ_and_cover_every_class():
    from evaluation.evaluate import DEFAULT_SEEDS, t2i_prompts
    from evaluation.splits import heldout_parts
    from train.sources import load_mnist_set

    data, parts = load_mnist_set(), heldout_parts(5000)
    tune, want_tune = t2i_prompts(data, parts["tuning"], 20, DEFAULT_SEEDS["tuning"])
    test, want_test = t2i_prompts(data, parts["test"], 20, DEFAULT_SEEDS["test"])
    assert len(test) == 200 and (np.bincount(want_test) == 20).all() and (want_tune == want_test).all()
    assert tune != test and len(set(test)) > 10  # the split's own captions, several templates
    assert all(caption_correct(p, int(y)) for p, y in zip(test, want_test))  # each prompt names its class


def test_bootstrap_intervals_contain_their_point_and_pair_the_arms():
    from evaluation.judges import bootstrap_interval, mean_interval, paired_difference

    rng = np.random.default_rng(0)
    x = rng.random(200)
    m, (lo, hi) = mean_interval(x)
    assert m == pytest.approx(x.mean()) and lo < m < hi and hi - lo < 0.15
    a = rng.random(300)
    b = a + 0.05 + rng.normal(0, 0.01, 300)  # paired: a tiny shift on top of a large common spread
    d, (lo, hi) = paired_difference(a, b)
    assert 0.04 < lo < d < hi < 0.06
    # a statistic biased by repeats (the number of distinct items): every resample falls below the point
    point, (lo, hi) = bootstrap_interval(lambda i: len(set(i.tolist())), 100)
    assert point == 100 and lo <= point <= hi == 100
    with pytest.raises(ValueError, match=">= 1000"):
        bootstrap_interval(lambda i: 0.0, 10, resamples=10)


def test_fid_equals_the_textbook_formula_and_its_interval_contains_it():
    import scipy.linalg

    from evaluation.fid import FID

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32))  # a stand-in feature network
    real = torch.rand(200, 1, 8, 8) * 2 - 1
    fid = FID(net, real)
    fr = fid.features(real)
    for fake in (torch.rand(60, 1, 8, 8) * 1.4 - 0.6, torch.rand(20, 1, 8, 8)):  # n > and < the feature count
        fg = fid.features(fake)
        c1, c2 = np.cov(fr, rowvar=False), np.cov(fg, rowvar=False)
        ref = ((fr.mean(0) - fg.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
        assert fid(fake) == pytest.approx(ref, rel=1e-5)
    assert abs(fid(real)) < 1e-6
    point, (lo, hi) = fid.interval(torch.rand(60, 1, 8, 8) * 1.4 - 0.6)
    assert lo <= point <= hi and hi > point


def test_fid_of_a_resample_from_distinct_items_and_counts_equals_the_repeated_rows():
    """The bootstrap scores a resample on its distinct items with their counts (a smaller Gram matrix): the same FID
    as the repeated rows, with fewer and with more items than features."""
    from evaluation.fid import FID

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 24))
    fid = FID(net, torch.rand(100, 1, 8, 8) * 2 - 1)
    rng = np.random.default_rng(0)
    for n in (15, 60):
        f = fid.features(torch.rand(n, 1, 8, 8))
        y = f @ fid.sqrt_r
        idx = rng.integers(0, n, n)
        assert len(set(idx.tolist())) < n  # repeats
        assert fid._resampled(f, y, idx) == pytest.approx(fid._distance(f[idx], y[idx]), rel=1e-6)


def test_fid_paired_ratio_resamples_both_sets_together():
    from evaluation.fid import FID

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    real = torch.rand(300, 1, 8, 8) * 2 - 1
    fid = FID(net, real)
    near, far = real + 0.05 * torch.randn_like(real), real * 0.5 + 0.3  # two "reconstructions" of the same images
    fa, fb = fid.features(far), fid.features(near)
    ratio, (lo, hi) = fid.paired_ratio(fa, fb)
    assert ratio == pytest.approx(fid(far) / fid(near), rel=1e-6)
    assert 1 < lo <= ratio <= hi  # far is worse on every resample
    same, (lo, hi) = fid.paired_ratio(fa, fa)
    assert same == pytest.approx(1.0) and lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError, match="paired"):
        fid.paired_ratio(fa, fb[:10])
