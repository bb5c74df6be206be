"""The audit trail of what leaves each site: digest, fsynced records that survive a crash, the CLI, and a real
simulator job whose site records match the hashes the server received."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants

from nvflare_jobs.audit import SiteAuditFilter, append_record, payload_digest, read_records

REPO = Path(__file__).resolve().parents[2]


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"b.weight": rng.normal(size=(3, 4)).astype(np.float32), "a.bias": rng.normal(size=5).astype(np.float32)}


def test_digest_is_canonical_and_sensitive_to_one_bit():
    params = _update()
    sha, size = payload_digest(params)
    assert size == (12 + 5) * 4
    assert payload_digest(dict(reversed(list(params.items())))) == (sha, size)  # key order does not matter
    assert payload_digest({k: torch.from_numpy(v) for k, v in params.items()})[0] == sha  # torch == numpy
    flipped = {k: v.copy() for k, v in params.items()}
    flipped["a.bias"].view(np.uint32)[0] ^= 1
    assert payload_digest(flipped)[0] != sha
    assert payload_digest({k: v.astype(np.float64) for k, v in params.items()})[0] != sha  # dtype is hashed


def _ctx(site: str = "site-1", rnd: int = 3) -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, "job-42", private=False, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=False, sticky=False)
    return ctx


def test_site_filter_records_chain_epsilon_bytes_and_hash(tmp_path):
    chain = [
        {"type": "client_dp", "path": None, "args": {"clip_norm": 1.0}, "sites": ["site-1"], "tasks": ["train"]},
        {"type": "percentile", "path": None, "args": {"percentile": 90}, "sites": ["site-2"], "tasks": ["train"]},
    ]
    audit = SiteAuditFilter(chain=chain, audit_dir=str(tmp_path))
    meta = {"dp_sgd": {"epsilon": 2.5, "delta": 1e-5}}
    shareable = DXO(DataKind.WEIGHT_DIFF, data=_update(), meta=meta).to_shareable()
    out = audit.process(shareable, _ctx())
    assert out is shareable  # unchanged
    (record,) = read_records(tmp_path / "updates.jsonl")
    assert record["job"] == "job-42" and record["round"] == 3 and record["site"] == "site-1"
    assert [f["type"] for f in record["filters"]] == ["client_dp"]  # only this site's part of the chain
    assert record["filters"][0]["args"] == {"clip_norm": 1.0}
    assert record["epsilon"] == 2.5 and record["delta"] == 1e-5
    assert (record["sha256"], record["bytes"]) == payload_digest(_update())


def test_records_survive_a_killed_process_and_a_torn_line(tmp_path):
    """Each record is fsynced when written: SIGKILL right after leaves every earlier record readable."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from nvflare_jobs.audit import append_record
for r in range(3):
    append_record(__import__("pathlib").Path({str(tmp_path / "updates.jsonl")!r}), {{"job": "j", "round": r}})
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == -signal.SIGKILL
    with open(tmp_path / "updates.jsonl", "a") as f:
        f.write('{"job": "j", "round": 3, "sha')  # a crash in the middle of a write
    assert [r["round"] for r in read_records(tmp_path / "updates.jsonl", job="j")] == [0, 1, 2]


def test_cli_fl_audit_prints_one_line_per_record(tmp_path, capsys):
    import argparse

    from nvflare_jobs.cli import register

    path = tmp_path / "updates.jsonl"
    for job, rnd in (("a", 0), ("a", 1), ("b", 0)):
        append_record(path, {"job": job, "round": rnd, "site": "site-1", "bytes": 10, "sha256": "f" * 64})
    parser = argparse.ArgumentParser(prog="fetal-fl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fl", "audit", str(path), "--job", "a"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert "2 record(s) of job a" in out and out.count("ffffffffffff") == 2
    args = parser.parse_args(["fl", "audit", str(path), "--json"])
    assert args.handler(args) == 0
    assert len([json.loads(line) for line in capsys.readouterr().out.splitlines()]) == 3


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(400)
def test_simulated_job_site_records_match_what_the_server_received(tmp_path, make_config, fl_env):
    from nvflare_jobs.fetal_brain.job import run_simulation

    config = make_config(
        sites=["site-1", "site-2"],
        num_rounds=2,
        cross_site_eval=False,
        tracking=None,
        privacy={"filters": [{"type": "fail_closed_percentile", "percentile": 50, "gamma": 1.0}], "dp_sgd": None},
    )
    run = run_simulation(config, tmp_path / "sim")
    sent = [r for p in sorted(run.rglob("updates.jsonl")) for r in read_records(p)]
    (received_file,) = list(run.rglob("received.jsonl"))
    received = read_records(received_file)
    assert len(sent) == 4 and len(received) == 4  # 2 sites x 2 rounds
    key = lambda r: (r["site"], r["round"])  # noqa: E731
    assert {key(r): r["sha256"] for r in sent} == {key(r): r["sha256"] for r in received}
    assert {key(r): r["bytes"] for r in sent} == {key(r): r["bytes"] for r in received}
    for record in sent:
        assert record["job"] == received[0]["job"] and record["filters"][0]["type"] == "fail_closed_percentile"
        assert record["filters"][0]["args"] == {"percentile": 50, "gamma": 1.0}
        assert record["filter_reports"] and record["bytes"] > 0
