"""bench/run_all.py: the one command that runs every benchmark and rewrites the benchmark page's generated section
(docs/benchmarks.md; the README keeps a short hand-picked table that links there)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "run_all.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_run_all", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_all = _load()


def test_every_benchmark_script_is_run_by_run_all() -> None:
    scripts = {p.name for p in (REPO / "bench").glob("bench_*.py")}
    listed = {script for script, _ in run_all.BENCHMARKS.values()}
    assert listed == scripts, f"bench scripts not in run_all.BENCHMARKS: {sorted(scripts - listed)}"


def test_the_section_between_the_markers_is_replaced_and_the_rest_kept() -> None:
    text = "# Title\n\nintro\n<!-- bench:start -->\nold table\n<!-- bench:end -->\n\n## After\n"
    new = run_all.replace_section(text, "| a | b |\n|---|---|\n| 1 | 2 |")
    assert "old table" not in new and "| 1 | 2 |" in new
    assert new.startswith("# Title\n\nintro\n<!-- bench:start -->\n")
    assert new.endswith("<!-- bench:end -->\n\n## After\n")
    assert run_all.replace_section(new, "x").count("<!-- bench:start -->") == 1  # idempotent markers


@pytest.mark.parametrize(
    "text", ["no markers at all", "<!-- bench:start --> only start", "<!-- bench:end -->\n<!-- bench:start -->"]
)
def test_a_page_without_proper_markers_is_an_error_not_a_rewrite(text: str) -> None:
    with pytest.raises(run_all.MarkerError):
        run_all.replace_section(text, "body")


def test_the_page_section_shows_the_title_and_first_table_of_each_result(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "alpha.md").write_text("# Alpha bench\n\ntext\n\n| k | v |\n|---|---|\n| x | 0.5 |\n\n| second | t |\n")
    (results / "beta.md").write_text("# Beta bench\n\nno table here\n")
    page = tmp_path / "benchmarks.md"
    page.write_text("top\n<!-- bench:start -->\nstale\n<!-- bench:end -->\nbottom\n")
    run_all.update_page(results, page=page)
    text = page.read_text()
    assert "stale" not in text and "top\n" in text and text.endswith("bottom\n")
    assert "**Alpha bench**" in text and "| x | 0.5 |" in text and "| second | t |" not in text
    assert "**Beta bench**" in text and "(no table)" in text


def test_unknown_benchmark_names_are_refused() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--only", "nonsense", "--no-readme"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


@pytest.mark.slow
def test_a_quick_run_writes_its_results_outside_the_reference_folder(tmp_path: Path) -> None:
    """A real smoke run of one benchmark: exit 0, a results table written to the quick folder, not bench/results."""
    reference = (REPO / "bench" / "results" / "baseline.md").read_text()
    codes = run_all.run(["baseline"], quick=True, out=tmp_path)
    assert codes == {"baseline": 0}
    written = (tmp_path / "baseline.md").read_text()
    assert "| site |" in written and "Dice" in written
    assert (REPO / "bench" / "results" / "baseline.md").read_text() == reference


def test_results_with_a_summary_become_rows_with_goals_and_the_rest_keep_their_table(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    row = {"roi": 48, "overlap": 0.25, "grid": [65, 65, 65], "sw_s": 0.5, "local_s": 1.0, "infer_s": 1.1}
    (results / "infer.json").write_text(json.dumps({"rows": [row], "peak_rss": 2**30}))
    (results / "infer.md").write_text("# Infer\n\n| stale | hand table |\n")
    (results / "other.md").write_text("# Other bench\n\n| k | v |\n|---|---|\n| x | 1 |\n")
    text = run_all.summarize_results(results)
    assert "| infer | /infer ÷ bare sliding window" in text and "2.20×" in text and "| ≤ 1.25× | not met |" in text
    assert "stale" not in text  # a summarized result is not repeated as its first table
    assert "**Other bench**" in text and "| x | 1 |" in text
    assert "[infer](" in text and "[other](" in text  # links to every full table


def test_the_generated_section_lives_in_docs_and_the_readme_links_to_it() -> None:
    assert run_all.PAGE == REPO / "docs" / "benchmarks.md"
    page = run_all.PAGE.read_text()
    assert page.count(run_all.START) == 1 and page.count(run_all.END) == 1
    readme = (REPO / "README.md").read_text()
    assert run_all.START not in readme  # the README keeps a short hand-picked table, not the generated one
    assert "docs/benchmarks.md" in readme


def test_links_are_relative_to_the_page_they_are_written_into() -> None:
    results = REPO / "bench" / "results"
    from_docs = run_all.summarize_results(results, base=REPO / "docs")
    assert "](../bench/results/baseline.md)" in from_docs
    assert "](bench/results/baseline.md)" in run_all.summarize_results(results)  # from the repository root
