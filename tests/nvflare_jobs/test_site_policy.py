"""A site's own policy filter: only DP-SGD-trained weight differences within its ε leave the site."""

from __future__ import annotations

import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from nvflare_jobs.site_policy import DP_REPORT_KEY, PolicyViolationError, RequireDPSGD, check_dp_report

REPORT = {"epsilon": 3.2, "delta": 1e-5, "accountant": "rdp"}


def _diff(meta: dict | None = None, kind: str = DataKind.WEIGHT_DIFF) -> Shareable:
    return DXO(data_kind=kind, data={"w": [0.1, -0.2]}, meta=meta or {}).to_shareable()


def test_dp_trained_updates_within_the_budget_pass_unchanged() -> None:
    out = RequireDPSGD(max_epsilon=5.0, max_delta=1e-4).process(_diff({DP_REPORT_KEY: REPORT}), FLContext())
    assert out.get_return_code("OK") == "OK"


@pytest.mark.parametrize(
    ("meta", "kind", "message"),
    [
        ({}, DataKind.WEIGHT_DIFF, "no DP-SGD report"),
        ({DP_REPORT_KEY: {**REPORT, "epsilon": 12.0}}, DataKind.WEIGHT_DIFF, "exceeds this site's maximum"),
        ({DP_REPORT_KEY: {**REPORT, "delta": 1e-2}}, DataKind.WEIGHT_DIFF, "delta"),
        ({DP_REPORT_KEY: {**REPORT, "epsilon": float("nan")}}, DataKind.WEIGHT_DIFF, "no valid epsilon"),
        ({DP_REPORT_KEY: REPORT}, DataKind.WEIGHTS, "only sends weight differences"),
    ],
)
def test_anything_else_never_leaves_the_site(meta: dict, kind: str, message: str) -> None:
    with pytest.raises(PolicyViolationError, match=message):
        RequireDPSGD(max_epsilon=5.0, max_delta=1e-4).process(_diff(meta, kind), FLContext())


def test_validation_metrics_pass_and_non_dxo_results_are_refused() -> None:
    metrics = DXO(data_kind=DataKind.METRICS, data={"val_mean_dice": 0.7}).to_shareable()
    assert RequireDPSGD().process(metrics, FLContext()) is metrics
    with pytest.raises(PolicyViolationError, match="not a DXO"):
        RequireDPSGD().process(Shareable(), FLContext())


def test_limits_are_checked_when_the_site_starts() -> None:
    with pytest.raises(ValueError):
        RequireDPSGD(max_epsilon=0)
    check_dp_report(REPORT, max_epsilon=None, max_delta=None)  # no limits: any valid report
