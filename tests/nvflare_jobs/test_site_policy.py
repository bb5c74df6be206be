"""A site's own policy filter: a job trains only with a DP-SGD plan within the site's ε, and only DP-SGD-trained
weight differences within that ε leave the site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace

from nvflare_jobs.config import CONFIG_FILE_NAME, JobConfig
from nvflare_jobs.plan import site_privacy_plan
from nvflare_jobs.site_policy import (
    DP_REPORT_KEY,
    PolicyViolationError,
    RequireDPSGD,
    check_dp_plan,
    check_dp_report,
)

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


DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}


def _incoming_task(tmp_path: Path, config: dict | None, *, site: str = "site-2", job_id: str = "job-7") -> FLContext:
    """A task arriving at ``site`` of a job whose custom/ folder holds ``config`` (a real NVFlare workspace)."""
    root = tmp_path / "workspace"
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(root), site_name=site)
    custom = Path(workspace.get_app_custom_dir(job_id))
    custom.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (custom / CONFIG_FILE_NAME).write_text(json.dumps(config))
    ctx = FLContext()
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(FLContextKey.FILTER_DIRECTION, FilterKey.IN, private=True, sticky=False)
    return ctx


def test_a_job_planning_more_epsilon_than_the_site_allows_is_refused_at_its_first_task(tmp_path, make_config):
    config = make_config(num_rounds=50, privacy={"dp_sgd": DP})
    planned = site_privacy_plan(JobConfig.from_dict(config), "site-2").epsilon
    limit = planned / 2
    policy = RequireDPSGD(max_epsilon=limit, max_delta=1e-4)
    task = _diff()
    ctx = _incoming_task(tmp_path, config)
    for _ in range(2):  # the first task and every later one of the same job
        with pytest.raises(PolicyViolationError) as refused:
            policy.process(task, ctx)
        message = str(refused.value)
        assert f"epsilon={planned:.4g}" in message and f"max_epsilon={limit:.4g}" in message
        assert "50 round(s)" in message and "before any training" in message
    # the same policy lets a job within its limit through, task data unchanged
    fits = RequireDPSGD(max_epsilon=planned * 1.01, max_delta=1e-4)
    assert fits.process(task, _incoming_task(tmp_path / "ok", config)) is task


def test_a_job_without_dp_sgd_or_with_a_larger_delta_is_refused_before_training(tmp_path, make_config) -> None:
    policy = RequireDPSGD(max_epsilon=1e6, max_delta=1e-4)
    no_dp = make_config(privacy={"dp_sgd": None, "sites": {"site-1": {"dp_sgd": DP}}})
    with pytest.raises(PolicyViolationError, match="does not use DP-SGD at site-2"):
        policy.process(_diff(), _incoming_task(tmp_path / "a", no_dp, job_id="job-a"))
    big_delta = make_config(privacy={"dp_sgd": {**DP, "delta": 1e-3}})
    with pytest.raises(PolicyViolationError, match=r"delta=0\.001.*max_delta=0\.0001"):
        policy.process(_diff(), _incoming_task(tmp_path / "b", big_delta, job_id="job-b"))
    unplannable = make_config(privacy={"dp_sgd": {**DP, "delta": 0.9}})  # δ ≥ 1/N: the engine would refuse it
    with pytest.raises(PolicyViolationError, match="cannot be computed"):
        policy.process(_diff(), _incoming_task(tmp_path / "c", unplannable, job_id="job-c"))


def test_a_job_that_is_not_a_fetal_fl_job_is_left_to_the_per_update_check(tmp_path) -> None:
    task = _diff()
    assert RequireDPSGD(max_epsilon=1.0).process(task, _incoming_task(tmp_path, None)) is task


def test_plan_check_messages_name_the_limit_and_the_plan(make_config) -> None:
    plan = site_privacy_plan(JobConfig.from_dict(make_config(privacy={"dp_sgd": DP})), "site-1")
    check_dp_plan(plan, site="site-1", num_rounds=2, max_epsilon=plan.epsilon, max_delta=None)  # at the limit: ok
    with pytest.raises(PolicyViolationError, match=r"above this site's policy maximum max_epsilon=0\.01"):
        check_dp_plan(plan, site="site-1", num_rounds=2, max_epsilon=0.01, max_delta=None)
    with pytest.raises(PolicyViolationError, match="requires DP-SGD"):
        check_dp_plan(None, site="site-1", num_rounds=2, max_epsilon=None, max_delta=None)
