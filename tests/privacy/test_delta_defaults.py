"""One δ per site everywhere (issue 24): 1e-5 in the engine's defaults, the job configs, the demo, the benchmarks'
defaults and the report."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def test_the_dp_engines_default_delta() -> None:
    from privacy.dpsgd import DPSGDConfig
    from privacy.filters import ClientDPConfig

    assert DPSGDConfig(noise_multiplier=1.0).delta == DELTA
    assert ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0).delta == DELTA


@pytest.mark.parametrize("script", ["bench_attacks.py", "bench_privacy_utility.py"])
def test_benchmarks_default_to_the_one_delta(script: str) -> None:
    tree = ast.parse((REPO / "bench" / script).read_text(encoding="utf-8"))
    defaults = [
        kw.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
        if node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "--delta"
        for kw in node.keywords
        if kw.arg == "default"
    ]
    assert defaults == [DELTA]


def _deltas(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "delta"] + [d for v in obj.values() for d in _deltas(v)]
    if isinstance(obj, list):
        return [d for v in obj for d in _deltas(v)]
    return []


def test_every_shipped_job_config_uses_the_one_delta() -> None:
    files = [
        REPO / "nvflare_jobs/fetal_brain/config.json",
        *sorted((REPO / "nvflare_jobs/fetal_brain/configs").glob("*.json")),
    ]
    found = [d for f in files for d in _deltas(json.loads(f.read_text(encoding="utf-8")))]
    assert found and all(d == DELTA for d in found)


def test_the_demo_plans_the_one_delta() -> None:
    from fetal_fl.demo import dp_plan

    assert dp_plan(["site-1", "site-2", "site-3"])["delta"] == DELTA


def test_the_report_labels_epsilon_with_the_runs_delta() -> None:
    from fetal_fl.report import _run_delta

    assert _run_delta(SimpleNamespace(job_config={"privacy": {"dp_sgd": {"target_epsilon": 8.0}}})) == DELTA
    assert _run_delta(SimpleNamespace(job_config={"privacy": {"dp_sgd": {"delta": 1e-6}}})) == 1e-6
