"""``fetal-fl privacy ...`` sub-commands (through ``register``, as fetal_fl/cli.py wires them)."""

from __future__ import annotations

import argparse

import pytest

from privacy.cli import EXIT_ERROR, EXIT_OVER_BUDGET, register
from privacy.ledger import SiteLedger


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fetal-fl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize(
    "argv",
    [
        ["privacy"],
        ["privacy", "ledger"],
        ["privacy", "ledger", "init"],
        ["privacy", "ledger", "show"],
        ["privacy", "ledger", "set-budget"],
        ["privacy", "ledger", "check"],
        ["privacy", "epsilon"],
        ["privacy", "noise"],
    ],
)
def test_every_sub_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run([*argv, "--help"])
    assert info.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_init_show_set_budget_check(ledger_path, capsys):
    assert (
        run(["privacy", "ledger", "init", str(ledger_path), "--epsilon", "8", "--delta", "1e-4", "--site", "s1"]) == 0
    )
    SiteLedger(ledger_path).record(job_id="job-1", dataset_id="feta", epsilon=5.0, delta=1e-5, round=3)
    capsys.readouterr()
    assert run(["privacy", "ledger", "show", str(ledger_path)]) == 0
    out = capsys.readouterr().out
    assert "| feta | 8 | 5 | 0 | 3 |" in out and "job-1" in out
    assert (
        run(["privacy", "ledger", "check", str(ledger_path), "--dataset", "feta", "--epsilon", "4", "--delta", "1e-5"])
        == EXIT_OVER_BUDGET
    )
    assert "REFUSED" in capsys.readouterr().out
    assert (
        run(
            [
                "privacy",
                "ledger",
                "set-budget",
                str(ledger_path),
                "--dataset",
                "feta",
                "--epsilon",
                "10",
                "--delta",
                "1e-4",
                "--note",
                "ethics approval 2026-12",
            ]
        )
        == 0
    )
    assert (
        run(["privacy", "ledger", "check", str(ledger_path), "--dataset", "feta", "--epsilon", "4", "--delta", "1e-5"])
        == 0
    )
    assert "OK" in capsys.readouterr().out


def test_missing_or_corrupt_ledger_is_a_clear_error(ledger_path, capsys):
    assert run(["privacy", "ledger", "show", str(ledger_path)]) == EXIT_ERROR
    assert "no privacy ledger" in capsys.readouterr().err
    ledger_path.parent.mkdir(parents=True)
    ledger_path.write_text("{broken\n")
    assert run(["privacy", "ledger", "show", str(ledger_path)]) == EXIT_ERROR
    assert "not JSON" in capsys.readouterr().err
    assert run(["privacy", "ledger", "init", str(ledger_path), "--epsilon", "8", "--delta", "1e-4"]) == EXIT_ERROR
    assert "already exists" in capsys.readouterr().err


def test_epsilon_and_noise_calculators(capsys):
    assert (
        run(["privacy", "epsilon", "--noise", "1.0", "--sample-rate", "0.05", "--steps", "1000", "--delta", "1e-5"])
        == 0
    )
    assert "ε = 10.99" in capsys.readouterr().out  # the default accountant is PRV (RDP: 11.9)
    args = ["--noise", "1.0", "--sample-rate", "0.05", "--steps", "1000", "--delta", "1e-5", "--accountant", "rdp"]
    assert run(["privacy", "epsilon", *args]) == 0
    assert "ε = 11.9" in capsys.readouterr().out
    noise = ["--target-epsilon", "6", "--sample-rate", "0.05", "--steps", "1000", "--delta", "1e-5"]
    assert run(["privacy", "noise", *noise, "--accountant", "rdp"]) == 0
    assert "σ = 1.5" in capsys.readouterr().out
    assert (
        run(["privacy", "epsilon", "--noise", "-1", "--sample-rate", "0.05", "--steps", "10", "--delta", "1e-5"])
        == EXIT_ERROR
    )


def test_accountant_choices_match_the_accounting_module():
    from privacy import accounting, cli

    assert cli.ACCOUNTANTS == accounting.ACCOUNTANTS
