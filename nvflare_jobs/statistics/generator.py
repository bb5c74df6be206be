"""NVFlare's ``Statistics`` spec at a site: every value NVFlare's statistics workflow asks for is a DP release.

A thin adapter: the mechanisms, sensitivities and accounting are :mod:`privacy.statistics`; the per-patient
records come from :mod:`nvflare_jobs.statistics.site_data`. What it adds is NVFlare's calling pattern:

* ``features()`` (called first in each statistics task) reads the site's cases once, then, before any value is
  computed, reserves the request's planned ε on the site ledger (``$FETAL_FL_PRIVACY_LEDGER``, dataset
  ``<site>/<data folder name>``: the one training charges). Over budget: :class:`privacy.ledger.
  PrivacyBudgetExceeded` — the task fails, the controller stops the job, nothing is computed or charged.
* every statistic is noised once and cached; the first value of each of NVFlare's two tasks charges the ledger
  with the cumulative ε (one spend record per task, fsync'ed before the value is returned).
* ``min_value``/``max_value`` never read the data: they are only called when a histogram has no range, which the
  request never allows. ``quantiles`` is refused. ``failure_count`` is 0 (missing values are simply not counted).
* at the end of the run the reservation is released; what was charged stays.

Without a ledger it refuses to run unless ``require_ledger`` is false (simulations): ε is then only reported.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.statistics_spec import Bin, DataType, Feature, Histogram, HistogramType, Statistics

from fetalseg.site_env import ENV_PRIVACY_LEDGER, privacy_ledger
from privacy.statistics import SiteStatisticsRelease, StatisticsRequest, StatisticsRequestError

log = logging.getLogger(__name__)

DATASET_NAME = "cases"  # NVFlare's dataset name: one dataset per site, the site's cases
GENERATOR_ID = "stats_generator"  # the component id the site policy looks up
REPORT_FILE = "statistics_dp_report.json"  # what the site released and what it cost, in the site's job folder


def ledger_job_id(nvflare_job_id: str) -> str:
    """The job id the ledger records. NVFlare's simulator names every run ``simulate_job``, and the ledger counts
    one job at its largest ε, so two simulated requests would be counted once: each gets its own id instead."""
    if nvflare_job_id == "simulate_job":
        return f"statistics-simulate_job-{uuid.uuid4().hex[:12]}"
    return f"statistics-{nvflare_job_id}"


class FetalStatistics(Statistics):
    """The site's DP statistics for NVFlare's ``StatisticsExecutor`` (see the module docstring).

    Args:
        request: the statistics request (:meth:`privacy.statistics.StatisticsRequest.from_dict`), checked here.
        data_root: parent of ``<site>/`` when neither ``FETAL_FL_SITE_DATA`` nor ``FETAL_FL_DATA_ROOT`` is set.
        require_ledger: refuse to release anything without a site ledger (default; a simulation may turn it off).
    """

    def __init__(self, request: dict, data_root: str | None = None, require_ledger: bool = True) -> None:
        super().__init__()
        self.request = request
        self.data_root = data_root
        self.require_ledger = require_ledger
        self.plan = StatisticsRequest.from_dict(request)  # a bad request fails at job build and at the site
        self.release: SiteStatisticsRelease | None = None
        self.site = ""
        self.job_id = ""
        self.app_dir: Path | None = None

    # -- life cycle ------------------------------------------------------------------------------------------------
    def initialize(self, fl_ctx: FLContext) -> None:
        self.site = str(fl_ctx.get_identity_name())
        nv_job = str(fl_ctx.get_job_id())
        self.job_id = ledger_job_id(nv_job)
        workspace = fl_ctx.get_engine().get_workspace() if fl_ctx.get_engine() is not None else None
        if workspace is not None:
            self.app_dir = Path(workspace.get_app_dir(nv_job))

    def finalize(self, fl_ctx: FLContext) -> None:
        if self.release is None:
            return
        freed = self.release.finish()
        report = {**self.release.report(), "site": self.site, "job_id": self.job_id, "epsilon_given_back": freed}
        if self.app_dir is not None:
            (self.app_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
        log.info("statistics at %s: released %s, ε=%.4g charged", self.site, report["released"], report["epsilon"])

    def _start(self) -> SiteStatisticsRelease:
        """Read the cases, reserve the plan on the ledger: once, before anything is computed."""
        if self.release is not None:
            return self.release
        from nvflare_jobs.statistics.site_data import dataset_id, patient_records, site_data_dir

        data_dir = site_data_dir(self.site, self.data_root)
        ledger_path = privacy_ledger()
        if not ledger_path and self.require_ledger:
            raise StatisticsRequestError(
                f"site {self.site}: no privacy ledger ({ENV_PRIVACY_LEDGER} is not set); statistics are charged to "
                "the same ledger as training, so none are released without one"
            )
        records = patient_records(data_dir, self.plan, site=self.site)
        release = SiteStatisticsRelease(self.plan, records)
        if ledger_path:
            from privacy.ledger import SiteLedger

            # raises PrivacyBudgetExceeded before any value exists; nothing is written then
            release.reserve(SiteLedger(ledger_path), dataset_id=dataset_id(self.site, data_dir), job_id=self.job_id)
        log.info("statistics at %s: %s", self.site, self.plan.describe())
        self.release = release
        return release

    # -- NVFlare's Statistics spec ---------------------------------------------------------------------------------
    def features(self) -> dict[str, list[Feature]]:
        self._start()
        return {DATASET_NAME: [Feature(f.name, DataType.FLOAT) for f in self.plan.features]}

    def count(self, dataset_name: str, feature_name: str) -> int:
        # NVFlare's count is an int and divides the sum: a noised count is rounded and floored at 1 (post-processing;
        # NVFlare's MinCountCleanser then withholds such a feature anyway)
        return max(round(self._release(dataset_name).count(feature_name)), 1)

    def sum(self, dataset_name: str, feature_name: str) -> float:
        """c·n + Σ̃(x − c) with n the count NVFlare receives (NVFlare's sum ÷ count is c + Σ̃(x − c)/n), kept in
        [low·n, high·n]."""
        rel = self._release(dataset_name)
        spec = self.plan.feature(feature_name)
        centred = rel.sum(feature_name) - spec.center * rel.count(feature_name)
        n = self.count(dataset_name, feature_name)
        # clipped so that every mean NVFlare forms (site and federation) stays in the public range: post-processing
        return float(min(max(spec.center * n + centred, spec.low * n), spec.high * n))

    def mean(self, dataset_name: str, feature_name: str) -> float:
        return self._release(dataset_name).mean(feature_name)

    def stddev(self, dataset_name: str, feature_name: str) -> float:
        """This site's spread around the global mean: √(Σ̃(x − m)² / (ñ − 1)), from the variance task's release."""
        rel = self._release(dataset_name)
        if ("var", feature_name) not in rel.released:
            return 0.0 if not self.plan.feature(feature_name).has_moments else float("nan")
        ssd = float(rel.released_value("var", feature_name))
        return float(max(ssd, 0.0) / max(rel.count(feature_name) - 1.0, 1.0)) ** 0.5

    def variance_with_mean(
        self, dataset_name: str, feature_name: str, global_mean: float, global_count: float
    ) -> float:
        ssd = self._release(dataset_name).squared_deviations(feature_name, global_mean)
        return ssd / max(float(global_count) - 1.0, 1.0)

    def histogram(
        self, dataset_name: str, feature_name: str, num_of_bins: int, global_min_value: float, global_max_value: float
    ) -> Histogram:
        spec = self.plan.feature(feature_name)
        if num_of_bins != spec.bins or (global_min_value, global_max_value) != (spec.low, spec.high):
            raise StatisticsRequestError(
                f"histogram of {feature_name!r} asked with {num_of_bins} bins over [{global_min_value}, "
                f"{global_max_value}], the request says {spec.bins} over [{spec.low}, {spec.high}]: refused"
            )
        counts = self._release(dataset_name).histogram(feature_name)
        edges = spec.bin_edges()
        return Histogram(
            HistogramType.STANDARD, [Bin(float(edges[i]), float(edges[i + 1]), c) for i, c in enumerate(counts)]
        )

    def max_value(self, dataset_name: str, feature_name: str) -> float:
        raise StatisticsRequestError("max is never computed from the data: give every histogram a range")

    def min_value(self, dataset_name: str, feature_name: str) -> float:
        raise StatisticsRequestError("min is never computed from the data: give every histogram a range")

    def quantiles(self, dataset_name: str, feature_name: str, percentiles: list) -> dict:
        raise StatisticsRequestError("quantiles are not released (no bounded-sensitivity mechanism here)")

    def failure_count(self, dataset_name: str, feature_name: str) -> int:
        return 0

    def _release(self, dataset_name: str) -> SiteStatisticsRelease:
        if dataset_name != DATASET_NAME:
            raise StatisticsRequestError(f"unknown dataset {dataset_name!r} (this site has {DATASET_NAME!r})")
        return self._start()

    # -- for the site policy ---------------------------------------------------------------------------------------
    def privacy_plan(self) -> StatisticsRequest:
        """The request's plan (data-independent): what the site policy checks before the first task runs."""
        return self.plan

    def describe(self) -> dict[str, Any]:
        return {"request": self.plan.to_dict(), "plan": self.plan.describe()}
