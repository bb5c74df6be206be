"""Workflow pieces that need no server: model provenance/privacy from /info/, training status in words, guards."""

from __future__ import annotations

import pytest
from FetalBrainSegLib.errors import NoCaseError, NotConnectedError
from FetalBrainSegLib.volumeio import Volume
from FetalBrainSegLib.workflow import ModelInfo, TrainingStatus, Workflow


def test_model_info_from_the_apps_model_description():
    info = {
        "models": {"m": {"type": "segmentation"}},
        "model": {
            "bundle_version": "0.1.0",
            "origin": "federated",
            "job_id": "a1b2",
            "round": 7,
            "published_at": "2026-11-24T10:00:00Z",
            "sha256": "0123456789abcdef0123",
            "privacy": {"epsilon": 6.02, "delta": 1e-5, "mechanism": "DP-SGD"},
        },
    }
    m = ModelInfo.from_info(info, "m")
    assert m.version == "2026-11-24T10:00:00Z (0123456789ab)"
    assert m.origin_text == "federated, job a1b2, round 7"
    assert (m.federated_job, m.federated_round) == ("a1b2", 7)
    assert m.privacy_text == "ε = 6.02 (δ = 1e-05), DP-SGD"


def test_model_info_prefers_the_models_own_entry_and_never_guesses():
    info = {
        "version": "app-1.0",  # the app's version, not the model's
        "models": {"m": {"model_version": "3", "provenance": {"source": "fine-tuned", "site": "A"}, "epsilon": 2}},
        "model": {"version": "old", "round": 1},
    }
    m = ModelInfo.from_info(info, "m")
    assert m.version == "3"
    assert m.origin_text == "fine-tuned, round 1, site A"
    assert m.epsilon == 2.0

    bare = ModelInfo.from_info({"version": "app-1.0", "models": {"m": {}}}, "m")
    assert bare.version_text == "not reported by the server"
    assert bare.origin_text == "not reported by the server"
    assert bare.privacy_text.startswith("not reported by the server")
    untrained = ModelInfo.from_info({"models": {"m": {"model": {"trained": False, "bundle_version": "0.1"}}}}, "m")
    assert untrained.version == "bundle 0.1"
    assert untrained.origin_text == "untrained (random weights)"
    no_dp = ModelInfo.from_info({"models": {"m": {}}, "privacy": {"enabled": False}}, "m")
    assert no_dp.privacy_text == "no differential privacy"


def test_training_status_in_words():
    assert TrainingStatus.from_task(None).state == "none"
    running = TrainingStatus.from_task(
        {"status": "RUNNING", "start_ts": "10:00", "details": ["[t] [1] [Main] [INFO] (x:1) - epoch 1 loss 2.0"]}
    )
    assert running.running
    assert running.message.endswith("you can keep working. Last log line: epoch 1 loss 2.0")
    kept = TrainingStatus.from_task(
        {
            "status": "DONE",
            "end_ts": "10:05",
            "details": [
                '[t] [1] [Main] [INFO] (x:1) - Result: {"published": false, "val_mean_dice": 0.61, '
                '"not_published_because": "validation Dice 0.61 < current model\'s 0.99"}'
            ],
        }
    )
    assert not kept.running
    assert kept.message == (
        "Fine-tuning finished at 10:05. The served model was kept (validation Dice 0.610): "
        "validation Dice 0.61 < current model's 0.99."
    )
    published = TrainingStatus.from_task({"status": "DONE", "details": ['Result: {"published": true}']})
    assert "The new model is now served" in published.message
    assert "failed" in TrainingStatus.from_task({"status": "ERROR"}).message


def test_steps_out_of_order_say_what_to_do_first(tmp_path, phantom):
    wf = Workflow(tmp_path, client_id="t")
    with pytest.raises(NotConnectedError, match="Connect to the server first"):
        wf.next_case()
    with pytest.raises(NotConnectedError):
        wf.submit(Volume(phantom.label, phantom.affine))
    assert wf.connection_summary() == "Not connected."
    wf.client, wf.labels = object(), object()  # type: ignore[assignment]  # connected, but no case opened
    with pytest.raises(NoCaseError, match="Open a case first"):
        wf.segment()
