"""The federated statistics job: NVFlare's own statistics workflow with DP releases at every site.

Server: NVFlare's ``StatisticsController`` (its two tasks: count/sum/mean, then histogram/variance) and
``JsonStatsFileWriter`` (``statistics/<name>.json`` in the server's job folder). Each site:
:class:`~nvflare_jobs.statistics.generator.FetalStatistics` behind NVFlare's ``StatisticsExecutor``, and NVFlare's
``StatisticsPrivacyFilter`` with its ``MinCountCleanser`` (and ``HistogramBinsCleanser`` if configured). Those
cleansers are NOT differential privacy: they drop a feature whose (already noised) count is under ``min_count`` or
whose histogram has too many bins for its count; they act on DP outputs (post-processing, no extra cost) and add
no guarantee. The guarantee is the generator's noise and the ledger. ``AddNoiseToMinMax`` is not used: no min or
max of the data is ever computed (every histogram has a public range).

The job declares the ``statistics`` scope: a site's ``privacy.json`` scope of that name can add
:class:`nvflare_jobs.site_policy.LimitStatistics`, which refuses a request above its ε (or the ledger's remaining
budget) before the first task runs.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from nvflare import FedJob, FilterType
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_common.executors.statistics.statistics_executor import StatisticsExecutor
from nvflare.app_common.filters.statistics_privacy_filter import StatisticsPrivacyFilter
from nvflare.app_common.statistics.histogram_bins_cleanser import HistogramBinsCleanser
from nvflare.app_common.statistics.json_stats_file_persistor import JsonStatsFileWriter
from nvflare.app_common.statistics.min_count_cleanser import MinCountCleanser
from nvflare.app_common.workflows.statistics_controller import StatisticsController
from nvflare.recipe.spec import Recipe
from nvflare.recipe.utils import set_recipe_meta

from nvflare_jobs.statistics.config import CONFIG_FILE_NAME, StatsJobConfig, load_stats_config
from nvflare_jobs.statistics.generator import GENERATOR_ID, FetalStatistics

STATS_TASKS = ["fed_stats_pre_run", "fed_stats"]
WRITER_ID = "stats_writer"
APP_PACKAGES = ["fetalseg", "privacy", "nvflare_jobs"]  # installed at every site; never copied into custom/


class StatisticsJobFailed(RuntimeError):  # noqa: N818 - a job outcome, named as the user reads it
    """The statistics job ended without a result (the message carries the sites' reasons)."""


def output_name(config: StatsJobConfig) -> str:
    return f"statistics/{config.name}.json"


class FetalStatsRecipe(Recipe):
    """NVFlare recipe for :class:`StatsJobConfig` (run it with ``SimEnv``/``PocEnv``/``ProdEnv`` or export it)."""

    def __init__(self, config: StatsJobConfig) -> None:
        self.config = config
        # the config travels in each site's custom/ folder: the site policy reads the request from it, and a job
        # with custom content is checked by the site's own review, not the default class allow list
        self._staging = tempfile.TemporaryDirectory(prefix="fetal_stats_job_")
        self.config_file = Path(self._staging.name) / CONFIG_FILE_NAME
        self.config_file.write_text(json.dumps(config.to_dict(), indent=2))
        job = FedJob(name=config.name, min_clients=config.min_clients or len(config.sites))
        controller = StatisticsController(
            statistic_configs=config.nvflare_statistic_configs(),
            writer_id=WRITER_ID,
            enable_pre_run_task=False,
            min_clients=config.min_clients,
        )
        job.to(controller, "server")
        writer = JsonStatsFileWriter(
            output_path=output_name(config), json_encoder_path="nvflare.app_common.utils.json_utils.ObjectEncoder"
        )
        job.to(writer, "server", id=WRITER_ID)
        for site in config.sites:
            generator = FetalStatistics(
                request=config.raw_request, data_root=config.data_root, require_ledger=config.require_ledger
            )
            gen_id = job.to(generator, site, id=GENERATOR_ID)
            job.to(str(self.config_file), site)
            job.to(StatisticsExecutor(generator_id=gen_id), site, tasks=STATS_TASKS)
            cleansers = [job.to(MinCountCleanser(min_count=config.min_count), site, id="min_count_cleanser")]
            if config.max_bins_percent is not None:
                cleanser = HistogramBinsCleanser(max_bins_percent=config.max_bins_percent)
                cleansers.append(job.to(cleanser, site, id="hist_bins_cleanser"))
            job.to(
                StatisticsPrivacyFilter(result_cleanser_ids=cleansers),
                site,
                filter_type=FilterType.TASK_RESULT,
                tasks=["fed_stats"],
            )
        job.set_app_packages(list(APP_PACKAGES))
        super().__init__(job)
        if config.scope:
            set_recipe_meta(self, JobMetaKey.SCOPE, config.scope)


def build_recipe(config: StatsJobConfig | str | Path) -> FetalStatsRecipe:
    cfg = config if isinstance(config, StatsJobConfig) else load_stats_config(config)
    return FetalStatsRecipe(cfg)


def export_job(config: StatsJobConfig | str | Path, export_dir: str | Path) -> Path:
    """Write ``<export_dir>/<name>`` for ``nvflare job submit -j``; return its path."""
    recipe = build_recipe(config)
    recipe.export(job_dir=str(export_dir))
    return Path(export_dir) / recipe.config.name


def find_result(job_workspace: str | Path, config: StatsJobConfig) -> Path:
    """The server's statistics file under a simulator workspace or a downloaded job (FileNotFoundError if none)."""
    root = Path(job_workspace)
    hits = sorted(root.rglob(f"statistics/{config.name}.json"))
    if not hits:
        raise FileNotFoundError(
            f"no statistics result under {root}: the job did not finish (a site refused it? see the sites' logs: "
            f"{sorted(str(p) for p in root.rglob('log.txt'))[:4]})"
        )
    return hits[0]


_REASON = re.compile(
    r"\b((?:PrivacyBudgetExceeded|StatisticsRequestError|PolicyViolationError|DataValidationError|SiteDataError"
    r"|LedgerError|LedgerNotFoundError|LedgerCorruptError): .*|site privacy policy: .*refused: .*)"
)


def site_errors(job_workspace: str | Path, limit: int = 6) -> list[str]:
    """Why sites refused (budget, policy, request, data), one message per site and reason, from the run's logs."""
    out: list[str] = []
    for log_file in sorted(Path(job_workspace).rglob("log.txt")):
        for line in log_file.read_text(errors="replace").splitlines():
            match = _REASON.search(line)
            message = f"{log_file.parent.name}: {match.group(1).strip()}" if match else ""
            if message and message not in out:
                out.append(message)
    return out[:limit]


def run_simulation(config: StatsJobConfig | str | Path, workspace: str | Path) -> Path:
    """Run the job in NVFlare's simulator (one client per site); return the statistics result file.

    Raises :class:`StatisticsJobFailed` with the sites' reasons when no result was written (e.g. a request over budget).
    """
    from nvflare.recipe import SimEnv

    recipe = build_recipe(config)
    sites = list(recipe.config.sites)
    env = SimEnv(clients=sites, num_threads=len(sites), workspace_root=str(workspace))
    job_ws = Path(workspace) / recipe.config.name
    failure = ""
    try:
        recipe.run(env)
    except RuntimeError as e:  # NVFlare's SimEnv: "Simulation failed with return code ..."
        failure = str(e)
    try:
        return find_result(job_ws, recipe.config)
    except FileNotFoundError as e:
        reasons = site_errors(job_ws) or [failure or str(e)]
        raise StatisticsJobFailed("the statistics job wrote no result; " + "; ".join(reasons)) from None


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Run (simulator) the federated statistics job.")
    parser.add_argument("--config", default=None, help="statistics config (JSON)")
    parser.add_argument("--workspace", default="/tmp/nvflare/fetal_stats")
    args = parser.parse_args(argv)
    cfg = load_stats_config(args.config) if args.config else load_stats_config()
    print(json.dumps({"result": str(run_simulation(cfg, args.workspace))}))


if __name__ == "__main__":
    main()
