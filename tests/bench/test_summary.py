"""bench/summary.py: the headline table of docs/benchmarks.md is computed from the results, verdicts included."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"


def _load():
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location("bench_summary", REPO / "bench" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


summary = _load()


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_every_committed_result_has_a_summary_with_verdicts(path: Path) -> None:
    rows = summary.summarize(path.stem, path)
    assert rows, f"{path.name} gives no headline row"
    assert all(r.verdict in ("met", "not met", "–") for r in rows)
    assert all(r.goal == "–" or r.verdict != "–" for r in rows), "a row with a goal must have a verdict"


def _infer(tmp_path: Path, infer_s: float, sw_s: float) -> Path:
    row = {"roi": 48, "overlap": 0.25, "grid": [65, 65, 65], "sw_s": sw_s, "local_s": infer_s * 0.9, "infer_s": infer_s}
    path = tmp_path / "infer.json"
    path.write_text(json.dumps({"rows": [row], "peak_rss": 2**30}))
    return path


@pytest.mark.parametrize(("infer_s", "verdict"), [(0.6, "met"), (0.625, "met"), (0.63, "not met"), (1.2, "not met")])
def test_the_verdict_follows_the_numbers(tmp_path: Path, infer_s: float, verdict: str) -> None:
    rows = summary.summarize("infer", _infer(tmp_path, infer_s, 0.5))
    assert rows[0].verdict == verdict and rows[0].goal == "≤ 1.25×"
    assert f"{infer_s / 0.5:.2f}×" in rows[0].result


def test_fedavg_schedule_is_met_only_when_every_seed_is_within_the_goal(tmp_path: Path) -> None:
    def res(method, seed, dice, le=None):
        return {"method": method, "budget": 240, "local_epochs": le, "seed": seed, "dice": dice}

    results = [res("centralized", 0, 0.85), res("centralized", 1, 0.86)]
    results += [res("fedavg", 0, 0.845, 6), res("fedavg", 1, 0.845, 6)]  # seed 1: -0.015
    results += [res("fedavg", 0, 0.80, 2), res("fedavg", 1, 0.80, 2)]
    path = tmp_path / "fl_schedule.json"
    path.write_text(json.dumps({"results": results}))
    (row,) = summary.summarize("fl_schedule", path)
    assert row.verdict == "not met" and "40 rounds × 6" in row.measure
    results[3]["dice"] = 0.855
    path.write_text(json.dumps({"results": results}))
    assert summary.summarize("fl_schedule", path)[0].verdict == "met"


def test_an_unexpected_layout_is_an_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fl.json"
    path.write_text(json.dumps({"utility": []}))
    with pytest.raises(ValueError, match=r"fl\.json"):
        summary.summarize("fl", path)
