"""Run every benchmark and rewrite the benchmark page (``docs/benchmarks.md``) from their results.

    python bench/run_all.py              # full runs (hours on 2 cores), results in bench/results/, page updated
    python bench/run_all.py --quick      # smoke runs in minutes, results in bench/results/quick/, page updated
    python bench/run_all.py --only dp,infer --no-docs
    python bench/run_all.py --docs-only  # just rewrite the page from the results already there

The page's generated section lies between ``<!-- bench:start -->`` and ``<!-- bench:end -->``; it is replaced by
one table of headline measures with their goals and computed verdicts (``bench/summary.py``, from each
``<results>/*.json``), then the title and first table of any result it has no summary for, and links to every full
table: the page always shows what the scripts last measured. The README keeps a short hand-picked table of
headline numbers that links to the page.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [p for p in (str(HERE), str(REPO)) if p not in sys.path]

import summary  # noqa: E402  (bench/summary.py: the headline table)

RESULTS = HERE / "results"
PAGE = REPO / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# name -> (script, extra arguments for --quick). Only bench_fl.py has its own --quick; the others get small sizes.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "baseline": ("bench_baseline.py", ["--size", "32", "--cases", "4", "--variant", "tiny", "--minutes", "0.5",
                                        "--single-minutes", "0.25", "--epochs", "3"]),
    "dp": ("bench_dp.py", ["--size", "32", "--steps", "1", "--warmup", "1", "--rounds", "1"]),
    "fl": ("bench_fl.py", ["--quick"]),
    "fl_overhead": ("bench_fl_overhead.py", ["--size", "32", "--cases", "4", "--rounds", "2", "--local-epochs", "1"]),
    "fl_schedule": ("bench_fl_schedule.py", ["--size", "32", "--cases", "4", "--budgets", "2", "--local-epochs", "1"]),
    "infer": ("bench_infer.py", ["--size", "64", "--variant", "tiny", "--repeats", "1"]),
    "attacks": ("bench_attacks.py", ["--cases", "8", "--epochs", "3", "--inv-iterations", "10",
                                      "--dense-iterations", "10"]),
    "invert": ("bench_invert.py", ["--size", "64", "--repeats", "1"]),
    "load": ("bench_load.py", ["--clients", "2", "--seconds", "5"]),
    "privacy_utility": ("bench_privacy_utility.py", ["--cases", "8", "--public-cases", "4", "--rounds", "1",
                                                     "--pretrain-epochs", "1", "--eps", "8"]),
    "public_pretraining": ("bench_public_pretraining.py", ["--settings", "demo", "--seeds", "0", "--demo-size", "32",
                                                           "--demo-cases", "4", "--demo-public-cases", "4",
                                                           "--demo-epochs", "1"]),
    "subspace_capacity": ("bench_subspace.py", ["--cases", "8", "--public-cases", "8", "--rounds", "1",
                                                "--pretrain-epochs", "1", "--views", "1",
                                                "--specs", "all", "norm+bias+head", "--max-minutes", "5"]),
    "scale": ("bench_scale.py", ["--sites", "2", "3", "--threads", "1", "--fault-sites", "3", "--dead", "1",
                                 "--straggler-wait", "20"]),
    "pacs": ("bench_pacs.py", ["--sizes", "32", "--repeats", "1"]),
    "site_models": ("bench_site_models.py", ["--sites", "2", "--cases", "8", "--public-cases", "4",
                                             "--pretrain-epochs", "1", "--local-epochs", "1", "--alone-epochs", "1"]),
    "poisoning": ("bench_poisoning.py", ["--sites", "4", "--rounds", "1", "--local-epochs", "1",
                                         "--methods", "mean,median"]),
    "encrypted_inference": ("bench_encrypted_inference.py", ["--sizes", "16", "--variant", "tiny",
                                                             "--set", "patch_size=[16,16,16]"]),
    "secure_aggregation": ("bench_secure_aggregation.py", ["--rounds", "2", "--scale-sites", "3", "10",
                                                           "--repeats", "1"]),
    "fedstats": ("bench_fedstats.py", ["--eps", "2", "--cases", "8", "--seeds", "20"]),
}  # fmt: skip


class MarkerError(ValueError):
    """The benchmark page lacks the markers (or has them in the wrong order)."""


def replace_section(text: str, body: str, *, start: str = START, end: str = END) -> str:
    """``text`` with everything between the markers replaced by ``body`` (markers kept)."""
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0:
        missing = [m for m, k in ((start, i), (end, j)) if k < 0]
        raise MarkerError(f"the page has no {' and no '.join(missing)} marker: add both around the benchmark section")
    if j < i:
        raise MarkerError(f"the page has {end} before {start}")
    return text[: i + len(start)] + "\n" + body.strip() + "\n" + text[j:]


def _first_table(path: Path) -> tuple[str, list[str]]:
    lines = path.read_text().splitlines()
    title = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), path.stem)
    table: list[str] = []
    for ln in lines:
        if ln.startswith("|"):
            table.append(ln)
        elif table:
            break
    return title, table


def _link(path: Path, base: Path) -> str:
    """``path`` as a Markdown link target from a page in folder ``base``: relative inside the repository."""
    path = path.resolve()
    if not path.is_relative_to(REPO):
        return path.as_posix()
    return Path(os.path.relpath(path, base.resolve())).as_posix()


def summarize_results(folder: Path, *, base: Path = REPO) -> str:
    """Headline table (goals, verdicts) from the JSON results; title and first table of the others; links.

    Links are relative to ``base``, the folder of the page the text goes into.
    """
    rows: list[summary.Row] = []
    parts, links = [], []
    for path in sorted(folder.glob("*.md")):
        rel = Path(_link(path, base))
        links.append(f"[{path.stem}]({rel})")
        data = path.with_suffix(".json")
        if path.stem in summary.SUMMARIZERS and data.exists():
            rows += summary.summarize(path.stem, data)
            continue
        title, table = _first_table(path)
        parts.append(f"**{title}** ([{rel.name}]({rel}))\n\n" + ("\n".join(table) if table else "(no table)"))
    if not links:
        return "No benchmark results yet: run `python bench/run_all.py`."
    body = [summary.table(rows)] if rows else []
    return "\n\n".join(body + parts + ["Full tables: " + ", ".join(links) + "."])


def update_page(folder: Path, page: Path = PAGE) -> Path:
    """Rewrite the page's benchmark section from ``folder``; raises :class:`MarkerError` without markers."""
    text = page.read_text()
    shown = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    body = f"_Regenerated by `python bench/run_all.py` from `{shown}/`._\n\n" + summarize_results(
        folder, base=page.resolve().parent
    )
    page.write_text(replace_section(text, body))
    return page


def run(names: list[str], *, quick: bool, out: Path) -> dict[str, int]:
    """Run the chosen benchmarks one after another (they time things: never in parallel); return exit codes."""
    out.mkdir(parents=True, exist_ok=True)
    codes = {}
    for name in names:
        script, quick_args = BENCHMARKS[name]
        cmd = [sys.executable, str(HERE / script), *(quick_args if quick else [])]
        if quick:  # never overwrite the reference results with a smoke run
            cmd += ["--out", str(out / f"{name}.md")]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.perf_counter()
        codes[name] = subprocess.run(cmd, cwd=REPO, check=False).returncode
        print(f"== {name}: exit {codes[name]} after {time.perf_counter() - start:.0f} s", flush=True)
    return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke runs; results in bench/results/quick/")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    ap.add_argument("--no-docs", "--no-readme", action="store_true", help=f"do not rewrite {PAGE.relative_to(REPO)}")
    ap.add_argument(
        "--docs-only",
        "--readme-only",
        action="store_true",
        help=f"only rewrite {PAGE.relative_to(REPO)} from existing results",
    )
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; known: {list(BENCHMARKS)}")
    folder = RESULTS / "quick" if args.quick else RESULTS
    codes = {} if args.docs_only else run(names, quick=args.quick, out=folder)
    if not args.no_docs:
        print(f"benchmark page rewritten: {update_page(folder)}")
    failed = [n for n, c in codes.items() if c != 0]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
