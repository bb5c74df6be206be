"""Membership inference by loss threshold (Yeom et al. 2018): was this case in the model's training set?

The attacker sees the released model and a case, computes the model's loss on it and says "member" when the loss
is low. Its ROC AUC over known members and non-members measures how much the model leaks about who trained it
(0.5: nothing). No shadow models: on a site's small dataset the loss gap itself is the strongest cheap signal.
DP-SGD bounds every such test: TPR − FPR ≤ (e^ε − 1 + 2δ) / (e^ε + 1).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from privacy.attacks.metrics import advantage, roc_auc

log = logging.getLogger(__name__)


@dataclass
class MembershipResult:
    """Loss-threshold attack outcome."""

    auc: float
    advantage: float
    member_losses: list[float]
    nonmember_losses: list[float]

    @property
    def loss_gap(self) -> float:
        """Mean non-member loss minus mean member loss (> 0: the model fits its training cases better)."""
        return sum(self.nonmember_losses) / len(self.nonmember_losses) - sum(self.member_losses) / len(
            self.member_losses
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"loss_gap": self.loss_gap}


def loss_threshold_attack(member_losses: Sequence[float], nonmember_losses: Sequence[float]) -> MembershipResult:
    """AUC and best advantage of "member if the loss is low" (score = −loss)."""
    members = [float(v) for v in member_losses]
    nonmembers = [float(v) for v in nonmember_losses]
    result = MembershipResult(
        auc=roc_auc([-v for v in members], [-v for v in nonmembers]),
        advantage=advantage([-v for v in members], [-v for v in nonmembers]),
        member_losses=members,
        nonmember_losses=nonmembers,
    )
    log.info(
        "membership inference: AUC %.3f, advantage %.3f, loss gap %.4f", result.auc, result.advantage, result.loss_gap
    )
    return result


@torch.no_grad()
def per_sample_losses(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    inferer: Callable[[torch.Tensor, nn.Module], torch.Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> list[float]:
    """The model's loss on each sample (batch dimension first), in eval mode."""
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need as many labels as images (> 0), got {images.shape[0]} and {labels.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(images.shape[0]):
            x = images[i : i + 1].to(device)
            logits = inferer(x, model) if inferer is not None else model(x)
            out.append(float(loss_fn(logits, labels[i : i + 1].to(device)).mean()))
        return out
    finally:
        model.train(was_training)


def case_losses(
    model: nn.Module, cases: Sequence[Any], *, bundle: Any, device: str | torch.device = "cpu"
) -> list[float]:
    """Loss of each whole case (the bundle's pre-processing and sliding-window inferer), as an attacker would."""
    pre = bundle.preprocessing()
    inferer = bundle.inferer()
    loss_fn = bundle.loss()
    losses = []
    for case in cases:
        item = pre(case.as_item())
        image = torch.as_tensor(item["image"])[None]
        label = torch.as_tensor(item["label"])[None].long()
        losses += per_sample_losses(model, image, label, loss_fn, inferer=inferer, device=device)
    return losses
