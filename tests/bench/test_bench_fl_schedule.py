"""bench/bench_fl_schedule.py: extending a result table keeps what was measured and refuses other data."""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location("bench_fl_schedule", REPO / "bench" / "bench_fl_schedule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


schedule = _load()


def _args(out: Path, **changes) -> argparse.Namespace:
    base = {"cases": 10, "size": 64, "fedavg_via": "nvflare", "out": out}
    return argparse.Namespace(**(base | changes))


def _write(out: Path, results: list[dict], **args) -> None:
    out.with_suffix(".json").write_text(
        json.dumps({"args": {"cases": 10, "size": 64, "fedavg_via": "nvflare"} | args, "results": results})
    )


def test_extend_keeps_earlier_results_and_plans_only_what_is_missing(tmp_path: Path) -> None:
    out = tmp_path / "sched.md"
    earlier = schedule.plan([240], [6], [0], via="nvflare")
    _write(out, [r | {"dice": 0.8} for r in earlier])
    previous = schedule.load_previous(_args(out))
    assert [schedule._key(r) for r in previous] == [schedule._key(r) for r in earlier]
    done = {schedule._key(r) for r in previous}
    missing = [r for r in schedule.plan([240, 480], [6], [0], via="nvflare") if schedule._key(r) not in done]
    assert [(r["method"], r["budget"]) for r in missing] == [("centralized", 480), ("fedavg", 480)]


def test_extend_without_a_file_starts_empty(tmp_path: Path) -> None:
    assert schedule.load_previous(_args(tmp_path / "none.md")) == []


@pytest.mark.parametrize("change", [{"cases": 12}, {"size": 32}, {"fedavg_via": "local"}])
def test_extend_refuses_results_measured_on_other_data(tmp_path: Path, change: dict) -> None:
    out = tmp_path / "sched.md"
    _write(out, [])
    with pytest.raises(SystemExit, match="--extend"):
        schedule.load_previous(_args(out, **change))


def test_chosen_at_says_where_validation_chose_the_model() -> None:
    central = {"method": "centralized", "budget": 240, "best_epoch": 230}
    assert schedule.chosen_at(central) == "epoch 230 of 240"
    fed = {"method": "fedavg", "budget": 24, "local_epochs": 6, "val_mean_dice": [float("nan"), 0.1, 0.5, 0.4]}
    assert schedule.chosen_at(fed) == "after round 2 of 4"
    assert schedule.chosen_at(fed | {"val_mean_dice": []}) == "–"


def _row(method: str, seed: int, dice: float, heldout: float | None = None, le: int | None = None) -> dict:
    row = {"method": method, "budget": 480, "local_epochs": le, "seed": seed, "dice": dice, "seconds": 1.0}
    if method == "fedavg":
        row |= {"via": "nvflare", "dice_final": dice, "val_mean_dice": [0.1, 0.5]}
    if heldout is not None:
        row |= {"dice_heldout": heldout, "n_heldout": 66}
    return row


def test_the_goal_is_judged_on_all_held_out_cases_when_both_models_have_them() -> None:
    results = [_row("centralized", 0, 0.86, 0.85), _row("fedavg", 0, 0.848, 0.845, le=6)]  # test -0.012, all -0.005
    lines = schedule.table(results)
    assert "all held-out (66 cases)" in lines[0]
    fed = next(line for line in lines if line.startswith("| 480 | FedAvg"))
    assert "-0.0120" in fed and "-0.0050" in fed and "| met (66 held-out cases) |" in fed
    # a pair where one model was not scored on the extra cases falls back to the split's test cases
    results[0].pop("dice_heldout")
    fed = next(line for line in schedule.table(results) if line.startswith("| 480 | FedAvg"))
    assert "| not met (test cases) |" in fed
    # without any extra cases the table keeps its old columns
    plain = [_row("centralized", 0, 0.86), _row("fedavg", 0, 0.855, le=6)]
    assert "held-out" not in "\n".join(schedule.table(plain))


def test_redo_trains_again_only_the_chosen_method_and_keeps_the_old_rows_to_compare() -> None:
    planned = schedule.plan([240, 480], [6], [0], via="nvflare")
    previous = [r | {"dice": 0.8} for r in schedule.plan([240], [6], [0], via="nvflare")]
    runs, kept, redone = schedule.select_runs(planned, previous, redo="centralized")
    assert [(r["method"], r["budget"]) for r in runs] == [("centralized", 240), ("centralized", 480), ("fedavg", 480)]
    assert [(r["method"], r["budget"]) for r in kept] == [("fedavg", 240)]
    assert [k[:2] for k in redone] == [("centralized", 240)] and redone[schedule._key(planned[0])]["dice"] == 0.8
    runs, kept, redone = schedule.select_runs(planned, previous, redo=None)
    assert [(r["method"], r["budget"]) for r in runs] == [("centralized", 480), ("fedavg", 480)]
    assert len(kept) == 2 and not redone


def test_models_are_kept_by_run_name_and_a_missing_one_is_none(tmp_path: Path) -> None:
    planned = schedule.plan([480], [6], [0], via="nvflare")
    assert [schedule.run_name(r) for r in planned] == ["centralized_480_0", "fedavg_480_6_0"]
    assert schedule.model_path(planned[1], tmp_path, "final") == tmp_path / "models" / "fedavg_480_6_0_final.pt"
    assert schedule.load_model(planned[0], tmp_path) is None  # nothing kept: not scored, never invented
    assert schedule.load_model(planned[1], tmp_path, "final") is None


@pytest.mark.slow
def test_a_tiny_schedule_keeps_models_rescores_them_on_more_cases_and_checks_they_are_the_measured_ones(
    tmp_path: Path,
) -> None:
    script = REPO / "bench" / "bench_fl_schedule.py"
    out = tmp_path / "sched.md"
    base = [sys.executable, str(script), "--size", "32", "--cases", "4", "--budgets", "2", "--local-epochs", "1"]
    base += ["--work", str(tmp_path / "work"), "--out", str(out)]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], capture_output=True, text=True, cwd=REPO, timeout=600)

    first = run("--extra-test", "1", "--note", "first run")
    assert first.returncode == 0, first.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert {r["n_heldout"] for r in data["results"]} == {6}  # 3 test cases + 1 more per site
    assert sorted(p.name for p in (tmp_path / "work" / "models").iterdir()) == [
        "centralized_2_0_best.pt",
        "fedavg_2_1_0_best.pt",
        "fedavg_2_1_0_final.pt",
    ]
    assert "all held-out (6 cases)" in out.read_text()

    again = run("--extend", "--redo", "centralized", "--drop-note", "first", "--extra-test", "1")
    assert again.returncode == 0, again.stderr[-2000:]
    data = json.loads(out.with_suffix(".json").read_text())
    assert "first run" not in data["notes"]
    (note,) = data["notes"]
    assert "centralized_2_0 trained again" in note and "(reproduced)" in note  # same seed, same CPU: same model

    # a kept file that is not the measured model is caught when it is scored again, not silently used
    models = tmp_path / "work" / "models"
    (models / "centralized_2_0_best.pt").write_bytes((models / "fedavg_2_1_0_final.pt").read_bytes())
    for r in data["results"]:
        r.pop("dice_cases", None)
    out.with_suffix(".json").write_text(json.dumps(data))
    wrong = run("--extend", "--extra-test", "2")
    assert wrong.returncode != 0 and "not the model that was measured" in wrong.stderr
