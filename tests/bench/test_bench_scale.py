"""bench/bench_scale.py: what it reads from the simulator's logs and audit trail (no simulation here: fast)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "bench" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


scale = _load()

SERVER_LOG = """\
2026-12-03 14:16:27,207 - FetalFedAvg - INFO - [identity=simulator_server] -
--------------------------------------------------------------------------------
                                Round 0 started.
--------------------------------------------------------------------------------
2026-12-03 14:16:32,889 - _Transaction - INFO - [server] download tx T1 done: status=finished elapsed=0.83s size=2.3MB (2,449,746 bytes)
2026-12-03 14:16:56,426 - function - INFO - [client] download ref=r1 done: elapsed=0.09s size=2.3MB (2,449,746 bytes)
2026-12-03 14:16:57,000 - FetalFedAvg - INFO - [identity=simulator_server] - round 0: aggregating updates from all 1 sites
2026-12-03 14:17:00,000 - FetalFedAvg - INFO - [identity=simulator_server] -
                                Round 1 started.
2026-12-03 14:17:10,000 - function - INFO - [client] download ref=r2 done: elapsed=0.09s size=2.3MB (2,449,746 bytes)
2026-12-03 14:18:10,000 - FetalFedAvg - WARNING - [identity=simulator_server] - round 1: continuing with 1 of 2 sites ['site-1']; no valid update from ['site-2'] (min_clients=1 allows it)
"""  # noqa: E501


def test_rounds_are_read_from_the_banner_to_the_aggregation_line() -> None:
    windows = scale.round_windows(SERVER_LOG)
    assert [w["round"] for w in windows] == [0, 1]
    assert windows[0]["seconds"] == pytest.approx(29.793)
    assert [w["closed"] for w in windows] == ["aggregating", "continuing"]
    assert "no valid update from ['site-2']" in windows[1]["message"]


def test_bytes_per_round_come_from_nvflare_logs_and_the_audit_trail(tmp_path: Path) -> None:
    (tmp_path / "server" / "audit").mkdir(parents=True)
    (tmp_path / "site-1").mkdir()
    (tmp_path / "server" / "log.txt").write_text(SERVER_LOG)
    (tmp_path / "site-1" / "log.txt").write_text(
        "2026-12-03 14:16:56,499 - Communicator - INFO - SubmitUpdate to: server. size: 10KB (10019 Bytes). time: 0.1\n"
    )
    audit = [{"round": 0, "site": "site-1", "bytes": 2425984, "time": 1.0}, {"round": 1, "site": "site-1", "bytes": 7}]
    (tmp_path / "server" / "audit" / "received.jsonl").write_text("\n".join(json.dumps(a) for a in audit) + "\n{torn")
    got = scale.per_round_bytes(tmp_path, scale.round_windows(SERVER_LOG), ["site-1"])
    assert got[0] == {
        "received_stream": 2449746,
        "received_envelope": 10019,
        "sent_stream": 2449746,
        "audit_payload": 2425984,
        "audit_updates": 1,
        "streams_received": 1,
    }
    assert got[1]["received_stream"] == 2449746 and got[1]["received_envelope"] == 0 and got[1]["audit_payload"] == 7


def test_the_wait_for_dead_sites_is_measured_from_the_last_update_and_from_min_clients() -> None:
    windows = [{"round": 0, "start": 100.0, "end": 200.0, "seconds": 100.0, "closed": "continuing", "message": "m"}]
    arrivals = {0: [(110.0, "site-1"), (130.0, "site-3"), (140.0, "site-4")]}
    deaths = [{"site": "site-2", "round": 0, "time": 120.0}]
    (row,) = scale.waits(windows, arrivals, 2, deaths)
    assert row["updates"] == 3 and row["sites_died"] == 1
    assert row["min_clients_reached_s"] == 30.0 and row["waited_after_min_clients_s"] == 70.0
    assert row["waited_after_last_update_s"] == 60.0 and row["waited_after_last_death_s"] == 80.0


@pytest.mark.parametrize(("dead", "sites", "threads"), [(3, 30, 5), (1, 4, 3), (3, 4, 4), (0, 10, 2)])
def test_the_fault_run_gives_each_frozen_site_a_thread_and_two_to_the_survivors(dead, sites, threads) -> None:
    assert scale.fault_threads(dead, sites) == threads


def test_the_dying_site_script_compiles_and_wraps_the_production_client() -> None:
    compile(scale.DYING_CLIENT, "dying_client.py", "exec")
    assert "client.main(rest)" in scale.DYING_CLIENT and "SIGSTOP" in scale.DYING_CLIENT


def test_the_job_config_is_valid_for_the_project_job(tmp_path: Path) -> None:
    from nvflare_jobs.config import JobConfig

    args = scale.argparse.Namespace(rounds=2, seed=0, straggler_wait=60, task_timeout=0)
    cfg = JobConfig.from_dict(scale.job_config(30, tmp_path, args, "s", min_clients=25))
    assert len(cfg.sites) == 30 and cfg.min_clients == 25 and not cfg.external_process
    assert cfg.max_steps_per_epoch == 1 and cfg.num_rounds == 2


@pytest.mark.parametrize("threads", [0, 4])
def test_run_simulation_refuses_a_thread_count_outside_one_to_the_sites(tmp_path: Path, threads: int) -> None:
    from nvflare_jobs.fetal_brain.job import run_simulation

    args = scale.argparse.Namespace(rounds=1, seed=0, straggler_wait=60, task_timeout=0)
    with pytest.raises(ValueError, match="num_threads"):
        run_simulation(scale.job_config(3, tmp_path, args, "s"), tmp_path / "ws", num_threads=threads)
    assert not (tmp_path / "ws").exists()  # refused before the simulator started
