"""The site ledger: budgets, spends across jobs, crash safety, and never silently resetting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from privacy.ledger import (
    LedgerCorruptError,
    LedgerError,
    LedgerNotFoundError,
    PrivacyBudgetExceeded,
    SiteLedger,
)


@pytest.fixture
def ledger(ledger_path) -> SiteLedger:
    return SiteLedger.init(ledger_path, epsilon_budget=10.0, delta_budget=1e-4, site="site-1")


def test_missing_ledger_is_an_error_not_zero_spent(ledger_path):
    with pytest.raises(LedgerNotFoundError, match="never created implicitly") as info:
        SiteLedger(ledger_path)
    assert "ledger init" in str(info.value)
    assert not ledger_path.exists()


def test_init_never_overwrites(ledger, ledger_path):
    ledger.record(job_id="j1", dataset_id="d", epsilon=3.0, delta=1e-5, round=0)
    with pytest.raises(LedgerError, match="already exists"):
        SiteLedger.init(ledger_path, epsilon_budget=100.0, delta_budget=1e-3)
    assert SiteLedger(ledger_path).spent("d").epsilon == 3.0


@pytest.mark.parametrize(("eps", "delta"), [(0.0, 1e-5), (-1.0, 1e-5), (float("inf"), 1e-5), (1.0, 0.0), (1.0, 1.0)])
def test_init_rejects_bad_budgets(ledger_path, eps, delta):
    with pytest.raises(ValueError):
        SiteLedger.init(ledger_path, epsilon_budget=eps, delta_budget=delta)
    assert not ledger_path.exists()


def test_spend_sums_over_jobs_and_takes_each_jobs_latest_cumulative_epsilon(ledger):
    ledger.record(job_id="j1", dataset_id="d", epsilon=1.0, delta=1e-5, round=0)
    ledger.record(job_id="j1", dataset_id="d", epsilon=2.5, delta=1e-5, round=1)
    ledger.record(job_id="j2", dataset_id="d", epsilon=1.5, delta=1e-5, round=0)
    ledger.record(job_id="j3", dataset_id="other", epsilon=9.0, delta=1e-5, round=0)
    spent = SiteLedger(ledger.path).spent("d")
    assert spent.epsilon == pytest.approx(4.0)
    assert spent.delta == pytest.approx(2e-5)
    assert spent.jobs["j1"] == (2.5, 1e-5, 1)


def test_check_budget_refuses_with_budget_spent_and_asked(ledger):
    ledger.record(job_id="j1", dataset_id="d", epsilon=7.0, delta=1e-5, round=3)
    ledger.check_budget(dataset_id="d", planned_epsilon=3.0, delta=1e-5)  # 7 + 3 = 10 fits exactly
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.check_budget(dataset_id="d", planned_epsilon=3.5, delta=1e-5)
    msg = str(info.value)
    assert "budget ε=10" in msg and "spent ε=7" in msg and "asks ε=3.5" in msg
    assert info.value.budget_epsilon == 10.0 and info.value.spent_epsilon == 7.0 and info.value.asked_epsilon == 3.5


def test_check_budget_counts_delta_too(ledger):
    for i in range(9):
        ledger.record(job_id=f"j{i}", dataset_id="d", epsilon=0.1, delta=1e-5, round=0)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.check_budget(dataset_id="d", planned_epsilon=0.1, delta=2e-5)


def test_resumed_job_is_not_counted_twice(ledger):
    ledger.record(job_id="j1", dataset_id="d", epsilon=6.0, delta=1e-5, round=4)
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.check_budget(dataset_id="d", planned_epsilon=8.0, delta=1e-5)
    ledger.check_budget(dataset_id="d", planned_epsilon=8.0, delta=1e-5, job_id="j1")  # its plan covers its 6


def test_budget_already_exceeded_refuses_any_job(ledger):
    ledger.set_budget(dataset_id="d", epsilon_budget=1.0, delta_budget=1e-4, note="tightened by the DPO")
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.record(job_id="j1", dataset_id="d", epsilon=1.5, delta=1e-5, round=0)
    # the spend is recorded even though it crossed the budget: it happened
    assert SiteLedger(ledger.path).spent("d").epsilon == 1.5
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.check_budget(dataset_id="d", planned_epsilon=0.01, delta=1e-6)


def test_set_budget_is_per_dataset_and_appended(ledger):
    ledger.set_budget(dataset_id="d", epsilon_budget=3.0, delta_budget=1e-5)
    assert ledger.budget("d").epsilon == 3.0
    assert ledger.budget("other").epsilon == 10.0
    kinds = [r["type"] for r in SiteLedger(ledger.path).records]
    assert kinds == ["init", "budget"]


def test_a_crashed_job_still_counts(ledger):
    """The spend of a job that dies right after recording survives (append + fsync before returning)."""
    script = textwrap.dedent(
        f"""
        import os
        from privacy.ledger import SiteLedger
        SiteLedger({str(ledger.path)!r}).record(job_id="crashy", dataset_id="d", epsilon=4.0, delta=1e-5, round=2)
        os._exit(9)  # no clean shutdown, no flush at exit
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(_repo_root()), capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    assert SiteLedger(ledger.path).spent("d").jobs["crashy"] == (4.0, 1e-5, 2)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("", "empty"),
        ("not json\n", "line 1 is not JSON"),
        ('{"type": "spend"}\n', "first record must be the 'init'"),
        (None, "line 2 is not JSON"),  # garbage appended
        (None, "incomplete"),  # torn last write
        (None, "bad epsilon"),
        (None, "unknown record type"),
    ],
)
def test_corrupt_ledger_is_an_error_never_a_reset(ledger, content, match):
    text = ledger.path.read_text()
    if content is None:
        content = {
            "line 2 is not JSON": text + "{{{\n",
            "incomplete": text + '{"type": "spend", "job_id": "j", "dat',
            "bad epsilon": text
            + json.dumps({"type": "spend", "job_id": "j", "dataset_id": "d", "epsilon": -1, "delta": 1e-5, "round": 0})
            + "\n",
            "unknown record type": text + json.dumps({"type": "refund", "epsilon": 5}) + "\n",
        }[match]
    ledger.path.write_text(content)
    with pytest.raises(LedgerCorruptError, match=match):
        SiteLedger(ledger.path)


def test_corruption_after_open_is_caught_before_the_next_check(ledger):
    ledger.path.write_text(ledger.path.read_text() + "oops\n")
    with pytest.raises(LedgerCorruptError):
        ledger.check_budget(dataset_id="d", planned_epsilon=1.0, delta=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": -0.1},
        {"epsilon": float("nan")},
        {"delta": 0.0},
        {"delta": 1.5},
        {"round": -1},
        {"round": True},
        {"job_id": ""},
        {"dataset_id": None},
    ],
)
def test_record_rejects_bad_values_and_writes_nothing(ledger, kwargs):
    before = ledger.path.read_text()
    args = {"job_id": "j", "dataset_id": "d", "epsilon": 1.0, "delta": 1e-5, "round": 0} | kwargs
    with pytest.raises(ValueError):
        ledger.record(**args)
    assert ledger.path.read_text() == before


@pytest.mark.parametrize("kwargs", [{"planned_epsilon": 0.0}, {"planned_epsilon": -1.0}, {"delta": 0.0}])
def test_check_budget_rejects_bad_values(ledger, kwargs):
    with pytest.raises(ValueError):
        ledger.check_budget(**({"dataset_id": "d", "planned_epsilon": 1.0, "delta": 1e-5} | kwargs))


def test_table_shows_budget_spent_remaining_and_jobs(ledger):
    ledger.record(job_id="job-7", dataset_id="feta-site1", epsilon=2.25, delta=1e-5, round=5)
    table = ledger.format_table()
    assert "| feta-site1 | 10 | 2.25 | 0 | 7.75 |" in table
    assert "| feta-site1 | job-7 | 2.25 | 1e-05 | 5 |" in table


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[2]


# -- reservations: concurrent jobs at one site ---------------------------------------------------------------------


def _reserve_in_child(path: str, job_id: str, epsilon: float, barrier, results, hold_s: float) -> None:
    """Child process: wait for the others, then reserve. The ledger's parser is slowed down (it runs between the
    read and the append) so that a check-then-append without one lock around both would let every child pass."""
    import time

    import privacy.ledger as ledger_mod

    parse = ledger_mod.SiteLedger._parse

    def slow_parse(self, text):
        records = parse(self, text)
        time.sleep(hold_s)
        return records

    ledger_mod.SiteLedger._parse = slow_parse
    lg = ledger_mod.SiteLedger(path)
    barrier.wait()
    try:
        lg.reserve(job_id=job_id, dataset_id="d", epsilon=epsilon, delta=1e-5)
        results.put((job_id, "ok"))
    except ledger_mod.PrivacyBudgetExceeded:
        results.put((job_id, "refused"))
    except Exception as exc:  # reported to the parent, which fails the test
        results.put((job_id, f"error: {exc!r}"))


@pytest.mark.parametrize(("n_jobs", "epsilon", "expected_ok"), [(2, 6.0, 1), (4, 4.0, 2)])
def test_concurrent_reservations_cannot_together_exceed_the_budget(ledger, n_jobs, epsilon, expected_ok):
    """Real processes, real file: each alone fits the budget of 10, together they do not; only what fits passes."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fresh interpreters: nothing shared but the ledger file
    barrier, results = ctx.Barrier(n_jobs), ctx.Queue()
    procs = [
        ctx.Process(target=_reserve_in_child, args=(str(ledger.path), f"job-{i}", epsilon, barrier, results, 0.3))
        for i in range(n_jobs)
    ]
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(outcomes.values()) == ["ok"] * expected_ok + ["refused"] * (n_jobs - expected_ok), outcomes
    after = SiteLedger(ledger.path)
    assert len(after.reservations("d")) == expected_ok
    assert after.dataset_status("d").committed_epsilon == pytest.approx(expected_ok * epsilon)
    assert after.dataset_status("d").committed_epsilon <= 10.0


def test_check_and_reserve_count_spent_plus_reserved(ledger):
    ledger.record(job_id="old", dataset_id="d", epsilon=2.0, delta=1e-5, round=9)
    ledger.reserve(job_id="running", dataset_id="d", epsilon=5.0, delta=1e-5)
    status = ledger.dataset_status("d")
    assert (status.spent.epsilon, status.reserved_epsilon, status.remaining_epsilon) == (2.0, 5.0, 3.0)
    ledger.check_budget(dataset_id="d", planned_epsilon=3.0, delta=1e-5)
    with pytest.raises(PrivacyBudgetExceeded) as info:
        ledger.check_budget(dataset_id="d", planned_epsilon=3.5, delta=1e-5)
    assert "spent ε=2" in str(info.value) and "ε=5" in str(info.value) and info.value.reserved_epsilon == 5.0
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve(job_id="other", dataset_id="d", epsilon=3.5, delta=1e-5)
    assert [r.job_id for r in SiteLedger(ledger.path).reservations()] == ["running"]  # the refusal wrote nothing


def test_a_job_spends_against_its_reservation_and_releases_the_rest(ledger):
    ledger.reserve(job_id="j", dataset_id="d", epsilon=6.0, delta=1e-5)
    ledger.record(job_id="j", dataset_id="d", epsilon=2.5, delta=1e-5, round=0)
    status = ledger.dataset_status("d")
    assert (status.spent.epsilon, status.reserved_epsilon) == (2.5, 3.5)  # spent within the reservation
    assert status.committed_epsilon == 6.0
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve(job_id="k", dataset_id="d", epsilon=4.5, delta=1e-5)
    assert ledger.release(job_id="j", dataset_id="d") == pytest.approx(3.5)
    status = SiteLedger(ledger.path).dataset_status("d")
    assert (status.spent.epsilon, status.reserved_epsilon, status.remaining_epsilon) == (2.5, 0.0, 7.5)
    ledger.reserve(job_id="k", dataset_id="d", epsilon=7.5, delta=1e-5)  # now it fits
    with pytest.raises(LedgerError, match="no reservation"):
        ledger.release(job_id="j", dataset_id="d")
    assert ledger.release(job_id="j", dataset_id="d", missing_ok=True) == 0.0


def test_spending_beyond_the_reservation_into_others_reservations_stops_the_job(ledger):
    ledger.reserve(job_id="a", dataset_id="d", epsilon=5.0, delta=1e-5)
    ledger.reserve(job_id="b", dataset_id="d", epsilon=5.0, delta=1e-5)
    ledger.record(job_id="a", dataset_id="d", epsilon=5.0, delta=1e-5, round=0)  # exactly its reservation
    with pytest.raises(PrivacyBudgetExceeded, match="over its privacy budget"):
        ledger.record(job_id="a", dataset_id="d", epsilon=5.5, delta=1e-5, round=1)
    assert SiteLedger(ledger.path).spent("d").jobs["a"][0] == 5.5  # written: it happened
    with pytest.raises(PrivacyBudgetExceeded):  # a job without a reservation cannot take what b holds either
        ledger.record(job_id="c", dataset_id="d", epsilon=0.1, delta=1e-5, round=0)


def test_a_restarted_job_re_reserves_without_counting_itself_twice(ledger):
    ledger.reserve(job_id="j", dataset_id="d", epsilon=8.0, delta=1e-5)
    ledger.record(job_id="j", dataset_id="d", epsilon=3.0, delta=1e-5, round=1)
    ledger.reserve(job_id="j", dataset_id="d", epsilon=8.0, delta=1e-5)  # same plan: nothing new written
    assert sum(r["type"] == "reserve" for r in SiteLedger(ledger.path).records) == 1
    ledger.reserve(job_id="j", dataset_id="d", epsilon=9.0, delta=1e-5)  # a larger plan replaces it if it fits
    assert [r.epsilon for r in SiteLedger(ledger.path).reservations("d")] == [9.0]
    with pytest.raises(PrivacyBudgetExceeded):
        ledger.reserve(job_id="j", dataset_id="d", epsilon=10.5, delta=1e-5)


def test_reservation_of_a_crashed_job_counts_until_an_admin_releases_it(ledger, capsys):
    from privacy.cli import EXIT_ERROR
    from tests.privacy.test_cli import run

    script = textwrap.dedent(
        f"""
        import os
        from privacy.ledger import SiteLedger
        lg = SiteLedger({str(ledger.path)!r})
        lg.reserve(job_id="crashy", dataset_id="d", epsilon=7.0, delta=1e-5)
        lg.record(job_id="crashy", dataset_id="d", epsilon=1.0, delta=1e-5, round=0)
        os._exit(9)  # killed mid-job: no release
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(_repo_root()), capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr
    after = SiteLedger(ledger.path)
    assert after.dataset_status("d").committed_epsilon == 7.0
    with pytest.raises(PrivacyBudgetExceeded):
        after.reserve(job_id="next", dataset_id="d", epsilon=4.0, delta=1e-5)
    capsys.readouterr()
    assert run(["privacy", "ledger", "show", str(ledger.path)]) == 0
    shown = capsys.readouterr().out
    assert "| d | 10 | 1 | 6 | 3 |" in shown
    assert "| d | crashy | 7 | 1e-05 | 1 | 6 |" in shown and "ledger release" in shown
    assert run(["privacy", "ledger", "release", str(ledger.path), "--dataset", "d", "--job", "nope"]) == EXIT_ERROR
    assert "no reservation" in capsys.readouterr().err
    argv = ["privacy", "ledger", "release", str(ledger.path), "--dataset", "d", "--job", "crashy", "--note", "died"]
    assert run(argv) == 0
    assert "ε=6 given back" in capsys.readouterr().out
    final = SiteLedger(ledger.path)
    assert final.dataset_status("d").committed_epsilon == 1.0  # what it spent still counts
    assert final.records[-1]["reason"] == "admin" and final.records[-1]["note"] == "died"
    final.reserve(job_id="next", dataset_id="d", epsilon=4.0, delta=1e-5)


def test_reserve_and_release_never_create_a_missing_ledger(ledger_path):
    lg = object.__new__(SiteLedger)
    lg.path = ledger_path
    with pytest.raises(LedgerNotFoundError):
        lg._transact(lambda: {"type": "budget", "dataset_id": "d", "epsilon_budget": 1.0, "delta_budget": 1e-5})
    assert not ledger_path.exists()


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "reserve", "job_id": "j", "dataset_id": "d", "epsilon": 0, "delta": 1e-5},
        {"type": "reserve", "job_id": "j", "dataset_id": "d", "epsilon": 1.0, "delta": 2},
        {"type": "reserve", "job_id": "", "dataset_id": "d", "epsilon": 1.0, "delta": 1e-5},
        {"type": "release", "job_id": "j"},
    ],
)
def test_corrupt_reservation_records_are_errors(ledger, bad):
    ledger.path.write_text(ledger.path.read_text() + json.dumps(bad) + "\n")
    with pytest.raises(LedgerCorruptError, match="line 2"):
        SiteLedger(ledger.path)
    with pytest.raises(LedgerCorruptError):
        ledger.reserve(job_id="k", dataset_id="d", epsilon=1.0, delta=1e-5)


@pytest.mark.parametrize("kwargs", [{"epsilon": 0.0}, {"epsilon": float("inf")}, {"delta": 1.0}, {"job_id": " "}])
def test_reserve_rejects_bad_values_and_writes_nothing(ledger, kwargs):
    before = ledger.path.read_text()
    with pytest.raises(ValueError):
        ledger.reserve(**({"job_id": "j", "dataset_id": "d", "epsilon": 1.0, "delta": 1e-5} | kwargs))
    assert ledger.path.read_text() == before
