"""Robust aggregation (issue 19 item 5): the maths in float64 on tiny arrays, the NVFlare aggregator, the job
wiring, and one simulator run in which a poisoning site (sign-flipped update at a norm the UpdateGuard accepts)
is outvoted by the coordinate-wise median while the plain mean of the same updates is dragged away."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FLMetaKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_common.app_constant import AppConstants

from nvflare_jobs.guard import REJECT_CODE, UpdateGuard
from nvflare_jobs.robust_aggregation import (
    MEAN,
    MEDIAN,
    TRIMMED_MEAN,
    RobustAggregator,
    check_settings,
    clip_update,
    combine,
    trim_count,
    update_norm,
)

POISONER = Path(__file__).with_name("poisoning_client.py")


def _f64(*rows) -> list[dict[str, np.ndarray]]:
    return [{"w": np.asarray(r, dtype=np.float64)} for r in rows]


# ------------------------------------------------------------------------------------------------ the maths
def test_coordinate_wise_median_odd_and_even() -> None:
    ups = _f64([1.0, -5.0, 0.0], [2.0, 7.0, 0.5], [100.0, 1.0, -3.0])
    np.testing.assert_array_equal(combine(ups, method=MEDIAN)["w"], [2.0, 1.0, 0.0])
    ups4 = _f64([1.0, 0.0], [2.0, 10.0], [3.0, -4.0], [400.0, 2.0])
    np.testing.assert_array_equal(combine(ups4, method=MEDIAN)["w"], [2.5, 1.0])  # mean of the two middle values


def test_trimmed_mean_drops_k_per_side_per_coordinate() -> None:
    ups = _f64([1.0, 50.0], [2.0, -1.0], [3.0, 0.0], [4.0, 1.0], [-90.0, 2.0])
    # trim 0.2 of 5 -> k = 1: coordinate 0 keeps {1, 2, 3}, coordinate 1 keeps {0, 1, 2}
    np.testing.assert_array_equal(combine(ups, method=TRIMMED_MEAN, trim_fraction=0.2)["w"], [2.0, 1.0])
    # k = 2 of 5 is the median
    np.testing.assert_array_equal(
        combine(ups, method=TRIMMED_MEAN, trim_fraction=0.4)["w"], combine(ups, method=MEDIAN)["w"]
    )
    # k = 0 is the unweighted mean (weights are ignored by the robust methods)
    out = combine(ups, [1.0, 1.0, 1.0, 1.0, 100.0], method=TRIMMED_MEAN, trim_fraction=0.1)["w"]
    np.testing.assert_allclose(out, np.mean([u["w"] for u in ups], axis=0), rtol=0, atol=1e-15)


def test_mean_is_weighted_like_fedavg() -> None:
    ups = _f64([1.0, 0.0], [4.0, 3.0])
    np.testing.assert_allclose(combine(ups, [1.0, 2.0], method=MEAN)["w"], [3.0, 2.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(combine(ups, method=MEAN)["w"], [2.5, 1.5], rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("n", "fraction", "k"), [(3, 1 / 3, 1), (3, 0.3, 0), (10, 0.1, 1), (10, 0.3, 3), (100, 0.29, 29), (5, 0.49, 2)]
)
def test_trim_count(n: int, fraction: float, k: int) -> None:
    assert trim_count(n, fraction) == k


def test_a_trimmed_mean_always_keeps_a_site() -> None:
    for n in range(1, 60):
        for fraction in np.linspace(0.0, 0.4999, 200):
            assert n - 2 * trim_count(n, float(fraction)) >= 1


def test_clipping_scales_to_the_bound_over_all_tensors_and_keeps_dtype() -> None:
    update = {"a": np.array([3.0, 0.0]), "b": np.array([[0.0, 4.0]])}  # global norm 5
    clipped, norm, scale = clip_update(update, 1.0)
    assert norm == 5.0 and scale == pytest.approx(0.2, abs=1e-15)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(clipped["b"], [[0.0, 0.8]], rtol=0, atol=1e-15)
    assert update_norm(clipped) == pytest.approx(1.0, abs=1e-15)
    same, norm, scale = clip_update(update, 5.0)  # at the bound: untouched, same objects
    assert scale == 1.0 and all(same[k] is update[k] for k in update)
    assert clip_update(update, None)[2] == 1.0
    f32, _, _ = clip_update({"w": np.full(4, 10.0, dtype=np.float32)}, 1.0)
    assert f32["w"].dtype == np.float32 and abs(update_norm(f32) - 1.0) < 1e-6


def test_one_poisoner_of_three_drags_the_mean_but_not_the_median_or_trimmed_mean() -> None:
    rng = np.random.default_rng(0)
    honest = [rng.normal(0, 0.01, 50), rng.normal(0, 0.01, 50)]
    attacker = -100.0 * (honest[0] + honest[1])  # sign-flipped, scaled
    ups = _f64(honest[0], honest[1], attacker)
    low, high = np.minimum(*honest), np.maximum(*honest)
    for method, frac in ((MEDIAN, 0.0), (TRIMMED_MEAN, 1 / 3)):
        out = combine(ups, method=method, trim_fraction=frac)["w"]
        assert np.all(out >= low) and np.all(out <= high)
    mean = combine(ups, method=MEAN)["w"]
    honest_mean = (honest[0] + honest[1]) / 2
    assert np.linalg.norm(mean - honest_mean) > 30 * np.linalg.norm(honest_mean)
    # norm bounding alone limits the attacker's pull on the mean to clip / n
    bound = float(np.linalg.norm(honest[0]))
    clipped = [clip_update(u, bound)[0] for u in ups]
    assert np.linalg.norm(combine(clipped, method=MEAN)["w"] - honest_mean) <= bound


def test_keys_are_combined_over_the_sites_that_sent_them_and_shapes_must_agree() -> None:
    ups = [{"a": np.array([1.0]), "b": np.array([5.0])}, {"a": np.array([3.0])}, {"a": np.array([100.0])}]
    out = combine(ups, method=MEDIAN)
    assert out == {"a": np.array([3.0]), "b": np.array([5.0])}
    with pytest.raises(ValueError, match="shapes"):
        combine([{"a": np.zeros(2)}, {"a": np.zeros(3)}], method=MEDIAN)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("avg", 0.0, None), "method"),
        (("trimmed_mean", 0.5, None), "trim_fraction"),
        (("trimmed_mean", -0.1, None), "trim_fraction"),
        (("median", 0.2, None), "only applies to trimmed_mean"),
        (("mean", 0.0, 0.0), "clip_update_norm"),
        (("mean", 0.0, float("inf")), "clip_update_norm"),
        (("mean", 0.0, True), "clip_update_norm"),
    ],
)
def test_bad_settings_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_settings(*args)
    with pytest.raises(ValueError, match=message):
        RobustAggregator(*args)


# ------------------------------------------------------------------------------------------------ the aggregator
def _result(site: str, params: dict, steps: int, metrics: dict | None = None) -> FLModel:
    meta = {"client_name": site, FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps}
    return FLModel(params=params, params_type=ParamsType.DIFF, metrics=metrics, meta=meta, current_round=4)


def _float32_results() -> list[FLModel]:
    rng = np.random.default_rng(1)
    return [
        _result(
            f"site-{i}",
            {"a": rng.normal(0, 1, (3, 4)).astype(np.float32), "b": rng.normal(0, 1, 7).astype(np.float32)},
            steps,
            {"val_mean_dice": dice},
        )
        for i, (steps, dice) in enumerate([(3, 0.5), (7, 0.25), (2, 0.75)], start=1)
    ]


def test_mean_through_the_aggregator_is_bit_identical_to_nvflares_fedavg_mean() -> None:
    results = _float32_results()
    helper = WeightedAggregationHelper()  # what FedAvg's built-in in-time aggregation does with each result
    for r in results:
        helper.add(data=r.params, weight=float(r.meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND]), contributor_name="x",
                   contribution_round=4)  # fmt: skip
    expected = helper.get_result()
    agg = RobustAggregator(method=MEAN)
    agg.reset_stats()
    for r in results:
        agg.accept_model(r)
    out = agg.aggregate_model()
    assert out.params_type == ParamsType.DIFF and out.meta["nr_aggregated"] == 3
    for key, value in expected.items():
        assert out.params[key].dtype == np.float32 and np.array_equal(out.params[key], value)
    assert out.metrics["val_mean_dice"] == pytest.approx((3 * 0.5 + 7 * 0.25 + 2 * 0.75) / 12)


def test_median_aggregator_is_unweighted_clips_first_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    results = _float32_results()
    agg = RobustAggregator(method=MEDIAN, clip_update_norm=1.0)
    with caplog.at_level(logging.INFO):
        for r in results:
            agg.accept_model(r)
        out = agg.aggregate_model()
    clipped = [clip_update(r.params, 1.0)[0] for r in results]
    for key in ("a", "b"):
        stack = np.stack([c[key].astype(np.float64) for c in clipped])
        np.testing.assert_array_equal(out.params[key], np.median(stack, axis=0).astype(np.float32))
        assert out.params[key].dtype == np.float32
    assert out.meta["robust_aggregation"] == {
        "method": MEDIAN, "trim_fraction": 0.0, "clip_update_norm": 1.0, "sites": ["site-1", "site-2", "site-3"]
    }  # fmt: skip
    text = caplog.text
    assert len(re.findall(r"update from site-\d clipped from L2 norm [\d.]+ to clip_update_norm 1", text)) == 3
    assert "median of 3 updates" in text
    # the next round starts empty
    with pytest.raises(RuntimeError, match="nothing to aggregate"):
        agg.aggregate_model()


def test_trimmed_mean_aggregator_warns_when_a_round_trims_nothing(caplog: pytest.LogCaptureFixture) -> None:
    agg = RobustAggregator(method=TRIMMED_MEAN, trim_fraction=0.34)
    for r in _float32_results()[:2]:  # a round where only 2 of 3 sites' updates arrived: floor(0.34 * 2) = 0
        agg.accept_model(r)
    with caplog.at_level(logging.WARNING):
        agg.aggregate_model()
    assert "trims nothing at 2 updates" in caplog.text


def test_the_aggregator_refuses_full_weights() -> None:
    full = FLModel(params={"a": np.zeros(2)}, params_type=ParamsType.FULL, meta={"client_name": "site-1"})
    with pytest.raises(ValueError, match="DIFF"):
        RobustAggregator(method=MEDIAN).accept_model(full)


def _ctx(site: str) -> FLContext:
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx = FLContext()
    ctx.set_peer_context(peer)
    return ctx


def test_the_guard_of_a_diff_job_rejects_full_weights() -> None:
    """Full weights skip the norm limit; in a DIFF job they would be added to the global model as a DIFF."""
    weights = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.full(10, 1.0e6)}).to_shareable()
    weights.set_header(AppConstants.CURRENT_ROUND, 1)
    out = UpdateGuard(max_norm=1.0, data_kind="WEIGHT_DIFF").process(weights, _ctx("site-3"))
    assert out.get_return_code() == REJECT_CODE
    assert UpdateGuard(max_norm=1.0).process(weights, _ctx("s")).get_return_code() == ReturnCode.OK  # default
    diff = DXO(data_kind=DataKind.WEIGHT_DIFF, data={"w": np.full(4, 0.1)}).to_shareable()
    assert UpdateGuard(max_norm=1.0, data_kind="WEIGHT_DIFF").process(diff, _ctx("s")) is diff
    with pytest.raises(ValueError, match="data_kind"):
        UpdateGuard(data_kind="METRICS")


# ------------------------------------------------------------------------------------------------ the job
def _server(job: Path) -> dict:
    return json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())


def test_the_default_job_has_no_aggregator_and_a_robust_one_is_wired(tmp_path: Path, make_config) -> None:
    from nvflare_jobs.fetal_brain.job import export_job

    plain = _server(export_job(make_config(), tmp_path / "plain"))
    controller = plain["workflows"][0]
    assert "aggregator" not in controller["args"]  # NVFlare's built-in FedAvg mean, exactly as before
    (entry,) = plain["task_result_filters"]
    assert entry["filters"][-1]["args"]["data_kind"] == "WEIGHT_DIFF"
    aggregation = {"method": "trimmed_mean", "trim_fraction": 0.34, "clip_update_norm": 10.0}
    robust = _server(export_job(make_config(server={"aggregation": aggregation}), tmp_path / "robust"))
    assert robust["workflows"][0]["args"]["aggregator"] == {
        "path": "nvflare_jobs.robust_aggregation.RobustAggregator",
        "args": aggregation,
    }
    clip_only = _server(export_job(make_config(server={"aggregation": {"clip_update_norm": 1.0}}), tmp_path / "c"))
    assert clip_only["workflows"][0]["args"]["aggregator"]["args"] == {"clip_update_norm": 1.0}
    fedopt = make_config(algorithm="fedopt", server={"aggregation": {"method": "median"}})
    args = _server(export_job(fedopt, tmp_path / "fedopt"))["workflows"][0]
    assert args["path"].endswith("FetalFedOpt") and args["args"]["aggregator"]["args"] == {"method": "median"}


def test_bad_aggregation_settings_stop_the_export(tmp_path: Path, make_config) -> None:
    from nvflare_jobs.config import ConfigError
    from nvflare_jobs.fetal_brain.job import export_job

    with pytest.raises(ConfigError, match=r"server\.aggregation\.trim_fraction=0\.2 trims .* 0 sites per side"):
        export_job(make_config(server={"aggregation": {"method": "trimmed_mean", "trim_fraction": 0.2}}), tmp_path)


# ------------------------------------------------------------------------------------------------ a real run
@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_median_outvotes_a_poisoning_site_in_the_simulator(tmp_path: Path, make_config, fl_env: dict) -> None:
    """site-3 sends its update sign-flipped at L2 norm 100 (the guard allows 1000). The global model's change is the
    coordinate-wise median of what the server received, within the honest sites' range on every weight; the
    step-weighted mean of the same updates (what FedAvg would have applied) is pulled ~15x further from the honest
    sites' mean."""
    import sys

    import torch
    from nvflare.recipe import SimEnv

    from nvflare_jobs.fetal_brain.job import build_recipe
    from nvflare_jobs.fetal_brain.model import FetalBrainNet
    from tests.nvflare_jobs.received import ReceivedRecorder, read_received

    config = make_config(
        num_rounds=1, min_clients=3, cross_site_eval=False, server={"aggregation": {"method": "median"}}
    )
    per_site = {"site-3": {"train_script": str(POISONER), "train_args": "--norm 100 --config fetal_fl_job.json"}}
    recipe = build_recipe(config, per_site_config=per_site, command=f"{sys.executable} -u")
    received = tmp_path / "received"
    recipe.add_server_input_filter(ReceivedRecorder(str(received / "received.jsonl"), arrays=True), tasks=["train"])
    recipe.run(SimEnv(clients=list(config["sites"]), num_threads=3, workspace_root=str(tmp_path / "sim")))

    run = tmp_path / "sim" / config["name"]
    log = (run / "server" / "log.txt").read_text()
    assert "REJECTED" not in log and "median of 3 updates" in log
    norms = dict(re.findall(r"update from (site-\d) \(round 0\) accepted: L2 norm ([\d.e+-]+)", log))
    assert float(norms["site-3"]) == pytest.approx(100.0, rel=1e-4)
    assert max(float(norms["site-1"]), float(norms["site-2"])) < 10.0  # the attack is 10x+ an honest update

    updates = {s: dict(np.load(received / f"{s}_round0.npz")) for s in ("site-1", "site-2", "site-3")}
    initial = {k: v.numpy() for k, v in FetalBrainNet(config["bundle_overrides"], init_seed=0).state_dict().items()}
    final = torch.load(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt", weights_only=False)
    final = {k: np.asarray(v) for k, v in final["model"].items()}
    change = {k: final[k].astype(np.float64) - initial[k] for k in updates["site-1"]}
    expected = combine(list(updates.values()), method=MEDIAN)
    honest_low = {k: np.minimum(updates["site-1"][k], updates["site-2"][k]) for k in change}
    honest_high = {k: np.maximum(updates["site-1"][k], updates["site-2"][k]) for k in change}
    for k in change:
        np.testing.assert_allclose(change[k], expected[k], rtol=0, atol=1e-5)  # float32 rounding of the sum
        assert np.all(expected[k] >= honest_low[k]) and np.all(expected[k] <= honest_high[k])

    def dist(a: dict, b: dict) -> float:
        return float(np.sqrt(sum(np.sum((a[k].astype(np.float64) - b[k]) ** 2) for k in a)))

    honest_mean = combine([updates["site-1"], updates["site-2"]], method=MEAN)
    meta = {r["site"]: r["meta"] for r in read_received(received / "received.jsonl", updates_only=True)}
    steps = [meta[s].get(FLMetaKey.NUM_STEPS_CURRENT_ROUND) for s in updates]  # FedAvg's weight of each update
    assert all(isinstance(n, int) and n > 0 for n in steps)
    mean = combine(list(updates.values()), steps, method=MEAN)  # FedAvg's step-weighted mean of the same updates
    half_gap = dist({k: updates["site-1"][k] / 2 for k in change}, {k: updates["site-2"][k] / 2 for k in change})
    honest = max(float(norms["site-1"]), float(norms["site-2"]))
    # measured (tiny job, seed 0): honest norms 3.7, median 2.3 from the honest mean, mean 33.6 from it
    assert dist(expected, honest_mean) <= half_gap * (1 + 1e-9)  # within the honest sites' spread
    assert dist(mean, honest_mean) > 5 * honest  # dragged away: ~100 / 3 toward the attacker
