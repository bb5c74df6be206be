"""FedAvg in one process, for the benchmarks that compare training set-ups on small synthetic federations, where
NVFlare's start-up would dominate (``bench_privacy_utility.py``, ``bench_subspace.py``, ``bench_public_pretraining``).

What they share, so that their numbers compare: the non-private public pretraining, the rounds (every site starts
from the global weights, trains, and the server averages the sites' weights by their number of training cases, as
FedAvg does) and the held-out score. How a site trains (DP-SGD, a frozen or low-rank subspace) stays in each script.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.utils import set_determinism

from fetalseg.baseline import SiteSplit
from fetalseg.bundle import Bundle
from fetalseg.evaluation import evaluate_cases
from fetalseg.metrics import nanmean
from fetalseg.training import build_train_loader, train_epoch

State = dict[str, torch.Tensor]


def set_lr(optimizer: torch.optim.Optimizer, lr: float | None) -> None:
    """Every parameter group's learning rate set to ``lr`` (None: the bundle's)."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)


def pretrain(bundle: Bundle, cases: list, *, epochs: int, batch: int, seed: int) -> State:
    """Non-private training on the public cases (the starting point of the fine-tuning runs)."""
    set_determinism(seed=seed)
    net = bundle.network()
    optimizer = bundle.optimizer(net.parameters())
    loader = build_train_loader(bundle, cases, batch_size=batch)
    loss_fn = bundle.loss()
    for _ in range(epochs):
        train_epoch(net, loader, optimizer, loss_fn)
    set_determinism(seed=None)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def average_states(states: list[State], weights: list[int]) -> State:
    """The sites' weights averaged with ``weights`` (their training cases); integer buffers (none in the bundle's
    instance-norm U-Net) are kept from the first site."""
    total = float(sum(weights))
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
        else:
            out[key] = first.clone()
    return out


def fedavg_rounds(
    global_state: State,
    *,
    rounds: int,
    weights: list[int],
    local_update: Callable[[int, State], State],
    after_round: Callable[[int], None] | None = None,
) -> State:
    """``rounds`` FedAvg rounds over ``len(weights)`` sites: each round ``local_update(i, global_state)`` returns
    site ``i``'s weights after its local training from ``global_state`` (sites in order), and the new global
    state is their :func:`average_states`. Returns the final global state."""
    for rnd in range(rounds):
        states = [local_update(i, global_state) for i in range(len(weights))]
        global_state = average_states(states, weights)
        if after_round is not None:
            after_round(rnd)
    return global_state


def score(bundle: Bundle, net: torch.nn.Module, splits: list[SiteSplit], which: str = "test") -> dict[str, float]:
    """Mean Dice (7 tissues) per site and over all pooled (``"all"``) on each site's ``which`` cases (held-out
    ``test``, or ``val`` to choose a setting)."""
    scores = evaluate_cases(net, [c for s in splits for c in getattr(s, which)], bundle=bundle, with_hd95=False)
    out = {s.site: nanmean(c.mean_dice for c in scores if c.site == s.site) for s in splits}
    out["all"] = nanmean(c.mean_dice for c in scores)
    return out
