"""Per-tissue Dice and HD95 on the original voxel grid, and their per-site summaries.

Dice is computed directly (it is two sums); HD95 uses MONAI's surface-distance implementation with the voxel
spacing so it is in millimetres. A tissue absent from both prediction and truth has no score (NaN), never a
free 1.0; a tissue missing from the prediction only gets Dice 0 and HD95 NaN (reported as "missing").
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from fetalseg.labels import foreground_labels


def dice_per_label(pred: np.ndarray, truth: np.ndarray, labels: Iterable[int]) -> dict[int, float]:
    """Dice for each label value; NaN where the label is in neither volume."""
    scores = {}
    for value in labels:
        p = pred == value
        t = truth == value
        denom = int(p.sum()) + int(t.sum())
        scores[int(value)] = float("nan") if denom == 0 else 2.0 * int(np.logical_and(p, t).sum()) / denom
    return scores


def hd95_per_label(
    pred: np.ndarray, truth: np.ndarray, labels: Iterable[int], *, spacing: Sequence[float]
) -> dict[int, float]:
    """95th percentile symmetric Hausdorff distance in mm per label; NaN if either side is empty."""
    scores = {}
    for value in labels:
        p = pred == value
        t = truth == value
        if not p.any() or not t.any():
            scores[int(value)] = float("nan")
            continue
        hd = compute_hausdorff_distance(
            torch.from_numpy(p)[None, None],
            torch.from_numpy(t)[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
        scores[int(value)] = float(hd.item())
    return scores


@dataclass
class CaseMetrics:
    """Scores of one held-out case."""

    case_id: str
    site: str
    dice: dict[str, float]
    hd95: dict[str, float] = field(default_factory=dict)

    @property
    def mean_dice(self) -> float:
        return nanmean(self.dice.values())


def score_case(
    pred: np.ndarray,
    truth: np.ndarray,
    *,
    case_id: str,
    site: str,
    spacing: Sequence[float],
    with_hd95: bool = True,
) -> CaseMetrics:
    """Dice (and HD95) for every tissue of one case, keyed by tissue name."""
    if pred.shape != truth.shape:
        raise ValueError(f"{case_id}: prediction shape {pred.shape} != label shape {truth.shape}")
    tissues = foreground_labels()
    values = [t.value for t in tissues]
    names = {t.value: t.name for t in tissues}
    dice = {names[v]: s for v, s in dice_per_label(pred, truth, values).items()}
    hd95 = {names[v]: s for v, s in hd95_per_label(pred, truth, values, spacing=spacing).items()} if with_hd95 else {}
    return CaseMetrics(case_id=case_id, site=site, dice=dice, hd95=hd95)


def nanmean(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def summarize(cases: Sequence[CaseMetrics]) -> dict[str, dict[str, dict[str, float]]]:
    """``{site or "all": {tissue or "mean": {"dice": x, "hd95": y}}}`` averaged over cases (NaNs skipped)."""
    tissues = [t.name for t in foreground_labels()]
    groups: dict[str, list[CaseMetrics]] = {}
    for c in cases:
        groups.setdefault(c.site, []).append(c)
    groups["all"] = list(cases)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for site, members in groups.items():
        row: dict[str, dict[str, float]] = {}
        for tissue in tissues:
            row[tissue] = {
                "dice": nanmean(m.dice.get(tissue, float("nan")) for m in members),
                "hd95": nanmean(m.hd95.get(tissue, float("nan")) for m in members),
            }
        row["mean"] = {
            "dice": nanmean(row[t]["dice"] for t in tissues),
            "hd95": nanmean(row[t]["hd95"] for t in tissues),
        }
        out[site] = row
    return out


def format_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]], *, metric: str = "dice") -> str:
    """Markdown table: one row per site (+ "all"), one column per tissue + mean."""
    tissues = [t.name for t in foreground_labels()]
    head = ["site", *[t.replace("_", " ") for t in tissues], "mean"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = "{:.3f}" if metric == "dice" else "{:.2f}"
    for site, row in summary.items():
        cells = [fmt.format(row[t][metric]) if not math.isnan(row[t][metric]) else "n/a" for t in [*tissues, "mean"]]
        lines.append("| " + " | ".join([site, *cells]) + " |")
    return "\n".join(lines)
