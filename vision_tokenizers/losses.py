"""Optional tokenizer losses: a PatchGAN discriminator with hinge losses, and a perceptual-loss hook.

Both are off by default in the demo. The perceptual loss needs a pretrained feature network
(VGG / LPIPS); no such weights are available offline here, so `PerceptualLoss` takes *any* module
you hand it and does nothing when given None.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, ch), ch)  # batch-size independent, no SyncBN needed under DDP
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose 'group', 'batch' or 'none'")


class NLayerDiscriminator(nn.Module):
    """PatchGAN: conv-norm-leakyrelu stack that scores overlapping patches as real/fake.

    in [B, C, H, W] -> logits [B, 1, h, w]; for 28x28 with n_layers=2: 28 -> 14 -> 7 -> 6 -> 5.
    """

    def __init__(self, in_channels: int = 1, ndf: int = 32, n_layers: int = 2, norm: str = "group"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        ch = ndf
        for i in range(1, n_layers + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n_layers else 1  # last hidden layer keeps the resolution (minus 1)
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=norm == "none"), _norm(norm, out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # DCGAN-style init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss: -E[D(G(z))]."""
    return -logits_fake.mean()


class PerceptualLoss(nn.Module):
    """Feature-matching loss over a frozen feature network (an LPIPS-style hook without learned weights).

    `feature_net(x)` may return one tensor, a list/tuple of tensors or a dict of tensors; each feature
    map is unit-normalised over channels and the squared difference averaged, then summed over maps.
    `input_transform` maps tokenizer images (e.g. [-1, 1] grayscale) to what the net expects
    (e.g. 3 channels, ImageNet normalisation). With feature_net=None the loss is a constant 0, which
    is the default because no VGG/LPIPS weights can be downloaded here.
    """

    def __init__(self, feature_net: nn.Module | None = None, input_transform: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.feature_net = feature_net
        self.input_transform = input_transform
        if feature_net is not None:
            feature_net.eval()
            for p in feature_net.parameters():
                p.requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self.feature_net is not None

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        if self.feature_net is not None:
            self.feature_net.eval()  # frozen: keep BatchNorm/Dropout in inference mode
        return self

    def _features(self, x: Tensor) -> list[Tensor]:
        if self.input_transform is not None:
            x = self.input_transform(x)
        out = self.feature_net(x)
        if isinstance(out, Tensor):
            return [out]
        if isinstance(out, dict):
            return list(out.values())
        return list(out)

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """recon, target [B, C, H, W] -> scalar loss (gradient flows to recon only)."""
        if self.feature_net is None:
            return recon.new_zeros(())
        with torch.no_grad():
            target_feats = self._features(target)
        loss = recon.new_zeros(())
        for fr, ft in zip(self._features(recon), target_feats):
            fr = F.normalize(fr, dim=1, eps=1e-8)
            ft = F.normalize(ft, dim=1, eps=1e-8)
            loss = loss + (fr - ft).pow(2).sum(1).mean()
        return loss
