"""With DP-SGD on, everything a site sends is covered by its ε: a real simulator job (3 tiny sites, 2 rounds,
cross-site evaluation, TensorBoard streaming), inspected at the server. Every value received is either noised by
the accounted Gaussian mechanism or data-independent (counts, the accountant's own ε and δ); the ledger holds one
ε composed of DP-SGD's steps and every metric release, the per-round report shows the metrics' share. With the
metrics withheld (the default) the server keeps the last round's model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from fetalseg.labels import foreground_labels
from nvflare_jobs.config import DP_REPORT_KEY, ENV_PRIVACY_LEDGER, ENV_SITE_STATE
from nvflare_jobs.fetal_brain.job import build_recipe
from tests.nvflare_jobs.received import ReceivedRecorder

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "grad_sample_mode": "hooks", "accountant": "rdp"}
METRICS_SIGMA = 4.0
TISSUES = [t.name for t in foreground_labels()]
NOISED = {f"{p}_mean_dice" for p in ("val", "test")} | {f"{p}_dice_{t}" for p in ("val", "test") for t in TISSUES}
DATA_INDEPENDENT = {"val_cases", "test_cases", "train_steps", "dp_epsilon", "dp_delta", "dp_metrics_epsilon"}


def _run(tmp: Path, config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict], Any]:
    from nvflare.recipe import SimEnv

    from privacy.ledger import SiteLedger

    ledger = SiteLedger.init(tmp / "ledger.jsonl", epsilon_budget=1.0e6, delta_budget=0.5)
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    monkeypatch.setenv(ENV_SITE_STATE, str(tmp / "state"))
    received = tmp / "received.jsonl"
    recipe = build_recipe(config, command=f"{sys.executable} -u")
    for task in ("train", "validate"):  # training updates and the cross-site evaluation's results
        recipe.add_server_input_filter(ReceivedRecorder(str(received)), tasks=[task])
    recipe.run(SimEnv(clients=SITES, num_threads=len(SITES), workspace_root=str(tmp / "sim")))
    ledger.reload()
    rows = [json.loads(line) for line in received.read_text().splitlines() if line.strip()]
    return tmp / "sim" / config["name"], rows, ledger


def _sent_metrics(rows: list[dict]) -> list[tuple[str, dict[str, float]]]:
    """(site, metrics) of every result received: a training update's metrics travel in its meta."""
    out = []
    for r in rows:
        metrics = r["data"] if r["kind"] == "METRICS" else r["meta"].get("initial_metrics")
        out.append((r["site"], metrics or {}))
    return out


@pytest.fixture(scope="module")
def noised(tmp_path_factory, make_config, fl_env: dict) -> tuple[Path, list[dict], Any]:
    cfg = make_config(
        name="dp_metrics",
        min_clients=3,  # every site's results, however loaded the machine
        privacy={"dp_sgd": DP, "metrics": {"noise_multiplier": METRICS_SIGMA, "seed": 0}},
    )
    with pytest.MonkeyPatch.context() as mp:
        yield _run(tmp_path_factory.mktemp("noised"), cfg, mp)


def test_every_metric_the_server_receives_is_noised_or_data_independent(noised) -> None:
    _, rows, _ = noised
    sent = _sent_metrics(rows)
    assert {r["kind"] for r in rows} == {"WEIGHT_DIFF", "METRICS"}  # training updates and cross-site evaluation
    assert len([r for r in rows if r["kind"] == "WEIGHT_DIFF"]) == 6
    for site, metrics in sent:
        assert metrics and set(metrics) <= NOISED | DATA_INDEPENDENT, (site, sorted(set(metrics) - NOISED))
        assert all(0.0 <= metrics[k] <= 1.0 for k in set(metrics) & NOISED)
    # what used to leave un-noised: the training loss and HD95
    assert not any(k == "train_loss" or "hd95" in k for _, m in sent for k in m)


def test_the_streamed_tensorboard_events_carry_only_released_values(noised) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job, _, _ = noised
    for site in SITES:
        acc = EventAccumulator(str(job / "server" / "simulate_job" / "tb_events" / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert "val_mean_dice" in tags and "dp_metrics_epsilon" in tags, tags
        assert tags <= NOISED | DATA_INDEPENDENT, sorted(tags - NOISED - DATA_INDEPENDENT)


def test_each_rounds_report_shows_the_metrics_share_of_one_composed_epsilon(noised) -> None:
    from privacy.accounting import epsilon_for_history

    _, rows, _ = noised
    for site in SITES:
        reports = [r["meta"][DP_REPORT_KEY] for r in rows if r["kind"] == "WEIGHT_DIFF" and r["site"] == site]
        assert [rep["metrics"]["releases"] for rep in reports] == [1, 2]  # one validation release per round
        for rep in reports:
            metrics_history = [(METRICS_SIGMA, 1.0, rep["metrics"]["releases"])]
            sgd_history = [(rep["noise_multiplier"], rep["sample_rate"], rep["steps"])]
            composed = epsilon_for_history([*sgd_history, *metrics_history], delta=1e-5, accountant="rdp")
            assert rep["epsilon"] == pytest.approx(composed, rel=1e-6)
            assert rep["epsilon"] > rep["epsilon_dp_sgd"] and rep["metrics"]["epsilon_share"] > 0
            assert "validation metrics" not in rep["not_covered"]


def test_the_ledger_holds_every_release_including_the_cross_site_evaluation(noised) -> None:
    from privacy.accounting import epsilon_for_history

    _, rows, ledger = noised
    for site in SITES:
        last = [r["meta"][DP_REPORT_KEY] for r in rows if r["kind"] == "WEIGHT_DIFF" and r["site"] == site][-1]
        evaluations = [r for r in rows if r["kind"] == "METRICS" and r["site"] == site]
        releases = 2 + 2 * len(evaluations)  # two rounds of validation, then val and test for each model scored
        expected = epsilon_for_history(
            [(last["noise_multiplier"], last["sample_rate"], last["steps"]), (METRICS_SIGMA, 1.0, releases)],
            delta=1e-5,
            accountant="rdp",
        )
        assert ledger.spent(f"{site}/{site}").epsilon == pytest.approx(expected, rel=1e-6)
        assert expected > last["epsilon"]


def test_the_server_still_selects_on_the_noised_validation_dice(noised) -> None:
    job, _, _ = noised
    sidecar = json.loads((job / "server" / "simulate_job" / "app_server" / "fetal_brain_best.json").read_text())
    assert sidecar["round"] in (1, 2) and 0.0 <= sidecar["val_mean_dice"] <= 1.0


def test_with_metrics_withheld_only_counts_leave_and_the_last_round_is_kept(
    tmp_path: Path, make_config, fl_env: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_config(name="dp_withheld", min_clients=3, cross_site_eval=False, privacy={"dp_sgd": DP})
    job, rows, _ = _run(tmp_path, cfg, monkeypatch)
    for site, metrics in _sent_metrics(rows):
        assert set(metrics) <= DATA_INDEPENDENT and "val_cases" in metrics, (site, metrics)
    for r in rows:
        rep = r["meta"][DP_REPORT_KEY]
        assert rep["metrics"]["releases"] == 0 and rep["epsilon"] == rep["epsilon_dp_sgd"]
    sidecar = json.loads((job / "server" / "simulate_job" / "app_server" / "fetal_brain_best.json").read_text())
    assert sidecar["round"] == 2 and sidecar["val_mean_dice"] is None and "last round" in sidecar["selected_by"]
