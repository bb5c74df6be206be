"""Evaluate a network on held-out cases in their original space (per-tissue Dice and HD95)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fetalseg.bundle import Bundle
from fetalseg.data.io import read_volume
from fetalseg.data.loaders import Case
from fetalseg.inference import Segmenter
from fetalseg.metrics import CaseMetrics, score_case
from fetalseg.qc import CasePoint, tissue_volumes_ml


def evaluate_cases(
    network: torch.nn.Module,
    cases: Sequence[Case],
    *,
    bundle: Bundle | None = None,
    device: str | torch.device = "cpu",
    with_hd95: bool = True,
    progress: bool = False,
    qc_points: list[CasePoint] | None = None,
) -> list[CaseMetrics]:
    """Segment each case with ``network`` and score it against its label on the label's own grid.

    ``qc_points``, when given, receives each case's GA and predicted tissue volumes (for the growth chart of
    :func:`fetalseg.qc.plot_growth`)."""
    from tqdm.auto import tqdm

    was_training = network.training
    segmenter = Segmenter(network, bundle=bundle, device=device)
    scores = []
    try:
        for case in tqdm(cases, desc="evaluate", disable=not progress, leave=False):
            if case.label is None:
                raise ValueError(f"{case.case_id}: cannot evaluate a case without a label")
            truth = read_volume(case.label)
            seg = segmenter.segment(case.image)
            pred = seg.label
            if qc_points is not None:
                qc_points.append(CasePoint(case.case_id, case.ga_weeks, tissue_volumes_ml(pred, seg.affine)))
            truth_arr = truth.array[..., 0] if truth.array.ndim == 4 else truth.array
            scores.append(
                score_case(
                    pred,
                    truth_arr.astype(int),
                    case_id=case.case_id,
                    site=case.site,
                    spacing=truth.spacing,
                    with_hd95=with_hd95,
                )
            )
    finally:
        network.train(was_training)
    return scores
