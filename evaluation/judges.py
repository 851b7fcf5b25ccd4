"""Shared evaluation pieces for the demo, `mmar eval` and the benchmarks: the independent classifier that reads
generated images, caption checking, PSNR, and the intervals (Wilson for rates, one percentile bootstrap for
everything else, paired when two arms score the same items).

The classifier is scikit-learn's RBF SVM trained on real held-out pixels only (never on generated
images). For digits it first deskews each image (second-moment shear correction, centred on the
centre of mass), a classic MNIST preprocessing that also makes it robust to the small shifts and
slants of generated digits; the training set is enlarged with one-pixel shifts of each image.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from train.sources import DIGIT_WORDS


def pixels(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> [N, C*H*W] in [0, 1]."""
    return ((images.float().clamp(-1, 1) + 1) / 2).flatten(1).cpu().numpy()


def deskew(images: np.ndarray) -> np.ndarray:
    """[N, H, W] in [0, 1] -> the same images sheared upright and centred on their centre of mass."""
    from scipy.ndimage import affine_transform

    n, h, w = images.shape
    rows, cols = np.mgrid[:h, :w].astype(np.float64)
    out = np.zeros_like(images, dtype=np.float64)
    for i, img in enumerate(images.astype(np.float64)):
        total = img.sum()
        if total <= 1e-6:  # blank image: nothing to straighten
            continue
        r0, c0 = (rows * img).sum() / total, (cols * img).sum() / total
        var_r = ((rows - r0) ** 2 * img).sum() / total
        cov = ((rows - r0) * (cols - c0) * img).sum() / total
        shear = cov / var_r if var_r > 1e-6 else 0.0
        matrix = np.array([[1.0, 0.0], [shear, 1.0]])  # output (r, c) samples input (r, c + shear * r)
        offset = np.array([r0, c0]) - matrix @ (np.array([h, w]) / 2.0)
        out[i] = affine_transform(img, matrix, offset=offset, order=1)
    return out


def shifted(images: np.ndarray) -> np.ndarray:
    """[N, H, W] -> [5N, H, W]: the images and their one-pixel shifts up, down, left and right."""
    pad = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    h, w = images.shape[1:]
    views = [pad[:, 1:h + 1, 1:w + 1], pad[:, :h, 1:w + 1], pad[:, 2:, 1:w + 1], pad[:, 1:h + 1, :w],
             pad[:, 1:h + 1, 2:]]
    return np.concatenate(views)


class HeldOutClassifier:
    """RBF SVM on real held-out images; `deskew` (single-channel digits) straightens them first."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray, deskew: bool = False, augment: bool = True):
        from sklearn.svm import SVC

        self.deskew = deskew and images.shape[1] == 1
        x = self._features(images, flat=False)  # [N, H, W] or [N, D]
        y = np.asarray(labels)
        if augment and x.ndim == 3:
            x, y = shifted(x), np.tile(y, 5)
        self.svm = SVC(C=10.0, gamma="scale").fit(x.reshape(len(x), -1), y)

    def _features(self, images: torch.Tensor, flat: bool = True) -> np.ndarray:
        x = pixels(images)
        if images.shape[1] == 1:
            x = x.reshape(len(x), *images.shape[2:])
            if self.deskew:
                x = deskew(x)
        return x.reshape(len(x), -1) if flat else x

    def predict(self, images: torch.Tensor) -> np.ndarray:
        return self.svm.predict(self._features(images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())


def mentioned_digits(text: str) -> set[int]:
    """Digits a caption names, as numerals or words."""
    found = {int(d) for d in re.findall(r"\d", text)}
    words = re.findall(r"[a-z]+", text.lower())
    return found | {i for i, w in enumerate(DIGIT_WORDS) if w in words}


def named_classes(text: str, class_names: list[str]) -> set[int]:
    """Classes a caption names: digits as numerals or words; other classes by whole-phrase match
    (longest names first, so "t-shirt" is not also read as "shirt")."""
    text = text.lower()
    if class_names[:1] == ["zero"]:
        return mentioned_digits(text)
    found = set()
    for i in sorted(range(len(class_names)), key=lambda i: -len(class_names[i])):
        pat = r"(?<![\w-])" + re.escape(class_names[i].lower()) + r"(?![\w-])"
        if re.search(pat, text):
            found.add(i)
            text = re.sub(pat, " ", text)
    return found


def caption_correct(text: str, label: int, class_names: list[str] | None = None) -> bool:
    """The caption names exactly the right class (digits by default)."""
    found = mentioned_digits(text) if class_names is None else named_classes(text, class_names)
    return found == {label}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio((a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2, data_range=1.0))


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion (sensible at rates near 0 or 1, unlike mean +- 2 se)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(stat, n: int, *, resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """(stat(all items), percentile bootstrap interval of `stat` over `resamples` resamplings of the n items).

    `stat(idx)` computes the figure on items `idx` (an int array, with repeats): a mean, a paired difference
    `b[idx].mean() - a[idx].mean()` (pair the arms by resampling the same items), a ratio, an FID of a resampled
    image set. A statistic whose resamples are biased to one side (FID rises with repeated images) can put the
    whole percentile interval on one side of the point; the interval is then widened to reach the point, so it
    always contains it."""
    if resamples < 1000:
        raise ValueError(f"bootstrap resamples must be >= 1000 for a 95% interval, got {resamples}")
    point = float(stat(np.arange(n)))
    rng = np.random.default_rng(seed)
    reps = np.array([stat(rng.integers(0, n, n)) for _ in range(resamples)], dtype=float)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return point, (float(min(lo, point)), float(max(hi, point)))


def mean_interval(x, **kw) -> tuple[float, tuple[float, float]]:
    """A mean with its percentile bootstrap interval (see bootstrap_interval)."""
    x = np.asarray(x, dtype=float)
    return bootstrap_interval(lambda i: x[i].mean(), len(x), **kw)


def paired_difference(a, b, **kw) -> tuple[float, tuple[float, float]]:
    """mean(b) - mean(a) over the same items, with a paired percentile bootstrap interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired arms must score the same items: {a.shape} vs {b.shape}")
    return bootstrap_interval(lambda i: b[i].mean() - a[i].mean(), len(a), **kw)
