"""EMA of the DP iterates: post-processing (a function of the released iterates alone), what a site sends."""

from __future__ import annotations

import math

import pytest
import torch

from fetalseg.training import train_epoch
from privacy.dpsgd import DPSGDConfig
from privacy.ema import decay_at
from tests.privacy.small_dp import NoisyViews, one_step_engine


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, math.nan, True, "0.9"])
def test_ema_decay_outside_zero_one_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        DPSGDConfig(noise_multiplier=1.0, ema_decay=decay)


def _trained(net):
    return [p.detach().clone() for p in net.parameters() if p.requires_grad]


def _run(tiny_bundle, steps: int, decay: float = 0.5):
    """Full-batch DP steps with an EMA; returns the net, the DP iterates after each step and the weights each
    training forward saw (both recorded by hooks registered before the engine's own)."""
    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    iterates, seen = [], []
    net.register_forward_pre_hook(
        lambda m, a: seen.append(_trained(net)) if m.training and torch.is_grad_enabled() else None
    )
    start = _trained(net)
    engine, model, opt, loader = one_step_engine(
        net,
        NoisyViews(2),
        lr=0.05,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        ema_decay=decay,
        after_step=lambda: iterates.append(_trained(net)),
    )
    loss = engine.wrap_loss(tiny_bundle.loss())
    for _ in range(steps):
        train_epoch(model, loader, opt, loss)
    return net, engine, start, iterates, seen


def test_ema_is_a_function_of_the_dp_iterates_alone(tiny_bundle):
    net, _, start, iterates, _ = _run(tiny_bundle, steps=3)
    assert len(iterates) == 3
    ema = [s.clone() for s in start]
    for t, it in enumerate(iterates):
        d = decay_at(0.5, t)
        ema = [d * a + (1 - d) * w for a, w in zip(ema, it, strict=True)]
    for p, e in zip(_trained(net), ema, strict=True):
        torch.testing.assert_close(p, e, rtol=0, atol=1e-12)
    assert any(not torch.equal(p, w) for p, w in zip(_trained(net), iterates[-1], strict=True))  # not the iterate


def test_gradients_are_taken_at_the_dp_iterate_not_at_the_ema(tiny_bundle):
    _, _, start, iterates, seen = _run(tiny_bundle, steps=3)
    for before, it in zip(seen[1:], iterates[:-1], strict=True):
        for a, b in zip(before, it, strict=True):
            assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(seen[0], start, strict=True))


def test_what_a_site_sends_is_the_ema_and_a_new_round_restarts_it(tiny_bundle):
    net, engine, _, iterates, _ = _run(tiny_bundle, steps=2)
    sent = engine.unwrapped_state_dict()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any(not torch.equal(sent[n], w) for n, w in zip(names, iterates[-1], strict=True))
    for n, p in zip(names, _trained(net), strict=True):
        assert torch.equal(sent[n], p)
    global_state = {k: v + 0.01 for k, v in sent.items()}  # next round: the server's model
    net.load_state_dict(global_state)
    assert engine.ema.updates == 0
    engine.ema.use_iterate()  # a training forward would do this: the iterate IS the received model
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), global_state[n])


def test_decay_warms_up_then_stays():
    assert decay_at(0.99, 0) == pytest.approx(0.1)
    assert decay_at(0.99, 10) == pytest.approx(11 / 20)
    assert decay_at(0.99, 10_000) == 0.99
