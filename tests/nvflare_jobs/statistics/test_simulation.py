"""The statistics job really runs in NVFlare's simulator on the tiny synthetic federation: sites whose ledger can
hold the request release DP statistics charged once per NVFlare task; a site whose budget cannot hold it refuses
with a clear error and nothing is charged there; the released values are within the noise's expected error."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fetalseg.site_env import ENV_PRIVACY_LEDGER
from nvflare_jobs.statistics.config import load_stats_config
from nvflare_jobs.statistics.job import site_errors
from nvflare_jobs.statistics.report import format_table, histogram_counts, load_result, simulate_and_report, value
from nvflare_jobs.statistics.site_data import patient_records

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(400)]

SIGMA = 0.2  # small noise: the test checks the values against the truth (the default request plans ε = 2)


def test_statistics_in_the_simulator(tmp_path: Path, federation: Path, fl_env: dict, monkeypatch) -> None:
    from privacy.ledger import SiteLedger

    base = load_stats_config()
    request = {**base.raw_request, "privacy": {"noise_multiplier": SIGMA, "delta": 1e-5, "seed": 7}}
    cfg = base.with_changes(name="stats_test", request=request, min_count=0, min_clients=2)
    planned = cfg.request.planned_epsilon
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=planned * 10, delta_budget=1e-3)
    ledger.set_budget(dataset_id="site-2/site-2", epsilon_budget=planned / 2, delta_budget=1e-3)
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))

    # the call the demo report makes: the simulator run, then the Markdown section with its plots
    result_path, section = simulate_and_report(
        tmp_path / "sim", data_root=federation, config=cfg, out_dir=tmp_path / "report"
    )
    result = load_result(result_path)

    # site-2 refused before computing anything, with the ledger's reason, and nothing was charged there
    site2_log = (tmp_path / "sim" / "stats_test" / "site-2" / "log.txt").read_text()
    assert "privacy budget exceeded for dataset 'site-2/site-2'" in site2_log
    reasons = site_errors(tmp_path / "sim" / "stats_test")  # what `fetal-fl fl stats run` prints when a job fails
    assert any(r.startswith("site-2: PrivacyBudgetExceeded: privacy budget exceeded") for r in reasons), reasons
    assert not any(r.startswith(("site-1", "site-3")) for r in reasons)
    ledger.reload()
    assert not [r for r in ledger.records if r.get("dataset_id") == "site-2/site-2" and r["type"] != "budget"]
    assert value(result, "voxel_size_mm", "count", "site-2") is None

    for site in ("site-1", "site-3"):
        dataset = f"{site}/{site}"
        spends = [r for r in ledger.records if r["type"] == "spend" and r["dataset_id"] == dataset]
        # charged exactly once per NVFlare task, the last at the request's planned ε; the reservation released
        assert [s["round"] for s in spends] == [0, 1], site
        assert spends[0]["epsilon"] == pytest.approx(cfg.request.epsilon_through(1))
        assert spends[1]["epsilon"] == pytest.approx(planned)
        assert ledger.spent(dataset).epsilon == pytest.approx(planned)
        assert ledger.reservations(dataset) == []

        # the released values against the truth, within 6 noise standard deviations (seeded: deterministic)
        truth = patient_records(federation / site, cfg.request, site=site)
        n = truth.n_patients
        assert abs(value(result, "voxel_size_mm", "count", site) - n) <= 1  # 6σ = 1.2, then rounded
        ga = truth.values["gestational_age_weeks"]
        spec = cfg.request.feature("gestational_age_weeks")
        ga_bound = (6 * SIGMA * cfg.request.sensitivity("sum", spec.name) + (spec.high - spec.low)) / (n - 1)
        assert abs(value(result, spec.name, "mean", site) - float(np.mean(ga))) < ga_bound
        counts = histogram_counts(result, "orientation", site)
        true_counts = np.histogram(truth.values["orientation"], bins=8, range=(0, 8))[0]
        assert np.all(np.abs(np.asarray(counts) - true_counts) <= 6 * SIGMA)
        assert not math.isclose(sum(counts), n, abs_tol=1e-9)  # noised, not the exact histogram

    # the sites differ as the synthetic federation was built: orientation RAS at site-1, PIR at site-3
    table = format_table(result, cfg)
    assert "RAS" in table.split("site-1")[1].split("\n")[0] and "PIR" in table.split("site-3")[1].split("\n")[0]
    assert (
        "ε=" in section
        and "not differential privacy" in section
        and (tmp_path / "report" / "stats_intensity.png").is_file()
    )
