"""Train the models the attacks are run against: the bundle's network on one site, with or without DP-SGD.

The same code path as a federated site's local training (``fetalseg.training`` + ``privacy.dpsgd``), run centrally
on one synthetic site so an attack evaluation needs no NVFlare.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.utils import set_determinism

from fetalseg.bundle import Bundle
from fetalseg.training import build_train_loader, train_epoch
from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine

log = logging.getLogger(__name__)


@dataclass
class TrainedTarget:
    """A trained network (unwrapped) and how it was trained."""

    model: torch.nn.Module
    epochs: int
    seconds: float
    final_loss: float
    privacy: dict[str, Any] | None = None  # the DP-SGD engine's report, None for a non-private model
    history: list[float] = field(default_factory=list)

    @property
    def epsilon(self) -> float | None:
        return None if self.privacy is None else float(self.privacy["epsilon"])


def train_target(
    bundle: Bundle,
    cases: Sequence[Any],
    *,
    epochs: int,
    batch_size: int = 2,
    dp: DPSGDConfig | None = None,
    seed: int = 0,
    initial_state: Mapping[str, torch.Tensor] | None = None,
    lr: float | None = None,
) -> TrainedTarget:
    """Train the bundle's network on ``cases`` for ``epochs`` passes (DP-SGD when ``dp`` is given).

    ``initial_state``: start from these weights (e.g. a model pretrained on public data) instead of a random init;
    ``lr``: override the bundle optimizer's learning rate.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if lr is not None and not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    set_determinism(seed=seed)
    net = bundle.network()
    if initial_state is not None:
        net.load_state_dict(dict(initial_state))
    optimizer = bundle.optimizer(net.parameters())
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)
    loader = build_train_loader(bundle, cases, batch_size=batch_size)
    loss_fn = bundle.loss()
    model: torch.nn.Module = net
    engine = None
    if dp is not None:
        engine = SitePrivacyEngine(config=dp, dataset_size=len(loader.dataset), batch_size=batch_size)
        model, optimizer, loader = engine.make_private(model=net, optimizer=optimizer, data_loader=loader)
        loss_fn = engine.wrap_loss(loss_fn)
    start = time.perf_counter()
    history = []
    for epoch in range(epochs):
        stats = train_epoch(model, loader, optimizer, loss_fn)
        history.append(stats.loss)
        log.debug("target epoch %d loss %.4f", epoch, stats.loss)
    set_determinism(seed=None)
    net.eval()
    return TrainedTarget(
        model=net,
        epochs=epochs,
        seconds=time.perf_counter() - start,
        final_loss=history[-1],
        privacy=engine.report() if engine is not None else None,
        history=history,
    )
