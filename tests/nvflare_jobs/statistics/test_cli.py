"""`fetal-fl fl stats ...` (fast sub-commands; `stats run --sim` is what test_simulation exercises)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from nvflare_jobs.cli import register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fetal-fl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("argv", [["fl", "stats"], *[["fl", "stats", c] for c in ("plan", "run", "export", "show")]])
def test_every_stats_command_has_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        _run([*argv, "--help"])
    assert exc.value.code == 0 and "usage: fetal-fl" in capsys.readouterr().out


def test_plan_prints_releases_and_epsilon(capsys: pytest.CaptureFixture) -> None:
    assert _run(["fl", "stats", "plan"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["releases"]["stage 1"]) + len(plan["releases"]["stage 2"]) == 12
    assert 1.9 < plan["epsilon"] <= 2.0 and plan["delta"] == 1e-5 and "patient" in plan["privacy_unit"]


def test_export_writes_a_job_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run(["fl", "stats", "export", "--out", str(tmp_path)]) == 0
    assert (Path(capsys.readouterr().out.strip()) / "meta.json").is_file()


def test_bad_inputs_fail_fast_with_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sites": ["site-1"], "request": {"features": {}}}))
    with pytest.raises(ValueError, match="features"):
        _run(["fl", "stats", "plan", "--config", str(bad)])
    with pytest.raises(FileNotFoundError, match="no privacy ledger"):  # never created implicitly
        _run(["fl", "stats", "run", "--sim", "--workspace", str(tmp_path / "w"), "--ledger", str(tmp_path / "x")])
    with pytest.raises(ValueError, match="simulations only"):
        _run(["fl", "stats", "run", "--poc", "--workspace", str(tmp_path / "w"), "--no-ledger"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _run(["fl", "stats", "show", str(tmp_path / "missing.json")])
    assert not (tmp_path / "w").exists()  # refused before anything was written


@pytest.mark.parametrize("before", [None, "/elsewhere/ledger.jsonl"])
def test_run_leaves_the_ledger_variable_as_it_found_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, before: str | None
) -> None:
    """`stats run --ledger` sets the ledger variable for its job only: left set, a later job in the same process
    (CI's test session once) charged — or refused to charge — a ledger it was never given."""
    import os

    from fetalseg.site_env import ENV_PRIVACY_LEDGER
    from nvflare_jobs.statistics import cli
    from nvflare_jobs.statistics.job import StatisticsJobFailed
    from privacy.ledger import SiteLedger

    if before is None:
        monkeypatch.delenv(ENV_PRIVACY_LEDGER, raising=False)
    else:
        monkeypatch.setenv(ENV_PRIVACY_LEDGER, before)
    seen = []

    def refused(args: argparse.Namespace, cfg: object) -> None:
        seen.append(os.environ.get(ENV_PRIVACY_LEDGER))
        raise StatisticsJobFailed("refused at the sites")

    monkeypatch.setattr(cli, "_run_job", refused)  # the job itself is what test_simulation / test_poc run
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=10.0, delta_budget=1e-3)
    argv = ["fl", "stats", "run", "--sim", "--workspace", str(tmp_path / "w"), "--ledger", str(ledger.path)]
    assert _run(argv) == 1
    assert seen == [str(ledger.path.resolve())]  # the job saw this run's ledger ...
    assert os.environ.get(ENV_PRIVACY_LEDGER) == before  # ... and the process got its own value back
