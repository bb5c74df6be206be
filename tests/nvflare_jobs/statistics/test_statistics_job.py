"""The statistics job without running it: its config, the per-patient records read from a site folder, the
exported job folder (NVFlare's own workflow, the job's scope), and the site policy LimitStatistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.fl_constant import FilterKey, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.workspace import Workspace

from fetalseg.site_env import ENV_PRIVACY_LEDGER
from nvflare_jobs.site_policy import LimitStatistics, PolicyViolationError
from nvflare_jobs.statistics.config import CONFIG_FILE_NAME, StatsJobConfig, load_stats_config
from nvflare_jobs.statistics.job import export_job
from nvflare_jobs.statistics.site_data import ORIENTATIONS, dataset_id, patient_records, site_data_dir
from privacy.statistics import StatisticsRequestError


def test_default_config_is_valid_and_gives_every_histogram_a_public_range() -> None:
    cfg = load_stats_config()
    nv = cfg.nvflare_statistic_configs()
    assert set(nv) == {"count", "sum", "mean", "stddev", "histogram"}
    assert all("range" in h for h in nv["histogram"].values())  # so no min/max of the data is ever asked for
    assert cfg.request.planned_epsilon <= 2.0 + 1e-9


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sites": []}, "sites"),
        ({"surprise": 1}, "unknown key"),
        ({"nvflare": {"min_count": -1}}, "min_count"),
        ({"nvflare": {"min_clients": 9}}, "min_clients"),
        (
            {"request": {"statistics": ["quantile"], "features": {"x": {"range": [0, 1]}}, "privacy": {"epsilon": 1}}},
            "refused",
        ),
    ],
)
def test_bad_configs_are_refused(change: dict, message: str) -> None:
    d = {**load_stats_config().to_dict(), **change}
    with pytest.raises(StatisticsRequestError, match=message):
        StatsJobConfig.from_dict(d)


def test_records_of_a_site_folder(federation: Path) -> None:
    cfg = load_stats_config()
    rec = patient_records(federation / "site-3", cfg.request, site="site-3")
    assert rec.n_patients == 4
    assert np.all((rec.values["gestational_age_weeks"] > 18) & (rec.values["gestational_age_weeks"] < 40))
    assert set(rec.values["orientation"] - 0.5) == {ORIENTATIONS.index("PIR")}
    assert np.allclose(rec.distributions["intensity"].sum(axis=1), 1.0)  # each patient weighs 1
    other = patient_records(federation / "site-1", cfg.request, site="site-1")
    assert set(other.values["orientation"] - 0.5) == {ORIENTATIONS.index("RAS")}


def test_unknown_feature_and_missing_data_folder_are_clear_errors(tmp_path: Path, federation: Path) -> None:
    d = load_stats_config().to_dict()
    d["request"]["features"] = {"head_circumference": {"range": [0, 400]}}
    with pytest.raises(StatisticsRequestError, match="unknown feature"):
        patient_records(federation / "site-1", StatsJobConfig.from_dict(d).request)
    with pytest.raises(ValueError, match="no data folder"):
        site_data_dir("site-1", None, environ={})
    assert site_data_dir("site-1", None, environ={"FETALFL_DATA_ROOT": "/d"}) == Path("/d/site-1")
    assert dataset_id("site-1", Path("/d/site-1")) == "site-1/site-1"  # the id training charges


def test_exported_job_uses_nvflare_statistics_workflow(tmp_path: Path) -> None:
    job = export_job(load_stats_config(), tmp_path)
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["path"].endswith("statistics_controller.StatisticsController")
    client = (job / "app_site-1" / "config" / "config_fed_client.json").read_text()
    assert "nvflare_jobs.statistics.generator.FetalStatistics" in client and "MinCountCleanser" in client
    assert "AddNoiseToMinMax" not in client  # no min/max of the data is ever computed
    assert (job / "app_site-1" / "custom" / CONFIG_FILE_NAME).is_file()
    assert json.loads((job / "meta.json").read_text())["scope"] == "statistics"


def _incoming(tmp_path: Path, config: dict | None, site: str = "site-1", job_id: str = "job-1") -> FLContext:
    root = tmp_path / "ws"
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


def test_site_policy_refuses_a_request_over_its_epsilon(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_PRIVACY_LEDGER, raising=False)
    cfg = load_stats_config().to_dict()
    planned = StatsJobConfig.from_dict(cfg).request.planned_epsilon
    task = Shareable()
    assert LimitStatistics(max_epsilon=planned * 1.01).process(task, _incoming(tmp_path, cfg)) is task
    with pytest.raises(PolicyViolationError, match=r"max_epsilon=.*refused before any statistic is computed"):
        LimitStatistics(max_epsilon=planned / 2).process(task, _incoming(tmp_path, cfg))
    with pytest.raises(PolicyViolationError, match="ships no"):
        LimitStatistics(max_epsilon=10.0).process(task, _incoming(tmp_path, None, job_id="job-2"))
    with pytest.raises(ValueError):
        LimitStatistics(max_epsilon=0)


def test_site_policy_refuses_a_request_the_ledger_cannot_hold(tmp_path: Path, monkeypatch) -> None:
    from privacy.ledger import SiteLedger

    cfg = load_stats_config().with_changes(data_root="/data").to_dict()
    planned = StatsJobConfig.from_dict(cfg).request.planned_epsilon
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=planned * 1.5, delta_budget=1e-3)
    ledger.record(job_id="train-1", dataset_id="site-1/site-1", epsilon=planned, delta=1e-5, round=3)
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    monkeypatch.delenv("FETALFL_SITE_DATA", raising=False)
    monkeypatch.delenv("FETALFL_DATA_ROOT", raising=False)
    before = ledger.path.read_text()
    with pytest.raises(PolicyViolationError, match="privacy budget exceeded for dataset 'site-1/site-1'"):
        LimitStatistics().process(Shareable(), _incoming(tmp_path, cfg))
    assert ledger.path.read_text() == before  # the check charged nothing
    # site-2 has spent nothing: the same request fits there
    LimitStatistics().process(Shareable(), _incoming(tmp_path, cfg, site="site-2", job_id="job-9"))
