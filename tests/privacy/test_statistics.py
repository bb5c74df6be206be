"""DP dataset statistics (privacy/statistics.py): request validation, sensitivities, the noise actually added and its
size over seeds, accounting, and the ledger (reserved before anything, charged once per stage, refused when over)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from privacy.accounting import epsilon_for_history
from privacy.ledger import PrivacyBudgetExceeded, SiteLedger
from privacy.statistics import (
    FeatureSpec,
    PatientRecords,
    SiteStatisticsRelease,
    StatisticsRequest,
    StatisticsRequestError,
    patient_histogram,
)

DELTA = 1e-5
FEATURES = {
    "gestational_age_weeks": {"range": [18, 40], "bins": 11, "optional": True},
    "voxel_size_mm": {"range": [0, 4], "bins": 8},
    "intensity": {"range": [0, 1000], "bins": 10, "kind": "distribution"},
    "orientation": {"range": [0, 4], "bins": 4, "kind": "category"},
}


def _request(**privacy) -> StatisticsRequest:
    return StatisticsRequest.from_dict(
        {
            "statistics": ["count", "mean", "stddev", "histogram"],
            "features": FEATURES,
            "privacy": {"delta": DELTA, **(privacy or {"noise_multiplier": 2.0})},
        }
    )


def _records(n: int = 20, seed: int = 0) -> PatientRecords:
    rng = np.random.default_rng(seed)
    ga = rng.uniform(20, 36, n)
    ga[0] = np.nan  # one patient without a recorded GA
    spec = FeatureSpec("intensity", 0, 1000, 10, kind="distribution")
    dists = np.stack([patient_histogram(rng.normal(500, 100, 300), spec) for _ in range(n)])
    return PatientRecords(
        n_patients=n,
        values={
            "gestational_age_weeks": ga,
            "voxel_size_mm": rng.uniform(0.5, 1.0, n),
            "intensity": rng.normal(500, 50, n),
            "orientation": rng.integers(0, 4, n).astype(float),
        },
        distributions={"intensity": dists},
    )


def test_plan_is_data_independent_and_accounted():
    req = _request()
    # stage 1: the shared case count, GA's own count (optional), three centred sums (orientation is a category)
    assert req.releases(1) == [
        ("count", "*"),
        ("count", "gestational_age_weeks"),
        ("sum", "gestational_age_weeks"),
        ("sum", "voxel_size_mm"),
        ("sum", "intensity"),
    ]
    assert [r[0] for r in req.releases(2)] == ["histogram"] * 4 + ["var"] * 3
    assert req.planned_releases() == 12
    expected = epsilon_for_history([(2.0, 1.0, 12)], delta=DELTA, accountant="prv")
    assert req.planned_epsilon == pytest.approx(expected, rel=1e-12)
    assert req.epsilon_through(1) < req.planned_epsilon
    # sensitivities: add/remove one patient, values clipped to the public range
    assert req.sensitivity("count", "*") == 1.0
    assert req.sensitivity("sum", "gestational_age_weeks") == 11.0  # (40 - 18) / 2, centred
    assert req.sensitivity("var", "voxel_size_mm") == 16.0  # (4 - 0)²
    assert req.sensitivity("histogram", "intensity") == 1.0


def test_target_epsilon_solves_sigma():
    req = _request(epsilon=2.0)
    assert req.planned_epsilon <= 2.0 + 1e-9
    assert req.planned_epsilon > 1.9  # the search keeps within 1 % of the target... and some slack


@pytest.mark.parametrize(
    "body, message",
    [
        ({"statistics": ["min"]}, "never released"),
        ({"statistics": ["quantile"]}, "refused"),
        ({"statistics": ["median"]}, "unknown statistic"),
        ({"features": {"x": {"bins": 3}}}, "'range'"),
        ({"features": {"x": {"range": [1, 1]}}}, "high > low"),
        ({"features": {"x": {"range": [0, 1], "bins": 0}}}, "bins"),
        ({"privacy": {"delta": DELTA}}, "exactly one"),
        ({"privacy": {"epsilon": 1.0, "noise_multiplier": 1.0}}, "exactly one"),
        ({"privacy": {"epsilon": -1.0}}, "epsilon"),
        ({"privacy": {"epsilon": float("nan")}}, "epsilon"),
        ({"privacy": {"noise_multiplier": 1.0, "delta": 0}}, "delta"),
        ({"privacy": None}, "never leave a site un-noised"),
    ],
)
def test_bad_requests_are_refused(body, message):
    base = {"statistics": ["count"], "features": {"x": {"range": [0, 1]}}, "privacy": {"noise_multiplier": 1.0}}
    with pytest.raises((StatisticsRequestError, ValueError), match=message):
        StatisticsRequest.from_dict({**base, **body})


def test_missing_value_in_a_required_feature_is_refused():
    rec = _records()
    rec.values["voxel_size_mm"][3] = np.nan
    with pytest.raises(StatisticsRequestError, match="not optional"):
        SiteStatisticsRelease(_request(), rec)


def test_each_release_is_noised_once_and_cached():
    req, rec = _request(), _records()
    rel = SiteStatisticsRelease(req, rec, rng=np.random.default_rng(1))
    c1 = rel.count("voxel_size_mm")
    assert rel.count("intensity") == c1  # the shared case count: one release for every required feature
    assert c1 != 20.0  # noise was added
    assert rel.sum("voxel_size_mm") == rel.sum("voxel_size_mm")
    h = rel.histogram("intensity")
    assert len(h) == 10 and min(h) >= 0
    assert rel.squared_deviations("voxel_size_mm", 0.75) >= 0
    assert rel.sum("orientation") == pytest.approx(2.0 * c1)  # a category: range midpoint × count, no release
    assert ("sum", "orientation") not in rel.released
    assert len(rel.released) == len(set(rel.released))


def test_noised_values_are_within_the_expected_error_over_seeds():
    """Over 300 fixed seeds the standardised errors (noised − true) / (σ·Δ) have mean ≈ 0 and std ≈ 1; the bounds
    are 6 standard errors wide, and the seeds are fixed (numpy's PCG64 is the same on every platform)."""
    req, rec = _request(), _records()
    ga = rec.values["gestational_age_weeks"]
    true = {
        "count": 20.0,
        "ga_count": float(np.sum(~np.isnan(ga))),
        "ga_sum": float(np.nansum(ga)),
        "hist_orientation": np.histogram(rec.values["orientation"], bins=4, range=(0, 4))[0].astype(float),
    }
    z: dict[str, list[float]] = {"count": [], "ga_count": [], "ga_centred_sum": [], "hist": []}
    runs = 300
    for seed in range(runs):
        rel = SiteStatisticsRelease(req, rec, rng=np.random.default_rng(seed))
        z["count"].append((rel.count("voxel_size_mm") - true["count"]) / req.noise_std("count", "*"))
        n_ga = rel.count("gestational_age_weeks")
        z["ga_count"].append((n_ga - true["ga_count"]) / req.noise_std("count", "gestational_age_weeks"))
        centred = rel.sum("gestational_age_weeks") - 29.0 * n_ga
        z["ga_centred_sum"].append(
            (centred - (true["ga_sum"] - 29.0 * true["ga_count"])) / req.noise_std("sum", "gestational_age_weeks")
        )
        rel.histogram("orientation")
        raw = rel._cache[("histogram", "orientation")]
        z["hist"].extend(((raw - true["hist_orientation"]) / req.noise_std("histogram", "orientation")).tolist())
    for name, values in z.items():
        arr = np.asarray(values)
        if name == "count":  # floored at 0 only far below 20 (σ = 2): never here
            assert arr.min() > -20 / 2.0
        se = 1.0 / math.sqrt(arr.size)
        assert abs(arr.mean()) < 6 * se, (name, arr.mean())
        assert abs(arr.std() - 1.0) < 6 * se * math.sqrt(0.5) + 0.02, (name, arr.std())


def test_mean_error_shrinks_with_patients():
    """The GA mean's error is about σ·11/n: 200 patients give a mean within 4σ·11/200 of the truth for every seed."""
    req = _request()
    rec = _records(n=200, seed=5)
    true = float(np.nanmean(rec.values["gestational_age_weeks"]))
    bound = 4 * req.sigma * 11 / 199 + 4 * req.sigma * 11 / 199  # centred-sum noise + count noise (both ≲ 4 std)
    for seed in range(50):
        rel = SiteStatisticsRelease(req, rec, rng=np.random.default_rng(seed))
        assert abs(rel.mean("gestational_age_weeks") - true) < bound


def test_patient_histogram_weighs_each_patient_once():
    spec = FeatureSpec("intensity", 0, 100, 4, kind="distribution")
    h = patient_histogram(np.array([-5.0, 10, 60, 60, 500, np.nan]), spec)
    assert h.sum() == pytest.approx(1.0)
    assert h.tolist() == pytest.approx([0.4, 0.0, 0.4, 0.2])  # clipped into the end bins, NaN dropped
    with pytest.raises(StatisticsRequestError, match="no finite voxel"):
        patient_histogram(np.array([np.nan]), spec)


def _ledger(tmp_path, budget: float) -> SiteLedger:
    return SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=budget, delta_budget=1e-4, site="site-1")


def test_ledger_reserved_then_charged_once_per_stage(tmp_path):
    req = _request()
    ledger = _ledger(tmp_path, 100.0)
    rel = SiteStatisticsRelease(req, _records(), rng=np.random.default_rng(0))
    rel.reserve(ledger, dataset_id="site-1/data", job_id="stats-1")
    assert ledger.reservation(dataset_id="site-1/data", job_id="stats-1").epsilon == pytest.approx(req.planned_epsilon)
    for _ in range(3):  # repeated calls of a stage charge nothing more
        rel.count("intensity")
        rel.mean("gestational_age_weeks")
        rel.sum("voxel_size_mm")
    rel.histogram("intensity")
    rel.squared_deviations("intensity", 500.0)
    rel.histogram("intensity")
    rel.finish()
    ledger.reload()
    spends = [r for r in ledger.records if r["type"] == "spend"]
    assert [s["round"] for s in spends] == [0, 1]
    assert spends[0]["epsilon"] == pytest.approx(req.epsilon_through(1))
    assert spends[1]["epsilon"] == pytest.approx(req.planned_epsilon)
    assert ledger.spent("site-1/data").epsilon == pytest.approx(req.planned_epsilon)  # counted once, at the total
    assert ledger.reservations() == []
    assert spends[1]["kind"] == "statistics" and spends[1]["releases"] == 12


def test_over_budget_is_refused_and_nothing_charged(tmp_path):
    req = _request()
    ledger = _ledger(tmp_path, budget=req.planned_epsilon * 0.5)
    before = ledger.path.read_text()
    rel = SiteStatisticsRelease(req, _records())
    with pytest.raises(PrivacyBudgetExceeded, match="privacy budget exceeded"):
        rel.reserve(ledger, dataset_id="site-1/data", job_id="stats-1")
    assert ledger.path.read_text() == before
    assert rel.released == [] and rel.epsilon == 0.0


def test_statistics_and_training_share_one_budget(tmp_path):
    """A training job's spend counts against the statistics request (and the other way round)."""
    req = _request()
    ledger = _ledger(tmp_path, budget=req.planned_epsilon + 1.0)
    ledger.record(job_id="train-1", dataset_id="site-1/data", epsilon=2.0, delta=DELTA, round=0)
    with pytest.raises(PrivacyBudgetExceeded):
        SiteStatisticsRelease(req, _records()).reserve(ledger, dataset_id="site-1/data", job_id="stats-1")
