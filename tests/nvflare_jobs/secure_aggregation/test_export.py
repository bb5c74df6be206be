"""The exported job with secure aggregation on: the secure controller and aggregator (FedAvg and FedOpt), the site
side in the right order (privacy filters, then the mask, then the audit record), and no server-side update guard
(a masked update has no meaningful norm: the guard runs at the site, before masking)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvflare_jobs.fetal_brain.job import export_job
from tests.nvflare_jobs.conftest import tiny_config

SECURE = {"secure_aggregation": {"enabled": True, "threshold": 2}}


def _configs(job: Path) -> tuple[dict, dict]:
    server = json.loads(next(job.rglob("config_fed_server.json")).read_text())
    client = json.loads(sorted(job.rglob("config_fed_client.json"))[0].read_text())
    return server, client


@pytest.mark.parametrize("algorithm", ["fedavg", "fedopt"])
def test_the_exported_job_masks_last_and_unmasks_only_the_sum(tmp_path: Path, algorithm: str) -> None:
    cfg = tiny_config(tmp_path, algorithm=algorithm, server=SECURE)
    cfg["privacy"]["filters"] = [{"type": "percentile", "percentile": 10, "gamma": 0.01}]
    job = export_job(cfg, tmp_path / "export")
    server, client = _configs(job)
    text = json.dumps(server)
    assert f"SecureFetal{'FedOpt' if algorithm == 'fedopt' else 'FedAvg'}" in text
    assert "nvflare_jobs.secure_aggregation.server.SecureAggregator" in text
    assert "UpdateGuard" not in text and "ServerAuditFilter" in text
    results = [f["path"] for chain in client["task_result_filters"] for f in chain["filters"]]
    order = [p.rsplit(".", 1)[-1] for p in results]
    assert order.index("PercentilePrivacy") < order.index("SecAggMaskFilter") < order.index("SiteAuditFilter")
    data = [f["path"].rsplit(".", 1)[-1] for chain in client["task_data_filters"] for f in chain["filters"]]
    assert "SecAggTaskCheck" in data
    executors = {e["executor"]["path"].rsplit(".", 1)[-1]: e["tasks"] for e in client["executors"]}
    assert executors["SecAggExecutor"] == ["secagg_setup", "secagg_unmask"]


def test_a_plain_job_keeps_the_server_guard_and_no_mask(tmp_path: Path) -> None:
    server, client = _configs(export_job(tiny_config(tmp_path), tmp_path / "export"))
    assert "UpdateGuard" in json.dumps(server) and "Secure" not in json.dumps(server)
    assert "SecAgg" not in json.dumps(client)
