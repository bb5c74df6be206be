"""bench/bench_load.py: the numbers behind its verdicts (percentiles, memory growth with and without the fine-tune's
samples) from synthetic inputs, the summary rows of its JSON, and a 5-second smoke run against a real server."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    sys.path.insert(0, str(REPO))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load("bench_load", REPO / "bench" / "bench_load.py")
summary = _load("bench_summary", REPO / "bench" / "summary.py")


def test_latency_percentiles_are_in_milliseconds_with_linear_interpolation() -> None:
    stats = bench.latency_stats([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ms"] == pytest.approx(50.5)
    assert stats["p95_ms"] == pytest.approx(95.05)
    assert stats["p99_ms"] == pytest.approx(99.01)
    assert stats["max_ms"] == pytest.approx(100.0)
    assert bench.latency_stats([]) == {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}


def test_route_table_counts_errors_apart_from_the_latencies_of_successes() -> None:
    records = [(0.0, "info", 0.010, None), (1.0, "info", 5.0, "HTTP 500"), (2.0, "infer", 1.0, None)]
    records += [(3.0, "train_status", 0.02, None)]
    ops = bench.route_table(records, elapsed=10.0)
    assert list(ops)[:4] == [op for op, _ in bench.MIX] and "train_status" in ops
    assert ops["info"]["ok"] == 1 and ops["info"]["errors"] == 1 and ops["info"]["error_kinds"] == ["HTTP 500"]
    assert ops["info"]["max_ms"] == pytest.approx(10.0)  # the failed request's 5 s is not a latency
    assert ops["infer"]["per_s"] == pytest.approx(0.1)
    assert ops["label"]["ok"] == 0 and ops["label"]["p95_ms"] is None
    windows = bench.per_window([*records, (61.0, "info", 0.5, None)], elapsed=70.0)
    assert [w["requests"] for w in windows] == [4, 1] and windows[0]["errors"] == 1
    assert windows[1]["p95_ms"] == {"info": pytest.approx(500.0)}


def _samples(seconds: int = 600, step: int = 2, base: float = 1000.0, slope: float = 0.0):
    return [(float(t), base + slope * t) for t in range(0, seconds + 1, step)]


def test_rss_growth_compares_the_first_and_last_minute_means() -> None:
    flat = bench.rss_growth(_samples(), window_s=60)
    assert flat["growth_pct"] == pytest.approx(0.0) and flat["n_first"] == 30 and flat["n_last"] == 30
    # +0.2 MB/s: first-minute mean 1000 + 0.2·29 = 1005.8, last-minute mean 1000 + 0.2·571 = 1114.2
    leak = bench.rss_growth(_samples(slope=0.2), window_s=60)
    assert leak["first"] == pytest.approx(1005.8) and leak["last"] == pytest.approx(1114.2)
    assert leak["growth_pct"] == pytest.approx(100 * 108.4 / 1005.8)


def test_a_fine_tune_in_the_last_minute_counts_unless_its_window_is_left_out() -> None:
    samples = [(t, v + (900.0 if 500 <= t <= 580 else 0.0)) for t, v in _samples()]  # a training child 500–580 s
    with_it = bench.rss_growth(samples, window_s=60)
    without = bench.rss_growth(samples, window_s=60, exclude=(500.0, 580.0))
    assert with_it["growth_pct"] > 10
    assert without["growth_pct"] == pytest.approx(0.0)
    assert without["n_last"] == 10  # the last minute by the clock: 582..600 s
    # a leak stays visible with the hole cut out
    leaky = [(t, v + (900.0 if 500 <= t <= 580 else 0.0)) for t, v in _samples(slope=0.3)]
    assert bench.rss_growth(leaky, window_s=60, exclude=(500.0, 580.0))["growth_pct"] > 10


def test_rss_growth_is_none_when_the_windows_would_overlap_or_are_empty() -> None:
    assert bench.rss_growth(_samples(seconds=100), window_s=60)["growth_pct"] is None
    assert bench.rss_growth([], window_s=60)["growth_pct"] is None
    assert bench.rss_growth(_samples(), window_s=60, exclude=(0.0, 600.0))["growth_pct"] is None


def _result(errors: int = 0, growth: float | None = 4.0, growth_without: float | None = 1.0) -> dict:
    def g(pct):
        return {"first": 1000.0, "last": None if pct is None else 1000.0 * (1 + pct / 100), "growth_pct": pct}

    ops = bench.route_table([(0.0, op, 0.1, None) for op, _ in bench.MIX], elapsed=600.0)
    return {
        "when": "2026-12-03 00:00 UTC",
        "machine": "x86_64, 2 cores",
        "load_average": {"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]},
        "command": "python bench/bench_load.py",
        "clients": 10,
        "seconds": 600.0,
        "window_s": 60.0,
        "sample_s": 2.0,
        "server": "own",
        "strategy": "random",
        "mix": dict(bench.MIX),
        "requests_per_s": 5.0,
        "errors": errors,
        "error_examples": {"info": ["HTTP 500 boom"]} if errors else {},
        "ops": ops,
        "per_minute": [{"from_s": 0.0, "requests": 4, "errors": errors, "p95_ms": {"info": 100.0}}],
        "training": {
            "params": {"time_budget_s": 240},
            "requested_at_s": 150.0,
            "ended_at_s": 420.0,
            "http_status": 200,
            "status": "DONE",
            "stopped_by_bench": False,
            "error": None,
            "errors": 0,
            "stats": None,
            "processes_left": 0,
        },
        "rss_mb": {
            "samples": [],
            "end": 1000.0,
            "peak": 2000.0,
            "peak_during_training": 2000.0,
            "peak_outside_training": 1100.0,
            "growth": {"total": g(growth), "total_without_training": g(growth_without), "server_process": g(0.5)},
            "goal_pct": 10.0,
        },
        "server_log_tracebacks": 0,
    }


@pytest.mark.parametrize(
    ("errors", "growth", "expected"),
    [(0, 9.9, ("met", "met")), (0, 10.1, ("met", "not met")), (3, 2.0, ("not met", "met")), (0, None, ("met", "–"))],
)
def test_verdicts_and_summary_rows_follow_the_numbers(tmp_path: Path, errors, growth, expected) -> None:
    result = _result(errors=errors, growth=growth)
    v = bench.verdicts(result)
    assert (v["errors"]["verdict"], v["rss_growth_total"]["verdict"]) == expected
    text = bench.markdown(result)
    assert "load average (1/5/15 min) before 1.0/1.0/1.0, after 2.0/2.0/2.0" in text and "shared" in text
    path = tmp_path / "load.json"
    path.write_text(json.dumps(result))
    rows = summary.summarize("load", path)
    assert [r.verdict for r in rows[:2]] == list(expected)
    assert rows[2].verdict == "met" and "left out" in rows[2].measure
    assert all(r.goal == "–" or r.verdict != "–" for r in rows)


@pytest.mark.integration
def test_smoke_run_against_a_real_server(tmp_path: Path) -> None:
    out = tmp_path / "load.md"
    assert bench.main(["--clients", "2", "--seconds", "5", "--out", str(out), "--no-plot"]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["errors"] == 0 and result["auth"] is True
    assert all(result["ops"][op]["ok"] > 0 for op, _ in bench.MIX), result["ops"]
    training = result["training"]
    assert training["http_status"] == 200 and training["status"] in {"DONE", "STOPPED"}
    assert training["processes_left"] == 0
    assert result["rss_mb"]["growth"]["total"]["growth_pct"] is not None
    assert summary.summarize("load", out.with_suffix(".json"))[0].verdict == "met"


def test_the_report_says_when_the_fine_tune_is_in_the_last_window() -> None:
    result = _result(growth=41.0, growth_without=2.0)
    result["training"]["ended_at_s"] = 568.0
    result["rss_mb"]["samples"] = [
        {"t": float(t), "main": 750.0, "children": 850.0 if 150 <= t <= 568 else 0.0} for t in range(0, 601, 2)
    ]
    notes = bench.reading(result)
    assert any("still running in the last window" in n and "14 of its 30 samples" in n for n in notes), notes
    assert any("up to 850 MB" in n for n in notes)
    result["training"]["ended_at_s"] = 420.0
    assert not any("last window" in n for n in bench.reading(result))
