"""Evaluate a network on held-out cases in their original space (per-tissue Dice and HD95)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fetalseg.bundle import Bundle
from fetalseg.data.io import read_volume
from fetalseg.data.loaders import Case
from fetalseg.inference import Segmenter
from fetalseg.metrics import CaseMetrics, score_case


def evaluate_cases(
    network: torch.nn.Module,
    cases: Sequence[Case],
    *,
    bundle: Bundle | None = None,
    device: str | torch.device = "cpu",
    with_hd95: bool = True,
    progress: bool = False,
) -> list[CaseMetrics]:
    """Segment each case with ``network`` and score it against its label on the label's own grid."""
    from tqdm.auto import tqdm

    was_training = network.training
    segmenter = Segmenter(network, bundle=bundle, device=device)
    scores = []
    try:
        for case in tqdm(cases, desc="evaluate", disable=not progress, leave=False):
            if case.label is None:
                raise ValueError(f"{case.case_id}: cannot evaluate a case without a label")
            truth = read_volume(case.label)
            pred = segmenter.segment(case.image).label
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
