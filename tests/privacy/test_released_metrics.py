"""What a DP site may say besides its weights: bounded means, the Gaussian release, its accounting with DP-SGD's
steps in one history, the gate every metrics dict passes, and the ledger's composed ε."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fetalseg.labels import foreground_labels
from fetalseg.metrics import CaseMetrics
from privacy.accounting import epsilon_for_history
from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine
from privacy.ledger import PrivacyBudgetExceeded, SiteLedger
from privacy.released_metrics import (
    MetricsPolicy,
    SiteMetricsRelease,
    bounded_mean,
    per_case_dice,
    planned_releases,
)

TISSUES = [t.name for t in foreground_labels()]
DELTA = 1e-5


def _scores(rows: list[list[float]]) -> list[CaseMetrics]:
    return [CaseMetrics(f"c{i}", "site-1", dict(zip(TISSUES, row))) for i, row in enumerate(rows)]


def _engine(steps: int = 30, accountant: str = "rdp") -> SitePrivacyEngine:
    """A real site engine (N = 20, batch 2: q = 0.1) whose accountant has taken ``steps`` DP-SGD steps."""
    config = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, planned_steps=100, accountant=accountant)
    engine = SitePrivacyEngine(config=config, dataset_size=20, batch_size=2)
    for _ in range(steps):
        engine._accountant.step(noise_multiplier=engine.noise_multiplier, sample_rate=engine.sample_rate)
    return engine


def _gate(engine=None, *, sigma: float | None = 20.0, seed: int | None = 0, max_releases: int | None = 10):
    accountant = engine.config.accountant if engine is not None else "rdp"
    return SiteMetricsRelease(
        engine=engine,
        policy=MetricsPolicy(noise_multiplier=sigma, seed=seed),
        delta=DELTA if engine is not None else None,
        accountant=accountant,
        max_releases=max_releases,
    )


# -- sensitivity and clipping ---------------------------------------------------------------------------------------
def test_the_l2_sensitivity_of_a_mean_of_bounded_vectors_is_sqrt_k_over_n() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, size=(5, 7))
    mean, sensitivity = bounded_mean(values, low=0.0, high=1.0)
    assert sensitivity == pytest.approx(math.sqrt(7) / 5, rel=1e-12)
    worst = 0.0
    for row in range(5):  # replace one case by the farthest corner of [0, 1]^7
        other = values.copy()
        other[row] = np.where(values[row] < 0.5, 1.0, 0.0)
        worst = max(worst, float(np.linalg.norm(bounded_mean(other, low=0.0, high=1.0)[0] - mean)))
    assert 0 < worst <= sensitivity + 1e-12


def test_a_loss_is_clipped_to_its_bound_before_the_mean() -> None:
    mean, sensitivity = bounded_mean([0.5, 1.0, 40.0], low=0.0, high=2.0)  # one outlier loss of 40
    assert mean[0] == pytest.approx((0.5 + 1.0 + 2.0) / 3, rel=1e-12) and sensitivity == pytest.approx(2.0 / 3)


def test_missing_values_must_be_mapped_before_the_mean() -> None:
    with pytest.raises(ValueError, match="NaN"):
        bounded_mean([[0.5, float("nan")]], low=0.0, high=1.0)


def test_a_tissue_absent_from_prediction_and_truth_counts_as_agreement() -> None:
    row = [0.5, float("nan"), 0.9, 0.1, 0.2, 0.3, 0.4]
    assert per_case_dice(_scores([row]), TISSUES)[0, 1] == 1.0


# -- the Gaussian release -------------------------------------------------------------------------------------------
def test_the_noise_is_gaussian_with_std_sigma_times_the_sensitivity() -> None:
    rows = [[0.2, 0.4, 0.6, 0.8, 0.5, 0.5, 0.5], [0.4, 0.6, 0.8, 1.0, 0.5, 0.7, 0.9]]
    gate = _gate(_engine(), sigma=0.05, seed=7)  # small σ: no value reaches the [0, 1] clip
    out = gate.release({}, scores={"val": _scores(rows)})
    means = np.mean(np.asarray(rows), axis=0)
    expected = means + np.random.default_rng(7).normal(0.0, 0.05 * math.sqrt(7) / 2, size=7)
    got = np.asarray([out[f"val_dice_{t}"] for t in TISSUES])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert out["val_mean_dice"] == pytest.approx(float(expected.mean()), abs=1e-12)


def test_released_dice_stay_in_zero_one() -> None:
    out = _gate(_engine(), sigma=50.0, seed=3).release({}, scores={"val": _scores([[0.5] * 7])})
    assert all(0.0 <= v <= 1.0 for v in out.values())


# -- accounting -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_metric_releases_compose_with_dp_sgd_steps_in_one_history(accountant: str) -> None:
    engine = _engine(accountant=accountant)
    gate = _gate(engine, sigma=20.0)
    sgd_only = gate.epsilon
    assert sgd_only == pytest.approx(engine.epsilon, rel=1e-9)
    for _ in range(3):
        gate.release({}, scores={"val": _scores([[0.5] * 7, [0.7] * 7])})
    assert gate.history == [(20.0, 1.0, 3)]
    composed = gate.epsilon
    assert composed > sgd_only
    assert composed == pytest.approx(
        epsilon_for_history([*engine.history, (20.0, 1.0, 3)], delta=DELTA, accountant=accountant), rel=1e-9
    )
    report = gate.report()
    assert report["epsilon"] == composed and report["epsilon_dp_sgd"] == pytest.approx(sgd_only, rel=1e-9)
    assert report["metrics"]["releases"] == 3 and report["metrics"]["epsilon_share"] == pytest.approx(
        composed - sgd_only, rel=1e-9
    )


def test_the_plan_includes_every_planned_metric_release() -> None:
    engine = _engine(steps=0)
    gate = _gate(engine, sigma=20.0, max_releases=planned_releases(num_rounds=5, cross_site_eval=True))
    expected = epsilon_for_history([(1.0, engine.sample_rate, 100), (20.0, 1.0, 9)], delta=DELTA, accountant="rdp")
    assert gate.planned_epsilon == pytest.approx(expected, rel=1e-9) and gate.planned_epsilon > engine.planned_epsilon


def test_no_release_beyond_the_plan() -> None:
    gate = _gate(_engine(), sigma=20.0, max_releases=1)
    scores = {"val": _scores([[0.5] * 7])}
    assert "val_mean_dice" in gate.release({}, scores=scores)
    eps = gate.epsilon
    assert gate.release({"val_cases": 1.0}, scores=scores) == {"val_cases": 1.0}
    assert gate.releases == 1 and gate.epsilon == eps


def test_a_restarted_site_keeps_counting_the_releases_it_already_made(tmp_path) -> None:
    state = tmp_path / "metrics_site-1_job.json"
    scores = {"val": _scores([[0.5] * 7])}
    first = SiteMetricsRelease(
        engine=_engine(), policy=MetricsPolicy(noise_multiplier=20.0), delta=DELTA, max_releases=3, state_path=state
    )
    first.release({}, scores=scores)
    first.release({}, scores=scores)
    restarted = SiteMetricsRelease(
        engine=_engine(), policy=MetricsPolicy(noise_multiplier=20.0), delta=DELTA, max_releases=3, state_path=state
    )
    assert restarted.releases == 2 and restarted.epsilon == first.epsilon  # the ledger's ε keeps their share
    assert "val_mean_dice" in restarted.release({}, scores=scores)
    assert restarted.release({}, scores=scores) == {}  # the plan's 3 releases are used up across the restart
    with pytest.raises(ValueError, match="not the same job"):
        SiteMetricsRelease(engine=_engine(), policy=MetricsPolicy(noise_multiplier=5.0), delta=DELTA, state_path=state)


# -- the gate ---------------------------------------------------------------------------------------------------------
RAW = {"val_mean_dice": 0.61, "val_dice_white_matter": 0.7, "val_cases": 2.0, "train_loss": 0.4, "train_steps": 3.0}


def test_without_dp_the_metrics_leave_as_they_are() -> None:
    assert _gate(None).release(RAW) == RAW


def test_with_dp_and_no_metrics_noise_only_data_independent_values_leave_and_cost_nothing() -> None:
    engine = _engine()
    gate = _gate(engine, sigma=None)
    out = gate.release({**RAW, "dp_epsilon": 1.0}, scores={"val": _scores([[0.5] * 7, [0.7] * 7])})
    assert out == {"val_cases": 2.0, "train_steps": 3.0, "dp_epsilon": 1.0}
    assert gate.epsilon == pytest.approx(engine.epsilon, rel=1e-12) and gate.report()["metrics"]["epsilon_share"] == 0


def test_with_dp_raw_dice_are_replaced_by_noised_ones_and_the_training_loss_is_withheld() -> None:
    gate = _gate(_engine(), sigma=20.0)
    out = gate.release(RAW, scores={"val": _scores([[0.5] * 7, [0.7] * 7])})
    assert "train_loss" not in out and out["val_mean_dice"] != RAW["val_mean_dice"]
    assert set(out) == {"val_cases", "train_steps", "val_mean_dice"} | {f"val_dice_{t}" for t in TISSUES}
    assert "train_loss" in gate.report()["metrics"]["withheld"]


def test_noised_values_pass_the_gate_again_but_not_once_changed() -> None:
    gate = _gate(_engine(), sigma=20.0)
    out = gate.release({}, scores={"val": _scores([[0.5] * 7])})
    assert gate.release(out) == out and gate.releases == 1
    changed = {**out, "val_mean_dice": out["val_mean_dice"] + 0.01}
    assert "val_mean_dice" not in gate.release(changed)


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        MetricsPolicy.from_dict({"noise_multiplier": 0})
    with pytest.raises(ValueError, match="unknown"):
        MetricsPolicy.from_dict({"noise": 1.0})


# -- the ledger -------------------------------------------------------------------------------------------------------
def test_the_ledger_records_the_composed_epsilon_and_holds_the_composed_plan(tmp_path) -> None:
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=1e6, delta_budget=0.5)
    engine = _engine(steps=0)
    gate = _gate(engine, sigma=20.0, max_releases=4)
    engine.reserve(ledger, dataset_id="site-1/d", job_id="j")
    gate.reserve(ledger, dataset_id="site-1/d", job_id="j")
    assert ledger.reservation(dataset_id="site-1/d", job_id="j").epsilon == pytest.approx(gate.planned_epsilon)
    for _ in range(10):
        engine._accountant.step(noise_multiplier=engine.noise_multiplier, sample_rate=engine.sample_rate)
    gate.release({}, scores={"val": _scores([[0.5] * 7])})
    gate.record(ledger, job_id="j", dataset_id="site-1/d", round=0, scope="test")
    ledger.reload()
    assert ledger.spent("site-1/d").epsilon == pytest.approx(gate.epsilon) and gate.epsilon > engine.epsilon


def test_a_composed_plan_over_budget_is_refused(tmp_path) -> None:
    engine = _engine(steps=0)
    gate = _gate(engine, sigma=0.5, max_releases=20)  # cheap DP-SGD plan, expensive metrics
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=engine.planned_epsilon * 1.01, delta_budget=0.5)
    engine.reserve(ledger, dataset_id="d", job_id="j")
    with pytest.raises(PrivacyBudgetExceeded):
        gate.reserve(ledger, dataset_id="d", job_id="j")
