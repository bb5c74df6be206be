"""Site-side privacy policy checks, for a hospital's own ``privacy.json`` scopes (not for job configs).

A site admin lists filters per named scope in ``<site workspace>/local/privacy.json``; NVFlare runs a scope's
result filters on every result of a job that declares that scope, BEFORE the job's own filters and whatever the
job's config says. A job naming a scope the site does not define is refused by the site. The demo policies
(``nvflare_jobs/sites/<site>/privacy.json``) combine :class:`RequireDPSGD` with the project's fail-closed
percentile filter.

:class:`RequireDPSGD` checks the DP-SGD report the job's client attaches to each update (``meta["dp_sgd"]``,
from :mod:`privacy.dpsgd`): a model update without one, or with ε above the site's maximum, never leaves the
site (the filter raises; NVFlare replies ``TASK_RESULT_FILTER_ERROR`` and sends no weights). It trusts the
job's client code to report what it did, so it catches configuration mistakes (a job that forgot DP-SGD or
asks for too large an ε), not a malicious job author; sites review the job's code for that.
"""

from __future__ import annotations

import math
from typing import Any

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

DP_REPORT_KEY = "dp_sgd"  # where nvflare_jobs.fetal_brain.client puts privacy.dpsgd.SitePrivacyEngine.report()


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


class RequireDPSGD(DXOFilter):
    """Client task-result filter: only DP-SGD-trained weight differences within ``max_epsilon`` leave the site.

    Validation results (metrics only) pass; full weights and anything that is not a DXO are refused.

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

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) == ReturnCode.OK:
            try:
                from_shareable(shareable)
            except Exception as e:
                raise PolicyViolationError("the task result is not a DXO; this site's policy refuses to send it") from e
        return super().process(shareable, fl_ctx)

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
