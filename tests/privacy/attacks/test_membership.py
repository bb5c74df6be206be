"""Membership inference machinery: a model that memorises is caught; whole-case losses and target training run."""

from __future__ import annotations

import math

import pytest
import torch
from monai.losses import DiceCELoss

from privacy.attacks.membership import case_losses, loss_threshold_attack, per_sample_losses
from privacy.attacks.targets import train_target
from privacy.dpsgd import DPSGDConfig

S = 8


def memoriser() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(S**3, 64), torch.nn.LeakyReLU(), torch.nn.Linear(64, 3 * S**3),
        torch.nn.Unflatten(1, (3, S, S, S)),
    )  # fmt: skip


def test_loss_threshold_attack_catches_a_memorising_model():
    """Random images and labels: the only way to fit them is to memorise, so members get much lower losses."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 1, S, S, S, generator=g)
    labels = torch.randint(0, 3, (8, 1, S, S, S), generator=g)
    members, others = slice(0, 4), slice(4, 8)
    torch.manual_seed(0)
    model = memoriser()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        loss_fn(model(images[members]), labels[members]).backward()
        optimizer.step()
    result = loss_threshold_attack(
        per_sample_losses(model, images[members], labels[members], loss_fn),
        per_sample_losses(model, images[others], labels[others], loss_fn),
    )
    assert result.auc >= 0.9
    assert result.advantage >= 0.5
    assert result.loss_gap > 0
    assert model.training  # per_sample_losses restores the mode


def test_chance_when_members_and_nonmembers_look_alike():
    result = loss_threshold_attack([0.5, 0.7, 0.6, 0.8], [0.6, 0.5, 0.8, 0.7])
    assert result.auc == pytest.approx(0.5)


def test_per_sample_losses_rejects_mismatched_batches():
    with pytest.raises(ValueError):
        per_sample_losses(memoriser(), torch.rand(2, 1, S, S, S), torch.zeros(3, 1, S, S, S), DiceCELoss())


def test_targets_train_with_and_without_dp_and_cases_are_scored(tiny_bundle, site_cases):
    members = site_cases[:2]  # batch 2: one step per epoch
    plain = train_target(tiny_bundle, members, epochs=1, batch_size=2)
    assert plain.privacy is None and plain.epsilon is None and math.isfinite(plain.final_loss)
    dp = train_target(
        tiny_bundle, members, epochs=1, batch_size=2, dp=DPSGDConfig(noise_multiplier=1.0, delta=1e-2, seed=0)
    )
    assert dp.privacy["steps"] == 1 and dp.privacy["sample_rate"] == 1.0 and dp.epsilon > 0
    losses = case_losses(plain.model, site_cases[:2], bundle=tiny_bundle)
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
