"""Centralized and single-site training: the references every federated result is compared with.

Each site's cases are split three ways, deterministically: *held-out* test cases (reported, never seen in
training or model selection), *validation* cases (pick the best epoch) and *training* cases. The same split is
used by every experiment (centralized, single-site, federated) so their numbers are comparable.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fetalseg.bundle import Bundle
from fetalseg.data.loaders import Case, load_dataset, split_cases
from fetalseg.evaluation import evaluate_cases
from fetalseg.metrics import CaseMetrics, format_table, summarize
from fetalseg.training import FitResult, fit

log = logging.getLogger(__name__)

TEST_FRACTION = 0.25
VAL_FRACTION = 0.2


@dataclass
class SiteSplit:
    """One site's cases, split into train / validation / held-out test."""

    site: str
    train: list[Case]
    val: list[Case]
    test: list[Case]


@dataclass
class ExperimentResult:
    """What a training run produced: per-case scores on every site's held-out cases, and its summary."""

    name: str
    trained_on: list[str]
    fit: FitResult
    scores: list[CaseMetrics] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    checkpoint: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "trained_on": self.trained_on,
            "epochs_run": self.fit.epochs_run,
            "best_epoch": self.fit.best_epoch,
            "best_val_mean_dice": self.fit.best_mean_dice,
            "train_seconds": self.fit.seconds,
            "history": self.fit.history,
            "summary": self.summary,
            "cases": [{"case_id": s.case_id, "site": s.site, "dice": s.dice, "hd95": s.hd95} for s in self.scores],
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


def split_site(cases: Sequence[Case], *, seed: int = 0) -> SiteSplit:
    """Deterministic train/val/test split of one site's cases (see module docstring)."""
    sites = {c.site for c in cases}
    if len(sites) != 1:
        raise ValueError(f"split_site expects the cases of one site, got sites {sorted(sites)}")
    rest, test = split_cases(cases, val_fraction=TEST_FRACTION, seed=seed)
    train, val = split_cases(rest, val_fraction=VAL_FRACTION, seed=seed + 1)
    if not train:
        raise ValueError(f"site {next(iter(sites))}: too few cases to train ({len(cases)})")
    return SiteSplit(site=next(iter(sites)), train=train, val=val, test=test)


def load_sites(dataset_dirs: Sequence[str | Path], *, seed: int = 0) -> list[SiteSplit]:
    """Load and validate every dataset folder (one per site) and split each; raises on any bad input."""
    if not dataset_dirs:
        raise ValueError("no dataset folders given")
    splits = []
    for folder in dataset_dirs:
        cases = load_dataset(folder)
        splits.append(split_site(cases, seed=seed))
    names = [s.site for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset folders must have distinct names (they name the sites): {names}")
    return splits


def train_and_evaluate(
    splits: Sequence[SiteSplit],
    *,
    train_sites: Sequence[str],
    name: str,
    bundle: Bundle,
    max_epochs: int | None = None,
    time_budget_s: float | None = None,
    val_interval: int = 5,
    checkpoint: Path | None = None,
    seed: int = 0,
    progress: bool = False,
    with_hd95: bool = True,
    network: torch.nn.Module | None = None,
) -> ExperimentResult:
    """Train on the training cases of ``train_sites`` and score on the held-out cases of *every* site.

    ``network``: the model to start from (e.g. one pretrained on public data); default fresh bundle weights."""
    chosen = [s for s in splits if s.site in set(train_sites)]
    if len(chosen) != len(set(train_sites)):
        missing = set(train_sites) - {s.site for s in splits}
        raise ValueError(f"unknown site(s) {sorted(missing)}; known: {[s.site for s in splits]}")
    train = [c for s in chosen for c in s.train]
    val = [c for s in chosen for c in s.val]
    model, result = fit(
        bundle,
        train,
        val,
        max_epochs=max_epochs,
        time_budget_s=time_budget_s,
        val_interval=val_interval,
        network=network,
        checkpoint=checkpoint,
        seed=seed,
        progress=progress,
        checkpoint_info={"origin": f"fetal-fl {name}", "trained_on": list(train_sites)},
    )
    test = [c for s in splits for c in s.test]
    scores = evaluate_cases(model, test, bundle=bundle, with_hd95=with_hd95, progress=progress)
    return ExperimentResult(
        name=name,
        trained_on=list(train_sites),
        fit=result,
        scores=scores,
        summary=summarize(scores),
        checkpoint=result.checkpoint,
    )


def write_report(result: ExperimentResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``metrics.md`` (per-site × per-tissue Dice and HD95 tables)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "metrics.json"
    json_path.write_text(json.dumps(result.to_json(), indent=2, default=float))
    md = [
        f"# {result.name}: trained on {', '.join(result.trained_on)}",
        "",
        f"Epochs run: {result.fit.epochs_run} (best {result.fit.best_epoch}), "
        f"training time {result.fit.seconds:.0f} s.",
        "Scores on each site's held-out cases (never used for training or model selection).",
        "",
        "## Dice",
        "",
        format_table(result.summary, metric="dice"),
        "",
        "## HD95 (mm)",
        "",
        format_table(result.summary, metric="hd95"),
        "",
    ]
    md_path = out_dir / "metrics.md"
    md_path.write_text("\n".join(md))
    return json_path, md_path


def run_bundle_training(
    *,
    bundle_root: str,
    dataset_dirs: Sequence[str],
    max_epochs: int | None = None,
    time_budget_s: float | None = None,
    variant: str | None = None,
) -> ExperimentResult:
    """Entry point of the bundle's ``train.json`` ``run`` (``python -m monai.bundle run``): centralized training."""
    bundle = Bundle("train", root=bundle_root, variant=variant)
    splits = load_sites(dataset_dirs)
    start = time.perf_counter()
    result = train_and_evaluate(
        splits,
        train_sites=[s.site for s in splits],
        name="centralized",
        bundle=bundle,
        max_epochs=max_epochs,
        time_budget_s=time_budget_s,
        checkpoint=bundle.checkpoint_path,
    )
    write_report(result, Path(bundle_root) / "eval")
    log.info(
        "centralized training done in %.0f s; mean Dice %.3f",
        time.perf_counter() - start,
        result.summary["all"]["mean"]["dice"],
    )
    return result
