import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vision_tokenizers.losses import (
    NLayerDiscriminator,
    PerceptualLoss,
    hinge_d_loss,
    hinge_g_loss,
)
from vision_tokenizers.quantizers import IndexPropagationQuantizer, VectorQuantizer
from vision_tokenizers.vq import VQConfig, VQTokenizer

# Small but structurally identical to the default (3 levels -> 28x28 becomes 7x7).
SMALL = dict(channels=(8, 16, 16), latent_dim=8, codebook_size=32, norm_num_groups=4)


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    """MNIST-like images in [-1, 1]: one or two bright Gaussian strokes on a dark background. [n, 1, size, size]"""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    img = torch.zeros(n, size, size)
    for _ in range(2):
        cy, cx = (torch.rand(n, 1, 1, generator=g) * 0.6 + 0.2) * size, (torch.rand(n, 1, 1, generator=g) * 0.6 + 0.2) * size
        sy, sx = 1.5 + 3 * torch.rand(n, 1, 1, generator=g), 1.5 + 3 * torch.rand(n, 1, 1, generator=g)
        img = torch.maximum(img, torch.exp(-((ys - cy) ** 2 / (2 * sy**2) + (xs - cx) ** 2 / (2 * sx**2))))
    return (img * 2 - 1)[:, None]


def test_default_config_geometry():
    cfg = VQConfig()
    assert cfg.downsample_factor == 4
    m = VQTokenizer(cfg)
    assert m.grid == (7, 7) and m.num_tokens == 49
    assert isinstance(m.quantizer, VectorQuantizer) and m.quantizer.restart_dead_codes


@pytest.mark.parametrize("quantizer", ["vq", "ibq"])
def test_round_trip_shapes(quantizer):
    torch.manual_seed(0)
    m = VQTokenizer(VQConfig(quantizer=quantizer, **SMALL)).eval()
    x = blobs(3)
    codes = m.encode(x)
    assert codes.shape == (3, 7, 7) and codes.dtype == torch.long
    assert codes.min() >= 0 and codes.max() < 32
    img = m.decode(codes)
    assert img.shape == (3, 1, 28, 28)
    assert img.min() >= -1 and img.max() <= 1
    assert m.embed(codes).shape == (3, 8, 7, 7)
    recon, q = m(x)
    assert recon.shape == x.shape and q.codes.shape == (3, 7, 7)
    assert torch.equal(q.codes, codes)
    torch.testing.assert_close(m.decode(codes), recon.clamp(-1, 1))
    if quantizer == "ibq":
        assert isinstance(m.quantizer, IndexPropagationQuantizer)


def test_odd_image_size_is_padded_and_cropped():
    m = VQTokenizer(VQConfig(image_size=27, in_channels=3, **SMALL)).eval()
    assert m.grid == (7, 7)
    x = torch.rand(2, 3, 27, 27) * 2 - 1
    codes = m.encode(x)
    assert codes.shape == (2, 7, 7)
    assert m.decode(codes).shape == (2, 3, 27, 27)
    assert m(x)[0].shape == (2, 3, 27, 27)
    # non-square inputs work in forward too
    assert m(torch.rand(1, 3, 20, 30))[0].shape == (1, 3, 20, 30)


def test_config_round_trips_through_dict():
    cfg = VQConfig(channels=[16, 32], quantizer="ibq")
    assert cfg.channels == (16, 32)
    assert VQConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        VQConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError):
        VQConfig(quantizer="fsq")
    with pytest.raises(ValueError):
        VQConfig(channels=(12, 32), norm_num_groups=8)


@pytest.mark.parametrize("quantizer", ["vq", "ibq"])
def test_training_lowers_reconstruction_loss(quantizer):
    torch.manual_seed(0)
    m = VQTokenizer(VQConfig(quantizer=quantizer, **SMALL))
    x = blobs(12)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)

    def recon_loss():
        with torch.no_grad():
            return F.mse_loss(m.eval()(x)[0], x).item()

    start = recon_loss()
    m.train()
    for _ in range(20):
        recon, q = m(x)
        loss = F.mse_loss(recon, x) + q.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in m.encoder.parameters() if p.requires_grad)
    end = recon_loss()
    assert end < 0.5 * start, (start, end)


def test_patchgan_shape_and_hinge_losses():
    d = NLayerDiscriminator(in_channels=1, ndf=8, n_layers=2)
    out = d(blobs(2))
    assert out.shape == (2, 1, 5, 5)
    for norm in ("batch", "none"):
        assert NLayerDiscriminator(3, ndf=8, n_layers=3, norm=norm)(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)
    big = torch.full((4, 1, 5, 5), 5.0)
    assert hinge_d_loss(big, -big).item() == 0.0  # confident and right: no loss
    assert hinge_d_loss(-big, big).item() == pytest.approx(6.0)  # 0.5 * (6 + 6)
    assert hinge_d_loss(torch.zeros(2, 1), torch.zeros(2, 1)).item() == pytest.approx(1.0)
    assert hinge_g_loss(big).item() == -5.0
    # the generator loss pushes fake scores up
    fake = torch.zeros(3, 1, 5, 5, requires_grad=True)
    hinge_g_loss(fake).backward()
    assert (fake.grad < 0).all()


def test_perceptual_loss_hook_with_random_net():
    torch.manual_seed(0)

    class Tiny(nn.Module):  # returns two feature maps, like a feature pyramid
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1)

        def forward(self, x):
            f1 = torch.relu(self.a(x))
            return [f1, self.b(f1)]

    net = Tiny()
    loss = PerceptualLoss(net, input_transform=lambda x: x.expand(-1, 3, -1, -1))
    assert loss.enabled and not any(p.requires_grad for p in net.parameters())
    loss.train()
    assert not net.training
    x = blobs(2)
    y = blobs(2, seed=1).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    val = loss(y, x)
    assert val.item() > 0
    val.backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    # a single-tensor network works as well
    assert PerceptualLoss(nn.Conv2d(1, 4, 3))(y, x).item() > 0
    # disabled by default: zero, no network
    off = PerceptualLoss()
    assert not off.enabled and off(y, x).item() == 0.0


def test_state_dict_round_trip():
    cfg = VQConfig(**SMALL)
    a = VQTokenizer(cfg).eval()
    b = VQTokenizer(VQConfig.from_dict(dataclasses.asdict(a.config) | {"channels": list(SMALL["channels"])})).eval()
    b.load_state_dict(a.state_dict())
    x = blobs(2)
    assert torch.equal(a.encode(x), b.encode(x))
