"""Gradient inversion machinery: percentile sharing does not stop it, noise does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss

from privacy.attacks.inversion import inversion_attack, invert_gradient, one_step_gradient
from privacy.filters import ClientDPConfig, clip_and_noise, decode_sparse, encode_sparse

S = 8


@pytest.fixture(scope="module")
def target():
    """A model with a dense first layer (the textbook leaky case) and one labelled 8³ patch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(S**3, 32), torch.nn.LeakyReLU(), torch.nn.Linear(32, 3 * S**3),
        torch.nn.Unflatten(1, (3, S, S, S)),
    )  # fmt: skip
    grid = np.stack(np.meshgrid(*[np.arange(S)] * 3, indexing="ij"))
    r = np.sqrt(((grid - 3.5) ** 2).sum(0))
    label = np.zeros((S, S, S), np.int64)
    label[r < 3.5] = 1
    label[r < 2] = 2
    image = (0.2 + 0.3 * label + 0.05 * np.random.default_rng(0).normal(size=label.shape)).clip(0, 1)
    x = torch.from_numpy(image.astype(np.float32))[None, None]
    y = torch.from_numpy(label)[None, None]
    return model, x, y, DiceCELoss(to_onehot_y=True, softmax=True, batch=False)


def test_percentile_sharing_does_not_prevent_reconstruction(target):
    model, x, y, loss_fn = target
    result = inversion_attack(
        model, x, y, loss_fn, update_filter=lambda d: decode_sparse(encode_sparse(d, percentile=90)[0]),
        iterations=150, lr=0.1, tv_weight=0.0,
    )  # fmt: skip
    assert result.ssim > 0.9  # 10 % of the coordinates give the patch away
    assert result.gradient_similarity > 0.99


def test_noise_prevents_reconstruction(target):
    model, x, y, loss_fn = target
    rng = np.random.default_rng(0)
    config = ClientDPConfig(clip_norm=0.1, noise_multiplier=1.0)
    noised = inversion_attack(
        model, x, y, loss_fn,
        update_filter=lambda d: clip_and_noise(d, config=config, rng=rng)[0],
        iterations=150, lr=0.1, tv_weight=0.0,
    )  # fmt: skip
    assert noised.ssim < 0.3
    assert noised.gradient_similarity < 0.5


def test_inputs_are_checked(target):
    model, x, y, loss_fn = target
    grad = one_step_gradient(model, x, y, loss_fn)
    with pytest.raises(ValueError, match="lacks"):
        invert_gradient(model, {}, y, loss_fn, shape=tuple(x.shape))
    with pytest.raises(ValueError, match="zero"):
        invert_gradient(model, {k: np.zeros_like(v) for k, v in grad.items()}, y, loss_fn, shape=tuple(x.shape))
    with pytest.raises(ValueError, match="one patch"):
        inversion_attack(model, x.repeat(2, 1, 1, 1, 1), y.repeat(2, 1, 1, 1, 1), loss_fn)
