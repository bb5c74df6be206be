"""bench/bench_fl_schedule.py: extending a result table keeps what was measured and refuses other data."""

from __future__ import annotations

import argparse
import importlib.util
import json
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
