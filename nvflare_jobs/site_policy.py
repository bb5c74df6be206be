"""Site-side privacy policy checks, for a hospital's own ``privacy.json`` scopes (not for job configs).

A site admin lists filters per named scope in ``<site workspace>/local/privacy.json``; NVFlare runs a scope's
result filters on every result of a job that declares that scope, BEFORE the job's own filters and whatever the
job's config says. A job naming a scope the site does not define is refused by the site. The demo policies
(``nvflare_jobs/sites/<site>/privacy.json``) combine :class:`RequireDPSGD` with the project's fail-closed
percentile filter.

:class:`RequireDPSGD` works in both directions; list it in a scope's ``task_data_filters`` AND
``task_result_filters`` (the demo policies do; a job config's filter of this class is wired both ways by
:mod:`nvflare_jobs.fetal_brain.job`):

* on incoming tasks (before the site trains): it reads the job's config from the job's ``custom/`` folder and
  computes the job's PLANNED ε at this site (:mod:`nvflare_jobs.plan`: rounds × local epochs over the site's
  training cases, with the configured noise or target ε, exactly what the client will run). A job that does not
  use DP-SGD here, or plans more ε (or a larger δ) than the policy allows, is refused at its first task, before
  any training step or ledger spend, with a message naming the policy limit and the planned ε (NVFlare replies
  ``TASK_DATA_FILTER_ERROR``; every later task of that job is refused the same way). A job without a fetal-fl
  config cannot be planned: it is logged and left to the per-update check.
* on results (what leaves the site): it checks the DP-SGD report the job's client attaches to each update
  (``meta["dp_sgd"]``, from :mod:`privacy.dpsgd`): a model update without one, or with ε above the site's
  maximum, never leaves the site (NVFlare replies ``TASK_RESULT_FILTER_ERROR`` and sends no weights).

:class:`RequireSecureAggregation` (issue 20) refuses, before any training, a job whose config does not turn on
``server.secure_aggregation`` (or sets a lower threshold than the site's minimum).

Both checks trust the job's client code to do and report what its config says, so they catch configuration
mistakes (a job that forgot DP-SGD or asks for too large an ε), not a malicious job author; sites review the
job's code for that.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

from nvflare_jobs.config import DP_REPORT_KEY

__all__ = ["DP_REPORT_KEY"]  # re-exported: the key this module's filters read


class PolicyViolationError(RuntimeError):
    """A result that this site's privacy policy does not allow to leave the site."""


def check_dp_report(report: Any, *, max_epsilon: float | None, max_delta: float | None) -> None:
    """Raise :class:`PolicyViolationError` unless ``report`` shows DP-SGD within the site's limits."""
    if not isinstance(report, dict):
        raise PolicyViolationError(
            "the update carries no DP-SGD report: this site only releases DP-SGD-trained updates"
        )
    eps, delta = report.get("epsilon"), report.get("delta")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise PolicyViolationError(f"the update's DP-SGD report has no valid epsilon ({eps!r})")
    if not isinstance(delta, (int, float)) or not 0 < delta < 1:
        raise PolicyViolationError(f"the update's DP-SGD report has no valid delta ({delta!r})")
    if max_epsilon is not None and eps > max_epsilon:
        raise PolicyViolationError(f"DP-SGD epsilon {eps:.4g} exceeds this site's maximum {max_epsilon:.4g}")
    if max_delta is not None and delta > max_delta:
        raise PolicyViolationError(f"DP-SGD delta {delta:.3g} exceeds this site's maximum {max_delta:.3g}")


def check_dp_plan(plan: Any, *, site: str, num_rounds: int, max_epsilon: float | None, max_delta: float | None) -> None:
    """Raise :class:`PolicyViolationError` unless a job's DP-SGD ``plan`` (a :class:`nvflare_jobs.plan.PrivacyPlan`,
    None when the job does not use DP-SGD at ``site``) stays within the site's limits."""
    if plan is None:
        raise PolicyViolationError(
            f"this site's privacy policy requires DP-SGD, but the job does not use DP-SGD at {site}: "
            "refused before any training"
        )
    if max_epsilon is not None and not plan.epsilon <= max_epsilon:
        raise PolicyViolationError(
            f"the job plans DP-SGD epsilon={plan.epsilon:.4g} at {site} over its {num_rounds} round(s) "
            f"({plan.describe()}), above this site's policy maximum max_epsilon={max_epsilon:.4g} (RequireDPSGD): "
            "refused before any training; lower the job's epsilon (more noise, fewer rounds or local epochs)"
        )
    if max_delta is not None and not plan.delta <= max_delta:
        raise PolicyViolationError(
            f"the job plans DP-SGD delta={plan.delta:.3g} at {site}, above this site's policy maximum "
            f"max_delta={max_delta:.3g} (RequireDPSGD): refused before any training"
        )


def job_config_file(fl_ctx: FLContext, name: str | None = None) -> Path | None:
    """The fetal-fl job config (or the file ``name``) shipped in the running job's ``custom/`` folder at this site."""
    from nvflare_jobs.config import CONFIG_FILE_NAME

    name = name or CONFIG_FILE_NAME
    job_id = fl_ctx.get_job_id()
    workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    if workspace is None and fl_ctx.get_engine() is not None:
        workspace = fl_ctx.get_engine().get_workspace()
    if workspace is None or not job_id:
        return None
    for folder in (workspace.get_app_custom_dir(job_id), workspace.get_app_dir(job_id)):
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


class RequireDPSGD(DXOFilter):
    """Site policy filter: a job trains here only with a DP-SGD plan within ``max_epsilon``, and only DP-SGD-trained
    weight differences within ``max_epsilon`` leave the site.

    As a task-data filter it refuses, at the job's first task, a job whose planned ε (or δ) exceeds the limits;
    as a task-result filter it checks every update's DP-SGD report. Validation results (metrics only) pass; full
    weights and anything that is not a DXO are refused.

    Args:
        max_epsilon: largest ε (cumulative for the job, at the report's δ) the site releases; None: any.
        max_delta: largest δ the site accepts; None: any.
    """

    def __init__(self, max_epsilon: float | None = None, max_delta: float | None = None) -> None:
        for name, value in (("max_epsilon", max_epsilon), ("max_delta", max_delta)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.max_epsilon = max_epsilon
        self.max_delta = max_delta
        self._verdicts: dict[str, str | None] = {}  # job id -> why the job is refused here (None: its plan fits)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            self._check_job_plan(fl_ctx)  # a task coming in: refuse the job before it trains
            return shareable
        if shareable.get_return_code(ReturnCode.OK) == ReturnCode.OK:
            try:
                from_shareable(shareable)
            except Exception as e:
                raise PolicyViolationError("the task result is not a DXO; this site's policy refuses to send it") from e
        return super().process(shareable, fl_ctx)

    def _check_job_plan(self, fl_ctx: FLContext) -> None:
        job_id = str(fl_ctx.get_job_id())
        if job_id not in self._verdicts:
            self._verdicts[job_id] = self._judge_plan(fl_ctx)
        refusal = self._verdicts[job_id]
        if refusal is not None:
            self.log_error(fl_ctx, f"site privacy policy: job {job_id} refused: {refusal}")
            raise PolicyViolationError(refusal)

    def _judge_plan(self, fl_ctx: FLContext) -> str | None:
        """Why this site refuses the running job (None: its DP-SGD plan fits the policy)."""
        site = fl_ctx.get_identity_name()
        path = job_config_file(fl_ctx)
        if path is None:
            self.log_warning(
                fl_ctx,
                "site privacy policy: the job ships no fetal-fl job config, so its DP-SGD plan cannot be checked "
                "before training; every update it sends is still checked",
            )
            return None
        try:
            from nvflare_jobs.config import load_config
            from nvflare_jobs.plan import site_privacy_plan

            config = load_config(path)
            plan = site_privacy_plan(config, site, validate=False)
        except Exception as e:
            return f"the job's DP-SGD plan at {site} cannot be computed ({type(e).__name__}: {e}): refused"
        try:
            check_dp_plan(
                plan, site=site, num_rounds=config.num_rounds, max_epsilon=self.max_epsilon, max_delta=self.max_delta
            )
        except PolicyViolationError as e:
            return str(e)
        self.log_info(
            fl_ctx,
            f"site privacy policy: the job's DP-SGD plan fits (planned {plan.describe()}; "
            f"max_epsilon={self.max_epsilon}, max_delta={self.max_delta})",
        )
        return None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        if dxo.data_kind == DataKind.METRICS:
            return dxo
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            raise PolicyViolationError(f"this site only sends weight differences, not {dxo.data_kind}")
        try:
            check_dp_report(dxo.get_meta_prop(DP_REPORT_KEY), max_epsilon=self.max_epsilon, max_delta=self.max_delta)
        except PolicyViolationError as e:
            self.log_error(fl_ctx, f"site privacy policy: update NOT sent: {e}")
            raise
        report = dxo.get_meta_prop(DP_REPORT_KEY)
        self.log_info(fl_ctx, f"site privacy policy: DP-SGD update allowed (epsilon={report['epsilon']:.4g})")
        return dxo


def check_secure_aggregation(config: Any, *, min_threshold: int | None = None) -> None:
    """Raise :class:`PolicyViolationError` unless the job config (a :class:`nvflare_jobs.config.JobConfig`) turns
    on ``server.secure_aggregation`` with at least ``min_threshold``."""
    if config is None:
        raise PolicyViolationError(
            "this site's privacy policy requires secure aggregation, but the job ships no fetal-fl job config to "
            "check: refused before any training"
        )
    if not config.secure_aggregation:
        raise PolicyViolationError(
            "this site's privacy policy requires secure aggregation (the server may see only the sum of the "
            "sites' updates), but the job does not enable server.secure_aggregation: refused before any training"
        )
    if min_threshold is not None and config.secagg_threshold < min_threshold:
        raise PolicyViolationError(
            f"the job's secure-aggregation threshold {config.secagg_threshold} is below this site's minimum "
            f"{min_threshold} (RequireSecureAggregation): refused before any training"
        )


class RequireSecureAggregation(DXOFilter):
    """Site policy filter (``privacy.json``, task data AND task results): this site takes part only in jobs whose
    config turns on secure aggregation (:mod:`nvflare_jobs.secure_aggregation`), with at least ``min_threshold``.

    On an incoming task it reads the job's config from the job's ``custom/`` folder and refuses the job (a job
    without a fetal-fl config too: it cannot be checked); on results, no model update of a refused job leaves.
    Scope filters run before the job's own, so this filter sees the update before it is masked: it checks the
    job's configuration, not the bytes (the job's masking filter refuses to send anything it did not mask).

    Args:
        min_threshold: fewest sites the job's threshold may require to unmask a round; None: any valid one.
    """

    def __init__(self, min_threshold: int | None = None) -> None:
        if min_threshold is not None and (isinstance(min_threshold, bool) or not isinstance(min_threshold, int)
                                          or min_threshold < 2):  # fmt: skip
            raise ValueError(f"min_threshold must be an integer >= 2 or None, got {min_threshold!r}")
        super().__init__(supported_data_kinds=None, data_kinds_to_filter=None)
        self.min_threshold = min_threshold
        self._verdicts: dict[str, str | None] = {}

    def _refusal(self, fl_ctx: FLContext) -> str | None:
        job_id = str(fl_ctx.get_job_id())
        if job_id not in self._verdicts:
            try:
                from nvflare_jobs.config import load_config

                path = job_config_file(fl_ctx)
                check_secure_aggregation(None if path is None else load_config(path), min_threshold=self.min_threshold)
                self._verdicts[job_id] = None
                self.log_info(fl_ctx, "site privacy policy: the job uses secure aggregation")
            except PolicyViolationError as e:
                self._verdicts[job_id] = str(e)
            except Exception as e:
                self._verdicts[job_id] = f"the job's config cannot be checked ({type(e).__name__}: {e}): refused"
        return self._verdicts[job_id]

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        refusal = self._refusal(fl_ctx)
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) == FilterKey.IN:
            if refusal is not None:
                self.log_error(fl_ctx, f"site privacy policy: job {fl_ctx.get_job_id()} refused: {refusal}")
                raise PolicyViolationError(refusal)
            return shareable
        return super().process(shareable, fl_ctx)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        refusal = self._refusal(fl_ctx)
        if refusal is not None and dxo.data_kind != DataKind.METRICS:
            self.log_error(fl_ctx, f"site privacy policy: update NOT sent: {refusal}")
            raise PolicyViolationError(refusal)
        return dxo


class LimitStatistics(Filter):
    """Site policy filter for federated statistics jobs (``statistics`` scope, as a task-data filter): a job's
    statistics request is refused before its first task runs when its planned ε (or δ) exceeds ``max_epsilon``
    (``max_delta``), or does not fit what the site ledger (``$FETAL_FL_PRIVACY_LEDGER``) has left for the dataset.

    The plan is read from the job's ``custom/fedstats_config.json`` and computed with :mod:`privacy.statistics`
    (data-independent: the same ε every site charges). A statistics job without that file is refused: this site
    releases statistics only through the DP-accounted generator. Results pass unchanged (the generator charges the
    ledger before they leave). Like :class:`RequireDPSGD`, it trusts the job's code to do what its config says.
    """

    def __init__(self, max_epsilon: float | None = None, max_delta: float | None = None) -> None:
        for name, value in (("max_epsilon", max_epsilon), ("max_delta", max_delta)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        super().__init__()
        self.max_epsilon = max_epsilon
        self.max_delta = max_delta
        self._verdicts: dict[str, str | None] = {}

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if fl_ctx.get_prop(FLContextKey.FILTER_DIRECTION) != FilterKey.IN:
            return shareable
        job_id = str(fl_ctx.get_job_id())
        if job_id not in self._verdicts:
            self._verdicts[job_id] = self._judge(fl_ctx)
        refusal = self._verdicts[job_id]
        if refusal is not None:
            self.log_error(fl_ctx, f"site privacy policy: statistics job {job_id} refused: {refusal}")
            raise PolicyViolationError(refusal)
        return shareable

    def _judge(self, fl_ctx: FLContext) -> str | None:
        """Why this site refuses the running statistics job (None: its plan fits)."""
        from fetalseg.site_env import privacy_ledger
        from nvflare_jobs.statistics.config import CONFIG_FILE_NAME, load_stats_config

        site = fl_ctx.get_identity_name()
        path = job_config_file(fl_ctx, CONFIG_FILE_NAME)
        if path is None:
            return (
                f"the job ships no {CONFIG_FILE_NAME}: this site releases statistics only through the project's "
                "DP-accounted statistics job (LimitStatistics)"
            )
        try:
            request = load_stats_config(path).request
            eps, delta = request.planned_epsilon, request.delta
        except Exception as e:
            return f"the statistics request cannot be planned ({type(e).__name__}: {e}): refused"
        if self.max_epsilon is not None and not eps <= self.max_epsilon:
            return (
                f"the statistics request plans epsilon={eps:.4g} at {site} ({request.describe()}), above this "
                f"site's policy maximum max_epsilon={self.max_epsilon:.4g} (LimitStatistics): refused before any "
                "statistic is computed; ask for fewer statistics or features, or a smaller epsilon"
            )
        if self.max_delta is not None and not delta <= self.max_delta:
            return f"the statistics request's delta={delta:.3g} is above this site's max_delta={self.max_delta:.3g}"
        ledger_path = privacy_ledger()
        if ledger_path:
            from nvflare_jobs.statistics.site_data import dataset_id, site_data_dir
            from privacy.ledger import PrivacyBudgetExceeded, SiteLedger

            try:
                config = load_stats_config(path)
                data = dataset_id(site, site_data_dir(site, config.data_root))
                SiteLedger(ledger_path).check_budget(
                    dataset_id=data, planned_epsilon=eps, delta=delta, job_id=str(fl_ctx.get_job_id())
                )
            except PrivacyBudgetExceeded as e:
                return f"{e} (LimitStatistics)"
            except Exception as e:
                return f"the site ledger cannot be checked ({type(e).__name__}: {e}): refused"
        self.log_info(fl_ctx, f"site privacy policy: statistics request fits ({request.describe()})")
        return None
