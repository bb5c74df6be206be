"""EMA of a site's DP iterates: the weights a site evaluates and sends are an average of what DP-SGD released.

Why: averaging the noisy iterates cancels part of their noise (De et al. 2022 use an EMA of the weights for every
DP result). It is post-processing: the EMA is computed from the DP iterates alone (each one already released by
the Gaussian mechanism, accounted), never from data or gradients, so it costs no ε. The gradient of every step
is still computed at the DP iterate, not at the average: the mechanism is unchanged.

Choice for federated rounds: the site SENDS the EMA weights (its weight difference is EMA − global). Each round a site
starts from the received global model, so the EMA restarts there (on ``load_state_dict``); its decay warms up
per round as ``min(ema_decay, (1 + t) / (10 + t))`` after t steps of the round (TensorFlow's ``num_updates`` rule),
so short rounds average their later iterates instead of staying at the global start. A server-side EMA of global
models would need a server change and would not reduce the noise inside a site's round.

How it is wired (no change to the training loop): between steps the model's trained parameters hold the EMA; a
training forward first puts the DP iterate back (forward pre-hook), the optimizer step updates the iterate and the
EMA (optimizer post-hook) and leaves the EMA in the parameters. So evaluation, ``state_dict()`` and the weight
difference a client sends all see the EMA. Frozen parameters are untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from privacy.dp_config import check_ema_decay

WARMUP = 10  # decay_t = min(decay, (1 + t) / (WARMUP + t))


def decay_at(decay: float, t: int) -> float:
    """The decay used for the (t+1)-th update since the round's start (warm-up, then ``decay``)."""
    return min(float(decay), (1.0 + t) / (WARMUP + t))


class IterateEMA:
    """EMA of ``module``'s trained parameters over the steps of ``optimizer``, shown in the parameters between steps.

    ``optimizer`` is the plain optimizer that applies updates (the DP optimizer's ``original_optimizer``: its
    post-hook fires only after a real, noised step); ``wrapped`` is the module the training loop calls.
    """

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, wrapped: nn.Module, *, decay: float
    ) -> None:
        self.decay = check_ema_decay(decay)
        if self.decay is None:
            raise ValueError("IterateEMA needs a decay")
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.iterate: list[torch.Tensor] = []
        self.average: list[torch.Tensor] = []
        self.updates = 0
        self.showing_average = False
        self.reset()
        self._handles = [
            optimizer.register_step_post_hook(lambda *_: self.update()),
            wrapped.register_forward_pre_hook(self._before_forward),
            module.register_load_state_dict_post_hook(lambda *_: self.reset()),
        ]

    @torch.no_grad()
    def reset(self) -> None:
        """Start over from the parameters as they are now (a round's received global model)."""
        self.iterate = [p.detach().clone() for p in self.params]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0
        self.showing_average = False

    @torch.no_grad()
    def use_iterate(self) -> None:
        """Put the DP iterate back into the parameters (before a step computes gradients or adds noise)."""
        if self.showing_average:
            for p, w in zip(self.params, self.iterate, strict=True):
                p.copy_(w)
            self.showing_average = False

    @torch.no_grad()
    def update(self) -> None:
        """After a step: the parameters are the new DP iterate; fold it into the EMA and show the EMA."""
        d = decay_at(self.decay, self.updates)  # type: ignore[arg-type]
        for p, w, a in zip(self.params, self.iterate, self.average, strict=True):
            w.copy_(p)
            a.mul_(d).add_(w, alpha=1.0 - d)
            p.copy_(a)
        self.updates += 1
        self.showing_average = True

    def _before_forward(self, module: nn.Module, args: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self.use_iterate()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
