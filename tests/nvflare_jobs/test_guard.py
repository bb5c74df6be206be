"""The server's update gate: plain function and the NVFlare filter around it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from nvflare_jobs.guard import REJECT_CODE, UpdateGuard, inspect_update


def _update(scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.normal(0, scale, (4, 3)).astype(np.float32), "b": rng.normal(0, scale, 5)}


def test_a_normal_update_passes_with_its_norm() -> None:
    params = _update()
    verdict = inspect_update(params, max_norm=1.0)
    expected = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in params.values()))
    assert verdict.ok and verdict.nonfinite == 0 and verdict.size == 17
    assert verdict.norm == pytest.approx(expected)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad: float) -> None:
    params = _update()
    params["b"][2] = bad
    verdict = inspect_update(params, max_norm=None)  # even without a norm limit
    assert not verdict.ok and verdict.nonfinite == 1 and verdict.reason.endswith("in b")


def test_absurd_norm_is_rejected_and_the_limit_is_inclusive() -> None:
    params = {"w": np.full(4, 0.5)}  # norm exactly 1
    assert inspect_update(params, max_norm=1.0).ok
    verdict = inspect_update({"w": np.full(4, 1.0e6)}, max_norm=1.0e3)
    assert not verdict.ok and "exceeds" in verdict.reason and verdict.norm == pytest.approx(2.0e6)


def test_tensors_empty_and_non_numeric_updates() -> None:
    assert inspect_update({"t": torch.ones(3)}, max_norm=10).ok
    assert not inspect_update({}, max_norm=10).ok
    assert not inspect_update({"s": np.array(["x"])}, max_norm=10).ok
    with pytest.raises(ValueError):
        inspect_update(_update(), max_norm=0)


def _ctx(site: str) -> FLContext:
    peer = FLContext()
    peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx = FLContext()
    ctx.set_peer_context(peer)
    return ctx


def _shareable(params: dict, kind: str = DataKind.WEIGHT_DIFF):
    shareable = DXO(data_kind=kind, data=params).to_shareable()
    shareable.set_header(AppConstants.CURRENT_ROUND, 3)
    return shareable


def test_filter_passes_good_updates_untouched() -> None:
    shareable = _shareable(_update())
    out = UpdateGuard(max_norm=10.0).process(shareable, _ctx("site-1"))
    assert out is shareable and from_shareable(out).data_kind == DataKind.WEIGHT_DIFF


def test_filter_replaces_a_poisoned_update_by_an_error_reply_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    params = _update()
    params["a"][0, 0] = np.nan
    with caplog.at_level(logging.ERROR):
        out = UpdateGuard(max_norm=10.0).process(_shareable(params), _ctx("site-3"))
    assert out.get_return_code() == REJECT_CODE == ReturnCode.TASK_RESULT_FILTER_ERROR
    assert out.get_header(AppConstants.CURRENT_ROUND) == 3
    with pytest.raises(ValueError):  # no DXO left: nothing that could be aggregated
        from_shareable(out)
    assert any("REJECTED update from site-3 (round 3)" in r.getMessage() for r in caplog.records)


def test_filter_checks_full_weights_for_non_finite_values_only() -> None:
    huge = {"w": np.full(10, 1.0e6)}
    assert UpdateGuard(max_norm=1.0).process(_shareable(huge, DataKind.WEIGHTS), _ctx("s")).get_return_code() == "OK"
    huge["w"][0] = np.inf
    out = UpdateGuard(max_norm=1.0).process(_shareable(huge, DataKind.WEIGHTS), _ctx("s"))
    assert out.get_return_code() == REJECT_CODE


def test_filter_ignores_metrics_and_error_replies() -> None:
    metrics = DXO(data_kind=DataKind.METRICS, data={"val_mean_dice": float("nan")}).to_shareable()
    assert UpdateGuard().process(metrics, _ctx("s")) is metrics
    from nvflare.apis.shareable import make_reply

    err = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert UpdateGuard().process(err, _ctx("s")) is err


def test_filter_rejects_bad_limits() -> None:
    for bad in (0, -1.0, float("inf"), "10"):
        with pytest.raises(ValueError):
            UpdateGuard(max_norm=bad)  # type: ignore[arg-type]
