"""ε and σ computations, cross-checked against Google's dp-accounting (an independent implementation)."""

from __future__ import annotations

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.accounting import epsilon, epsilon_for_history, noise_multiplier_for_epsilon

# Stated tolerance of the cross-check: relative difference of ε. Both libraries give valid upper bounds by
# different numerics (RDP: different orders grids and conversions; PRV vs PLD: different discretisations);
# measured differences are below 0.5 %.
CROSS_CHECK_RTOL = 0.02

MECHANISMS = [
    # (noise multiplier, sample rate, steps, delta)
    (1.0, 0.05, 1000, 1e-5),
    (1.5, 0.05, 1000, 1e-5),
    (1.0, 1 / 3, 40, 1e-3),  # a small site: N = 6, batch 2
    (2.0, 0.01, 5000, 1e-6),
    (5.0, 1.0, 20, 1e-5),  # no subsampling: client-level DP over 20 rounds
]


def google_epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    acc.compose(event)
    return float(acc.get_epsilon(delta))


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), MECHANISMS)
def test_rdp_agrees_with_dp_accounting(sigma, q, steps, delta):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp")
    theirs = google_epsilon(sigma, q, steps, delta, "rdp")
    assert ours == pytest.approx(theirs, rel=CROSS_CHECK_RTOL)


# dp-accounting's RDP drops fractional orders whose series does not converge (σ < 1 with q >= 1/4, it logs a
# warning) and then reports a larger ε than Opacus's; PRV and PLD are compared there too.
HARD_CASES = [(0.9, 1 / 3, 120, 1e-3), (0.8, 0.25, 60, 1e-5)]


@pytest.mark.parametrize(("sigma", "q", "steps", "delta"), MECHANISMS + HARD_CASES)
def test_prv_agrees_with_dp_accounting_pld(sigma, q, steps, delta):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="prv")
    theirs = google_epsilon(sigma, q, steps, delta, "pld")
    assert ours == pytest.approx(theirs, rel=CROSS_CHECK_RTOL)


def test_prv_is_tighter_than_rdp():
    for sigma, q, steps, delta in MECHANISMS:
        e_rdp = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="rdp")
        e_prv = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant="prv")
        assert e_prv < e_rdp


def test_values_measured_in_environment_notes():
    # docs: σ=1.0 -> 12.0 (RDP) / 11.0 (PRV); σ=1.5 -> 6.0 / 5.6 at δ=1e-5, q=0.05, 1000 steps
    kw = {"sample_rate": 0.05, "steps": 1000, "delta": 1e-5}
    assert epsilon(noise_multiplier=1.0, accountant="rdp", **kw) == pytest.approx(12.0, abs=0.1)
    assert epsilon(noise_multiplier=1.0, accountant="prv", **kw) == pytest.approx(11.0, abs=0.1)
    assert epsilon(noise_multiplier=1.5, accountant="rdp", **kw) == pytest.approx(6.0, abs=0.1)
    assert epsilon(noise_multiplier=1.5, accountant="prv", **kw) == pytest.approx(5.6, abs=0.1)


def test_heterogeneous_history_composes():
    a = (1.0, 0.1, 100)
    b = (2.0, 0.1, 100)
    both = epsilon_for_history([a, b], delta=1e-5)
    assert both > epsilon_for_history([a], delta=1e-5) > epsilon_for_history([b], delta=1e-5)
    assert epsilon_for_history([(1.0, 0.1, 100), (1.0, 0.1, 100)], delta=1e-5) == pytest.approx(
        epsilon_for_history([(1.0, 0.1, 200)], delta=1e-5)
    )


def test_zero_steps_is_zero_epsilon():
    assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=1e-5) == 0.0
    assert epsilon_for_history([], delta=1e-5) == 0.0


@pytest.mark.parametrize(
    ("target", "q", "steps", "accountant"),
    [(8.0, 1 / 3, 40, "rdp"), (2.0, 0.05, 1000, "prv"), (1.0, 1.0, 10, "rdp"), (1.0, 1.0, 10, "prv")],
)
def test_noise_for_target_reaches_target_tightly(target, q, steps, accountant):
    delta = 1e-5
    sigma = noise_multiplier_for_epsilon(
        target_epsilon=target, sample_rate=q, steps=steps, delta=delta, accountant=accountant
    )
    eps = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    assert eps <= target
    assert eps >= target * 0.98  # not wastefully noisy
    less_noise = epsilon(noise_multiplier=sigma * 0.97, sample_rate=q, steps=steps, delta=delta, accountant=accountant)
    assert less_noise > eps


@settings(max_examples=8, deadline=None)
@given(
    sigma=st.floats(0.5, 5.0),
    q=st.floats(0.001, 0.5),
    steps=st.integers(1, 2000),
)
def test_epsilon_grows_with_steps_and_shrinks_with_noise(sigma, q, steps):
    base = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    assert math.isfinite(base) and base > 0
    assert epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps * 2, delta=1e-5) >= base
    assert epsilon(noise_multiplier=sigma * 1.5, sample_rate=q, steps=steps, delta=1e-5) <= base


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -1.0},
        {"noise_multiplier": float("nan")},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"steps": -1},
        {"steps": 2.5},
        {"delta": 0.0},
        {"delta": 1.0},
        {"delta": -1e-5},
        {"accountant": "gdp"},
    ],
)
def test_bad_parameters_raise(kwargs):
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5, "accountant": "rdp"} | kwargs
    with pytest.raises(ValueError):
        epsilon(**args)


@pytest.mark.parametrize(
    "kwargs",
    [{"target_epsilon": 0.0}, {"target_epsilon": -2.0}, {"target_epsilon": math.inf}, {"steps": 0}, {"delta": 2.0}],
)
def test_bad_target_parameters_raise(kwargs):
    args = {"target_epsilon": 1.0, "sample_rate": 0.1, "steps": 10, "delta": 1e-5} | kwargs
    with pytest.raises(ValueError):
        noise_multiplier_for_epsilon(**args)


def test_unreachable_target_is_refused_with_advice():
    with pytest.raises(ValueError, match="raise the target"):
        noise_multiplier_for_epsilon(target_epsilon=1e-6, sample_rate=1.0, steps=10_000, delta=1e-5)


def test_new_plans_default_to_prv():
    from privacy.accounting import DEFAULT_ACCOUNTANT, DEFAULT_DELTA

    assert DEFAULT_ACCOUNTANT == "prv" and DEFAULT_DELTA == 1e-5
    kw = {"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 1000, "delta": 1e-5}
    assert epsilon(**kw) == epsilon(**kw, accountant="prv")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_search_is_opacus_get_noise_multiplier(accountant):
    from opacus.accountants.utils import get_noise_multiplier

    kw = {"sample_rate": 1.0, "steps": 100}
    ours = noise_multiplier_for_epsilon(target_epsilon=8.0, delta=1e-5, accountant=accountant, **kw)
    theirs = get_noise_multiplier(
        target_epsilon=8.0, target_delta=1e-5, accountant=accountant, epsilon_tolerance=0.08, **kw
    )
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_full_batch_prv_is_tighter_than_rdp():
    """q = 1 (full-batch DP-GD): the two accountants' σ for ε = 8 over 100 steps."""
    kw = {"target_epsilon": 8.0, "sample_rate": 1.0, "steps": 100, "delta": 1e-5}
    assert noise_multiplier_for_epsilon(**kw, accountant="prv") < noise_multiplier_for_epsilon(**kw, accountant="rdp")


def test_prv_out_of_its_domain_reports_rdps_valid_bound_not_inf():
    history = [(0.5, 0.5, 910)]  # ε in the hundreds: beyond PRV's discretised domain (it returns inf)
    prv = epsilon_for_history(history, delta=1e-5, accountant="prv")
    assert prv == epsilon_for_history(history, delta=1e-5, accountant="rdp") and math.isfinite(prv)
