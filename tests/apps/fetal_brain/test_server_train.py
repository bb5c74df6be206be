"""Fine-tuning through the API (start, status, stop), atomic publishing, reload after training, and installing a
federated model into the running server."""

from __future__ import annotations

import argparse
import hashlib
import time

import nibabel as nib
import pytest
import requests

from apps.fetal_brain.cli import register
from apps.fetal_brain.lib.config import AppConfig
from fetalseg.bundle import save_checkpoint
from tests.apps.fetal_brain.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TRAIN_TIMEOUT_S = 240


def wait_for_training(client, *, timeout: float = TRAIN_TIMEOUT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.train_status()
        if status and status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(1)
    raise AssertionError(f"training did not finish within {timeout} s: {client.train_status()}")


@pytest.fixture(autouse=True)
def no_training_left_running(server, client):
    """Each test starts from an idle server and leaves one: a training that outlives its test would make the
    next test's POST /train a 429 (one training at a time)."""
    yield
    status = client.train_status() or {}
    if status.get("status") in ("SUBMITTED", "RUNNING"):
        requests.delete(f"{server.url}/train/", timeout=60)
    wait_for_training(client)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fine_tune_publishes_and_inference_reloads(server, client):
    before = client.info()["model"]
    task = client.train_start(MODEL, {"max_epochs": 1, "publish": "always", "val_fraction": 0.5})
    assert task["status"] in ("SUBMITTED", "RUNNING")
    status = wait_for_training(client)
    assert status["status"] == "DONE", "\n".join(status.get("details", []))

    info = client.info()
    model = info["model"]
    assert model["trained"] is True and model["origin"] == "local-finetune"
    assert model["sha256"] != before.get("sha256")
    assert model["parent"]["origin"] == before["origin"]
    assert 0.0 <= model["val_mean_dice"] <= 1.0
    stats = info["train_stats"][MODEL]
    assert stats["status"] == "done" and stats["published"] is True
    assert stats["n_train"] >= 1 and stats["n_val"] >= 1
    assert stats["val_mean_dice"] == pytest.approx(model["val_mean_dice"])

    _, params = client.infer(MODEL, "case02", {})
    assert params["model"]["origin"] == "local-finetune"
    assert params["model"]["sha256"] == model["sha256"]


def test_stopping_training_keeps_a_whole_model(server, client):
    start = requests.post(f"{server.url}/train/{MODEL}", json={"max_epochs": 5000, "publish": "always"}, timeout=30)
    assert start.status_code == 200, start.text
    published = server.model_path.read_bytes() if server.model_path.exists() else None
    deadline = time.monotonic() + 120
    while client.train_status()["status"] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert client.train_status()["status"] == "RUNNING"
    busy = requests.post(f"{server.url}/train/{MODEL}", json={"max_epochs": 1}, timeout=30)
    assert busy.status_code == 429  # one training at a time
    result_file, _ = client.infer(MODEL, "case03", {})  # inference while training runs
    assert nib.load(result_file).shape == (32, 32, 32)
    stopped = client.train_stop()
    assert stopped["status"] == "STOPPED"
    assert client.train_status()["status"] == "STOPPED"
    if published is not None:
        assert server.model_path.read_bytes() == published
    assert server.get("/info/").status_code == 200


def test_install_federated_model_into_running_server(server, client, tmp_path):
    config = AppConfig.from_conf({"variant": "tiny"})
    network = config.bundle("inference").network()
    job = tmp_path / "simulate_job" / "app_server"
    job.mkdir(parents=True)
    save_checkpoint(network, job / "FL_global_model.pt", origin="nvflare", job_id="job-42", round=7)

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        ["app", "install-model", str(tmp_path), "--model-path", str(server.model_path), "--conf", "variant", "tiny"]
    )
    assert args.handler(args) == 0

    model = client.info()["model"]
    assert (model["origin"], model["job_id"], model["round"]) == ("nvflare", "job-42", 7)
    assert model["installed_from"].endswith("FL_global_model.pt")
    assert model["sha256"] == sha256(server.model_path)
    _, params = client.infer(MODEL, "case02", {})
    assert (params["model"]["job_id"], params["model"]["round"]) == ("job-42", 7)
    history = list((server.model_path.parent / "history").glob("model-*.pt"))
    assert history, "the replaced model is kept in history/"
