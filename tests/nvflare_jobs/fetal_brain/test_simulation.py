"""The whole job in the simulator, 3 synthetic sites: rounds, model selection, checkpoint, evaluation, TensorBoard."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from fetalseg.bundle import Bundle, load_checkpoint
from fetalseg.labels import foreground_labels
from nvflare_jobs.checkpoint import BEST_CHECKPOINT_NAME
from nvflare_jobs.fetal_brain.job import run_simulation
from nvflare_jobs.fetal_brain.model import PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, make_config, fl_env: dict) -> Path:
    return run_simulation(make_config(), tmp_path_factory.mktemp("sim"))


def test_every_round_aggregates_all_three_sites(run: Path) -> None:
    log = (run / "server" / "log.txt").read_text()
    assert re.findall(r"round (\d): aggregating updates from all 3 sites", log) == ["0", "1"]
    assert "REJECTED" not in log and "continuing with" not in log
    assert len(re.findall(r"update from site-\d \(round \d\) accepted", log)) == 6


def test_best_global_model_is_a_bundle_checkpoint(run: Path) -> None:
    app = run / "server" / "simulate_job" / "app_server"
    overrides = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}
    net = Bundle("common", overrides=overrides).network()
    info = load_checkpoint(net, app / BEST_CHECKPOINT_NAME)  # the bundle's own network loads it as is
    assert info["origin"] == "nvflare" and info["job_id"] == "simulate_job" and info["round"] in (1, 2)
    assert 0.0 <= info["val_mean_dice"] <= 1.0 and info["bundle_overrides"] == overrides
    assert all(torch.isfinite(p).all() for p in net.state_dict().values())
    sidecar = json.loads((app / BEST_CHECKPOINT_NAME).with_suffix(".json").read_text())
    assert sidecar["round"] == info["round"] and sidecar["val_mean_dice"] == pytest.approx(info["val_mean_dice"])
    # it is one of the two global models NVFlare kept (the final one, or the best scored during training)
    ours = net.state_dict()
    matches = []
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):
        kept = torch.load(app / name, weights_only=False)["model"]
        matches.append(all(torch.equal(torch.as_tensor(kept[PREFIX + k]), v) for k, v in ours.items()))
    assert any(matches)


def test_cross_site_evaluation_scores_both_global_models_on_every_site(run: Path) -> None:
    results = json.loads((run / "server" / "simulate_job" / "cross_site_val" / "cross_val_results.json").read_text())
    assert sorted(results) == ["site-1", "site-2", "site-3"]
    tissues = [t.name for t in foreground_labels()]
    for site, by_model in results.items():
        assert sorted(by_model) == ["SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt"], site
        for metrics in by_model.values():
            # validation cases (what may still choose between the two models) and held-out test cases (reported)
            assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and metrics["val_cases"] == 1
            assert 0.0 <= metrics["test_mean_dice"] <= 1.0 and metrics["test_cases"] == 1
            assert all(f"val_dice_{t}" in metrics for t in tissues)
            assert all(f"test_dice_{t}" in metrics and f"test_hd95_{t}" in metrics for t in tissues)


def test_site_metrics_stream_to_the_server_as_tensorboard_scalars(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = run / "server" / "simulate_job" / "tb_events"
    for site in ("site-1", "site-2", "site-3"):
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"val_mean_dice", "train_loss", "val_dice_white_matter"} <= tags, (site, tags)
        steps = [e.step for e in acc.Scalars("val_mean_dice")]
        assert steps == [0, 1] and all(math.isfinite(e.value) for e in acc.Scalars("train_loss"))


def test_each_update_is_weighted_by_its_steps_and_carries_per_tissue_dice(run: Path) -> None:
    rows = (run / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    rounds = [json.loads(row) for row in rows if row.strip()]
    assert [r["round"] for r in rounds] == [0, 1]
    tissues = {f"val_dice_{t.name}" for t in foreground_labels()}
    for r in rounds:
        assert sorted(s["name"] for s in r["sites"]) == ["site-1", "site-2", "site-3"]
        for site in r["sites"]:
            metrics = {m["name"]: m["value"] for m in site["metrics"]}
            assert {"val_mean_dice", "train_loss", "train_steps"} | tissues <= set(metrics)
            # FedAvg weight = NUM_STEPS_CURRENT_ROUND sent by the client (NVFlare would use 1.0 without it)
            assert site["weight"] == metrics["train_steps"] == 2.0
