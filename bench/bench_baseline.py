"""Centralized baseline and cross-site generalization on the synthetic federation.

1. Centralized: train on the pooled training cases of all sites within a time budget; per-tissue Dice on every
   site's held-out cases (goal: mean foreground Dice >= 0.80 within ~10 minutes on 2 CPU cores).
2. Single-site: for each site, train on that site alone (same budget per model) and score on its own held-out
   cases and on the other sites' (goal: >= 0.05 mean Dice drop on other sites: the site differences are real).

Prints Markdown tables and writes bench/results/baseline.md (+ .json). All numbers come from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from fetalseg.baseline import load_sites, train_and_evaluate
from fetalseg.bundle import Bundle
from fetalseg.data.federation import write_federation
from fetalseg.metrics import format_table, nanmean

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="volume size (voxels per axis)")
    ap.add_argument("--cases", type=int, default=10, help="cases per site")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget of the centralized model")
    ap.add_argument("--single-minutes", type=float, default=5.0, help="training budget of each single-site model")
    ap.add_argument("--epochs", type=int, default=200, help="epoch cap (the time budget usually stops first)")
    ap.add_argument("--variant", default=None, help="bundle variant (tiny for a smoke run)")
    ap.add_argument("--skip-single", action="store_true", help="only the centralized model")
    ap.add_argument("--data", type=Path, help="existing federation folder (default: synthesize into a temp dir)")
    ap.add_argument("--out", type=Path, default=RESULTS / "baseline.md")
    args = ap.parse_args()

    load_before = os.getloadavg()
    root = args.data or Path(tempfile.mkdtemp(prefix="fed-"))
    if args.data is None:
        t = time.perf_counter()
        sites = write_federation(root, n_sites=args.sites, cases_per_site=args.cases, shape=(args.size,) * 3, seed=0)
        synth_s = time.perf_counter() - t
    else:
        sites = sorted(p for p in root.iterdir() if p.is_dir())
        synth_s = float("nan")
    splits = load_sites(sites)
    bundle = Bundle("train", variant=args.variant)

    central = train_and_evaluate(
        splits, train_sites=[s.site for s in splits], name="centralized", bundle=bundle,
        max_epochs=args.epochs, time_budget_s=args.minutes * 60, with_hd95=True,
    )  # fmt: skip
    lines = [
        "# Baseline benchmark",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; load average before the run {load_before[0]:.1f} "
        "(the machine is shared: absolute times are noisy).",
        f"Data: {args.sites} synthetic sites × {args.cases} cases of {args.size}³ (synthesis {synth_s:.0f} s); "
        "per site "
        f"{len(splits[0].train)} train / {len(splits[0].val)} val / {len(splits[0].test)} held-out cases.",
        "",
        f"## Centralized (budget {args.minutes:.0f} min): {central.fit.epochs_run} epochs in "
        f"{central.fit.seconds:.0f} s, best epoch {central.fit.best_epoch}",
        "",
        "Dice on each site's held-out cases:",
        "",
        format_table(central.summary, metric="dice"),
        "",
        "HD95 (mm):",
        "",
        format_table(central.summary, metric="hd95"),
        "",
    ]
    record = {"centralized": central.to_json(), "single_site": {}}
    if not args.skip_single:
        rows = ["| trained on | own site Dice | other sites Dice | drop |", "|---|---|---|---|"]
        drops = []
        for split in splits:
            single = train_and_evaluate(
                splits, train_sites=[split.site], name=f"single-{split.site}", bundle=bundle,
                max_epochs=args.epochs, time_budget_s=args.single_minutes * 60, with_hd95=False,
            )  # fmt: skip
            own = single.summary[split.site]["mean"]["dice"]
            others = nanmean(single.summary[s.site]["mean"]["dice"] for s in splits if s.site != split.site)
            drops.append(own - others)
            rows.append(f"| {split.site} | {own:.3f} | {others:.3f} | {own - others:+.3f} |")
            record["single_site"][split.site] = single.to_json()
        lines += [
            f"## Single-site models (budget {args.single_minutes:.0f} min each): cross-site generalization",
            "",
            *rows,
            "",
            f"Mean drop from own site to other sites: {nanmean(drops):.3f} mean Dice.",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=float))


if __name__ == "__main__":
    main()
