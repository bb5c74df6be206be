"""Secure aggregation in POC mode for real (``nvflare poc``: separate server and site processes, TLS-authenticated
connections, all on 127.0.0.1): one short job completes, the sum is unmasked, and what the server received from
each site is masked (uint32, unrelated to the site's update: the site's step count no longer arrives)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nvflare_jobs.deploy import PocFederation, allow_project_components, running
from tests.nvflare_jobs.conftest import SITES

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

SECURE = {"secure_aggregation": {"enabled": True, "threshold": 2}}
RECORDER = "tests.nvflare_jobs.received.ReceivedRecorder"


class RecordingPocFederation(PocFederation):
    """POC whose server kit also admits the test's recorder of received payloads."""

    def _configure_kits(self) -> None:
        super()._configure_kits()
        allow_project_components(self.kit(self.server_name), [RECORDER])


@pytest.fixture(scope="module")
def poc_job(
    tmp_path_factory, federation: Path, make_config, fl_env: dict
) -> Iterator[tuple[PocFederation, str, str, Path]]:
    from nvflare_jobs.fetal_brain.job import build_recipe
    from tests.nvflare_jobs.received import ReceivedRecorder

    root = tmp_path_factory.mktemp("secagg_poc")
    config = make_config(name="poc_secagg", num_rounds=1, cross_site_eval=False, tracking=None, server=SECURE)
    recipe = build_recipe(config)
    recipe.add_server_input_filter(ReceivedRecorder(str(root / "received.jsonl"), arrays=True), tasks=["train"])
    recipe.export(job_dir=str(root / "jobs"))
    env = {**fl_env, "FETALFL_DATA_ROOT": str(federation)}
    fed = RecordingPocFederation(root / "poc", sites=SITES, env=env)
    with running(fed) as poc:
        job_id = poc.submit(root / "jobs" / config["name"])
        status = poc.wait(job_id, timeout=400)
        yield poc, job_id, status, root
    assert fed.processes() == [], "processes of the POC system survived poc stop"


def test_poc_job_completes_and_the_server_receives_only_masked_payloads(poc_job) -> None:
    from tests.nvflare_jobs.received import read_received

    poc, job_id, status, root = poc_job
    assert status == "FINISHED:COMPLETED"
    result = poc.download(job_id, root / "download")  # the server's job workspace, with its log
    (final,) = result.rglob("FL_global_model.pt")
    log = (final.parent.parent / "log.txt").read_text()
    assert "unmasked the sum of 3 masked updates" in log
    rows = read_received(root / "received.jsonl", updates_only=True)
    assert sorted(r["site"] for r in rows) == SITES  # each site's update arrived once, under its TLS identity
    for r in rows:
        assert "NUM_STEPS_CURRENT_ROUND" not in r["meta"]  # the weight travels masked
        arrays = np.load(root / f"{r['site']}_round0.npz")
        values = np.concatenate([arrays[k].ravel() for k in arrays.files])
        assert values.dtype == np.uint32
        # masked: uniform over [0, 2^32), not fixed-point values near 0 (|Δ| < 1 would sit within 2^16 of 0 or 2^32)
        signed = values.view(np.int32).astype(np.float64)
        assert np.mean(np.abs(signed) > 2**20) > 0.99
        assert abs(np.mean(values / 2.0**32) - 0.5) < 0.01
