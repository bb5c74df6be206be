"""Each encrypted layer against torch's on a tiny input (tolerances from CrypTen's 16-bit fixed point), and the
bundle's own network walked on encrypted tensors (public and encrypted weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fetalseg.bundle import Bundle
from privacy.encrypted_inference import layers

FIXED = 2.0**-16  # 16 fractional bits: CrypTen's default (we use 20, so these bounds are loose)


@pytest.fixture
def x():
    return torch.randn(1, 3, 6, 7, 5, generator=torch.Generator().manual_seed(0))


def _maybe_encrypt(cr, t, encrypted):
    return cr.cryptensor(t) if encrypted else t


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize(("kernel", "stride", "padding"), [(3, 2, 1), (3, 1, 1), (1, 1, 0)])
def test_conv3d(one_party, x, encrypted, kernel, stride, padding):
    cr = one_party
    conv = nn.Conv3d(3, 4, kernel, stride=stride, padding=padding)
    w, b = (_maybe_encrypt(cr, p.detach(), encrypted) for p in (conv.weight, conv.bias))
    got = layers.conv3d(cr.cryptensor(x), w, b, stride=(stride,) * 3, padding=(padding,) * 3).get_plain_text()
    want = conv(x).detach()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 200 * FIXED  # 27·3 products, each rounded once


@pytest.mark.parametrize("encrypted", [False, True])
def test_conv_transpose3d(one_party, x, encrypted):
    cr = one_party
    conv = nn.ConvTranspose3d(3, 4, 3, stride=2, padding=1, output_padding=1)
    w, b = (_maybe_encrypt(cr, p.detach(), encrypted) for p in (conv.weight, conv.bias))
    got = layers.conv_transpose3d(
        cr.cryptensor(x), w, b, stride=(2, 2, 2), padding=(1, 1, 1), output_padding=(1, 1, 1)
    ).get_plain_text()
    want = conv(x).detach()
    assert got.shape == want.shape
    assert (got - want).abs().max() < 200 * FIXED


@pytest.mark.parametrize("calibrated", [True, False])
def test_instance_norm_needs_the_calibrated_scale(one_party, x, calibrated):
    cr = one_party
    norm = nn.InstanceNorm3d(3, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
        norm.bias.uniform_(-1.0, 1.0)
    xs = x * torch.tensor([0.1, 3.0, 30.0]).reshape(1, 3, 1, 1, 1)  # variances 0.01 .. 900 (std < ~0.05: fixed point)
    net = nn.Sequential(norm)
    scale = layers.calibrate_instance_norm(net, [xs])["0"] if calibrated else torch.ones(1, 3, 1, 1, 1)
    got = layers.instance_norm(
        cr.cryptensor(xs), norm.weight.detach(), norm.bias.detach(), scale=scale, root_scale=scale.sqrt(), eps=1e-5
    ).get_plain_text()
    err = (got - norm(xs).detach()).abs().max()
    if calibrated:
        assert err < 0.02
    else:  # Newton from CrypTen's start is off for variances far from ~1: the reason for the calibration
        assert err > 0.1


def test_calibration_scales_are_exact_powers_of_four():
    signs = (torch.arange(64) % 2 * 2 - 1).float().reshape(1, 1, 4, 4, 4)  # variance exactly 1
    xs = signs.repeat(2, 2, 1, 1, 1) * torch.tensor([10.0, 0.1]).reshape(1, 2, 1, 1, 1)
    scale = layers.calibrate_instance_norm(nn.Sequential(nn.InstanceNorm3d(2)), [xs])["0"].flatten()
    assert torch.equal(scale, torch.tensor([4.0**-3, 4.0**3]))  # 1/100 -> 4**-3, 1/0.01 -> 4**3


def test_leaky_relu_and_prelu(one_party, x):
    cr = one_party
    got = layers.leaky_relu(cr.cryptensor(x), 0.01).get_plain_text()
    assert (got - nn.functional.leaky_relu(x, 0.01)).abs().max() < 10 * FIXED
    prelu = nn.PReLU(3, 0.2)
    got = layers.prelu(cr.cryptensor(x), prelu.weight.detach()).get_plain_text()
    assert (got - prelu(x).detach()).abs().max() < 10 * FIXED


def test_unsupported_module_is_named_before_any_traffic():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    with pytest.raises(layers.UnsupportedLayerError, match="BatchNorm3d"):
        layers.check_supported(net)
    with pytest.raises(layers.UnsupportedLayerError, match="dilat"):
        layers.check_supported(nn.Sequential(nn.Conv3d(1, 2, 3, dilation=2)))


@pytest.mark.parametrize("encrypted", [False, True])
def test_bundle_network_walked_on_encrypted_tensors(one_party, encrypted):
    """The tiny bundle's own module tree (not a re-typed copy) on a 16³ patch: labels as torch's."""
    cr = one_party
    torch.manual_seed(0)
    net = Bundle("common", variant="tiny", overrides={"patch_size": [16, 16, 16]}).network().eval()
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        want = net(image)
    scales = layers.calibrate_instance_norm(net, [image, torch.rand(1, 1, 16, 16, 16)])
    params = {k: _maybe_encrypt(cr, v.detach(), encrypted) for k, v in net.named_parameters()}
    norm = {k: (_maybe_encrypt(cr, s, encrypted), _maybe_encrypt(cr, s.sqrt(), encrypted)) for k, s in scales.items()}
    got = layers.EncryptedNetwork(net, params, norm)(cr.cryptensor(image)).get_plain_text()
    assert got.shape == want.shape
    agreement = (got.argmax(1) == want.argmax(1)).float().mean()
    assert agreement >= 0.99, f"{agreement:.4f}"
    assert (got - want).abs().max() < 0.1
