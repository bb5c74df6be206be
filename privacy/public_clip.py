"""The clip norm C from PUBLIC data: per-case gradient norms of the bundle loss at the public model.

Why: DP-SGD's clip norm sets the scale of both signal and noise; choosing it by looking at the private cases would
leak (it is a hyper-parameter "NOT covered by ε"). Measured on public cases (the public pretraining set, which is
not protected) at the public model — the model every private job starts from — it costs no ε. A quantile of the
per-case norms (default the median: about half the cases are clipped, the rest pass unchanged) is the
recommended ``max_grad_norm``. The norms are taken over the parameters the job will train (a parameter-group spec,
``fetalseg.subspace``) and with the same K augmented views averaged per case as the private job's
``augmentation_multiplicity``, so they measure exactly the vector that DP-SGD would clip.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from privacy.multiplicity import MultiViewDataset, check_multiplicity


@dataclass(frozen=True)
class ClipRecommendation:
    """Per-case norms and the quantile recommended as ``max_grad_norm`` (all measured on public cases)."""

    max_grad_norm: float
    quantile: float
    norms: list[float]
    views: int
    trained_parameters: str
    trained_weights: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_quantile(q: Any) -> float:
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or not 0.0 < q <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {q!r}")
    return float(q)


def per_case_gradient_norms(
    network: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    dataset: Dataset,
    *,
    views: int = 1,
    device: str | torch.device = "cpu",
) -> list[float]:
    """L2 norm, over the parameters with ``requires_grad``, of each case's gradient (mean of its K views' losses)."""
    views = check_multiplicity(views)
    params = [p for p in network.parameters() if p.requires_grad]
    if not params:
        raise ValueError("every parameter is frozen: there is no gradient to measure")
    multi = MultiViewDataset(dataset, views)
    network.train()  # the mode DP-SGD computes its gradients in
    norms = []
    for i in range(len(multi)):
        sample = multi[i]
        image, label = sample["image"].to(device), sample["label"].to(device)  # (K, C, ...): one case's views
        loss = loss_fn(network(image), label)
        grads = torch.autograd.grad(loss.mean(), params, allow_unused=True)
        sq = sum(float(g.detach().double().pow(2).sum()) for g in grads if g is not None)
        norms.append(math.sqrt(sq))
    return norms


def recommend_clip(norms: Sequence[float], quantile: float = 0.5) -> float:
    """The ``quantile`` of the per-case norms (the median by default)."""
    if not norms:
        raise ValueError("no per-case norms (no public cases)")
    return float(np.quantile(np.asarray(norms, dtype=np.float64), check_quantile(quantile)))


def clip_from_public(
    bundle: Any,
    cases: Sequence[Any],
    *,
    weights: Mapping[str, torch.Tensor] | None,
    trained_parameters: str = "all",
    views: int = 1,
    quantile: float = 0.5,
    seed: int = 0,
) -> ClipRecommendation:
    """Recommended ``max_grad_norm`` from public ``cases`` at the public model ``weights`` (the bundle's network)."""
    from fetalseg import subspace
    from fetalseg.bundle import load_weights
    from fetalseg.training import build_train_dataset

    check_quantile(quantile)
    network = bundle.network()
    if weights is not None:
        load_weights(network, weights)
    names = subspace.parameter_names(network, trained_parameters)
    subspace.freeze_except(network, names)
    dataset = build_train_dataset(bundle, cases)
    with _Seeded(seed):  # the random views: reproducible for a public measurement
        norms = per_case_gradient_norms(network, bundle.loss(), dataset, views=views)
    return ClipRecommendation(
        max_grad_norm=recommend_clip(norms, quantile),
        quantile=quantile,
        norms=norms,
        views=views,
        trained_parameters=trained_parameters,
        trained_weights=subspace.count(network, names),
    )


class _Seeded:
    """Seed MONAI's and torch's global generators for the block, then restore torch's state."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __enter__(self) -> None:
        from monai.utils import set_determinism

        self._state = torch.random.get_rng_state()
        set_determinism(seed=self.seed)

    def __exit__(self, *exc: Any) -> None:
        from monai.utils import set_determinism

        set_determinism(seed=None)
        torch.random.set_rng_state(self._state)
