"""A running inference does not freeze the server: /info/ and datastore reads answer while it runs.

Stock MONAI Label 0.8.5 runs /infer on the event loop, so GET /info/ waited 21 s behind a 256³ inference. Here the
proof does not rely on timings: /info/ reports how many inferences are running, so an /info/ answer that says
"1 running" can only have been produced while the inference was in progress.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import requests

from tests.apps.fetal_brain.conftest import BIG, MODEL

pytestmark = pytest.mark.integration

SLOW_PARAMS = {"sw_overlap": 0.75, "roi_size": 16}  # many small windows over the 128³ volume: a long inference


def test_info_answers_during_a_long_inference(server):
    outcome: dict = {}

    def infer() -> None:
        outcome["response"] = requests.post(
            f"{server.url}/infer/{MODEL}",
            params={"image": BIG, "output": "json"},
            data={"params": json.dumps(SLOW_PARAMS)},
            timeout=300,
        )

    worker = threading.Thread(target=infer)
    worker.start()
    seen_running = []
    datastore_answers = 0
    deadline = time.monotonic() + 240
    while worker.is_alive() and time.monotonic() < deadline:
        info = requests.get(f"{server.url}/info/", timeout=30).json()
        if info["inference"]["running"] >= 1:
            seen_running.append(info["inference"])
            datastore_answers += requests.get(f"{server.url}/datastore/", timeout=30).status_code == 200
            if len(seen_running) >= 3:
                break
        time.sleep(0.02)
    worker.join(timeout=300)
    assert outcome["response"].status_code == 200, outcome["response"].text
    assert len(seen_running) >= 3, "no /info/ answer arrived while the inference was running"
    assert datastore_answers >= 3
    assert server.info()["inference"] == {"running": 0, "queued": 0}


def test_concurrent_inferences_all_succeed(server):
    results: list[int] = []

    def infer(image: str) -> None:
        r = requests.post(f"{server.url}/infer/{MODEL}", params={"image": image, "output": "json"}, timeout=300)
        results.append(r.status_code)

    threads = [threading.Thread(target=infer, args=(name,)) for name in ("case02", "oblique", "permuted")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == [200, 200, 200]
