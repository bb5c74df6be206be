"""Augmentation multiplicity: K views of one case averaged before its clipping; one case stays one privacy unit."""

from __future__ import annotations

import pytest
import torch

from fetalseg.training import train_epoch
from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine
from privacy.multiplicity import MultiViewDataset
from tests.privacy.small_dp import NoisyViews, flat, one_step_engine


@pytest.mark.parametrize("k", [0, -1, 1.5, True, "4"])
def test_multiplicity_must_be_an_integer_of_at_least_one(k):
    with pytest.raises(ValueError, match="augmentation_multiplicity"):
        DPSGDConfig(noise_multiplier=1.0, augmentation_multiplicity=k)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_multiplicity_needs_a_mode_that_averages_views(mode):
    with pytest.raises(ValueError, match="grad_sample_mode"):
        DPSGDConfig(noise_multiplier=1.0, augmentation_multiplicity=4, grad_sample_mode=mode)


def test_views_are_independent_draws_of_the_train_transforms(site_dataset):
    sample = MultiViewDataset(site_dataset, 3)[0]
    assert sample["image"].shape == (3, 1, 32, 32, 32) and sample["label"].shape == (3, 1, 32, 32, 32)
    assert not torch.equal(sample["image"][0], sample["image"][1])  # random crops differ


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_one_case_with_k_views_contributes_at_most_c(tiny_bundle, mode):
    """The bound that makes ε independent of K: one case (N = 1, full batch, σ ≈ 0, SGD lr 1) moves the weights by
    its clipped view-average, norm C, not K·C; and that update is -clip(mean of the K views' gradients)."""
    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    start = [p.detach().clone() for p in net.parameters()]
    data = NoisyViews(1)
    k, c = 4, 1e-3
    engine, model, opt, loader = one_step_engine(net, data, augmentation_multiplicity=k, grad_sample_mode=mode)
    train_epoch(model, loader, opt, engine.wrap_loss(tiny_bundle.loss()))
    update = flat(p.detach() - s for p, s in zip(net.parameters(), start, strict=True))
    assert torch.linalg.vector_norm(update) <= c * (1 + 1e-6)
    # the same K views, averaged by hand, then clipped
    ref = tiny_bundle.network().double()
    with torch.no_grad():
        for p, s in zip(ref.parameters(), start, strict=True):
            p.copy_(s)
    grads = []
    for call in range(k):
        v = data.view(0, call)
        ref.zero_grad(set_to_none=True)
        tiny_bundle.loss()(ref(v["image"][None]), v["label"][None]).backward()
        grads.append(flat(p.grad for p in ref.parameters()))
    mean = torch.stack(grads).mean(0)
    assert torch.linalg.vector_norm(mean) > 10 * c  # it was clipped: the bound is not vacuous
    expected = -mean * (c / (torch.linalg.vector_norm(mean) + 1e-6))
    assert torch.linalg.vector_norm(update - expected) <= 1e-6 * torch.linalg.vector_norm(expected)


def test_epsilon_and_noise_do_not_depend_on_multiplicity():
    plans = []
    for k in (1, 4, 16):
        cfg = DPSGDConfig(
            target_epsilon=8.0, planned_rounds=5, local_epochs=4, full_batch=True, augmentation_multiplicity=k
        )
        engine = SitePrivacyEngine(config=cfg, dataset_size=40, batch_size=None)
        plans.append((engine.noise_multiplier, engine.sample_rate, engine.planned_steps, engine.planned_epsilon))
    assert plans[0] == plans[1] == plans[2]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_multiplicity_trains_on_the_bundle_pipeline(tiny_bundle, site_dataset, make_loader, mode):
    cfg = DPSGDConfig(
        noise_multiplier=1.0, delta=1e-3, full_batch=True, augmentation_multiplicity=2, grad_sample_mode=mode, seed=0
    )
    engine = SitePrivacyEngine(config=cfg, dataset_size=len(site_dataset), batch_size=None)
    net = tiny_bundle.network()
    model, opt, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    stats = train_epoch(model, loader, opt, engine.wrap_loss(tiny_bundle.loss()))
    assert stats.steps == 1 and stats.samples == len(site_dataset)  # one step, every case (each with 2 views)
    assert engine.steps == 1
