"""Gradient inversion on one update (Zhu et al. 2019; cosine matching of Geiping et al. 2020): can the server see
the patch a site trained on?

Threat model, chosen to favour the attacker: the server knows the weights it sent, the update is the gradient of
one SGD step on ONE patch (batch 1: no averaging hides it), and the attacker knows the patch's label map. It
optimises a dummy image whose gradient points the same way as the observed update on the coordinates that were
sent; a total-variation prior keeps it smooth. Success is scored by SSIM / PSNR to the true patch.

Filters are applied to the update exactly as they would be before sending (:mod:`privacy.filters`): percentile
sharing leaves the attacker the shared coordinates (it knows their positions), client-level DP and a DP-SGD step
leave it a clipped, noised gradient.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from privacy.attacks.metrics import psnr, ssim

log = logging.getLogger(__name__)

UpdateFilter = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class InversionResult:
    """How close the attacker's reconstruction came to the true patch."""

    ssim: float
    psnr: float
    gradient_similarity: float  # cosine between the reconstruction's gradient and the observed update at the end
    iterations: int
    reconstruction: np.ndarray

    def as_dict(self) -> dict[str, Any]:
        return {"ssim": self.ssim, "psnr": self.psnr, "gradient_similarity": self.gradient_similarity,
                "iterations": self.iterations}  # fmt: skip


def _named_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def one_step_gradient(
    model: nn.Module, image: torch.Tensor, label: torch.Tensor, loss_fn: Callable[..., torch.Tensor]
) -> dict[str, np.ndarray]:
    """The gradient a site computes on one patch (what one SGD step sends, up to the factor −lr)."""
    params = _named_params(model)
    grads = torch.autograd.grad(loss_fn(model(image), label).mean(), [p for _, p in params])
    return {n: g.detach().cpu().numpy().copy() for (n, _), g in zip(params, grads, strict=True)}


def invert_gradient(
    model: nn.Module,
    observed: Mapping[str, np.ndarray],
    label: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *,
    shape: tuple[int, ...],
    iterations: int = 200,
    lr: float = 0.05,
    tv_weight: float = 1e-3,
    seed: int = 0,
    sent_mask: Mapping[str, np.ndarray] | None = None,
) -> tuple[torch.Tensor, float]:
    """Optimise a dummy image whose gradient matches ``observed`` (cosine); return it and the final similarity.

    ``sent_mask``: the coordinates the attacker received (all if None); the rest take no part in the matching.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    params = _named_params(model)
    missing = [n for n, _ in params if n not in observed]
    if missing:
        raise ValueError(f"the observed update lacks {missing[:3]}")
    target = [torch.as_tensor(np.asarray(observed[n]), dtype=p.dtype) for n, p in params]
    masks = [
        torch.as_tensor(np.asarray(sent_mask[n]), dtype=p.dtype) if sent_mask is not None else None for n, p in params
    ]
    target = [t * m if m is not None else t for t, m in zip(target, masks, strict=True)]
    target_norm = torch.sqrt(sum((t * t).sum() for t in target))
    if not target_norm > 0:
        raise ValueError("the observed update is zero: nothing to invert")
    g = torch.Generator().manual_seed(seed)
    dummy = (0.5 + 0.1 * torch.randn(shape, generator=g)).requires_grad_(True)
    optimizer = torch.optim.Adam([dummy], lr=lr)
    was_training = model.training
    model.eval()  # instance norm has no running statistics: eval = train here, and no state changes
    similarity = 0.0
    try:
        for _ in range(iterations):
            optimizer.zero_grad()
            grads = torch.autograd.grad(loss_fn(model(dummy), label).mean(), [p for _, p in params], create_graph=True)
            grads = [gr * m if m is not None else gr for gr, m in zip(grads, masks, strict=True)]
            dot = sum((gr * t).sum() for gr, t in zip(grads, target, strict=True))
            norm = torch.sqrt(sum((gr * gr).sum() for gr in grads)) + 1e-12
            cos = dot / (norm * target_norm)
            loss = 1.0 - cos + tv_weight * _total_variation(dummy)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                dummy.clamp_(0.0, 1.0)
            similarity = float(cos.detach())
    finally:
        model.train(was_training)
    return dummy.detach(), similarity


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    spatial = range(2, x.dim())
    return sum((x.diff(dim=d).abs().mean() for d in spatial), torch.zeros(()))


def inversion_attack(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor,
    loss_fn: Callable[..., torch.Tensor],
    *,
    update_filter: UpdateFilter | None = None,
    iterations: int = 200,
    lr: float = 0.05,
    tv_weight: float = 1e-3,
    seed: int = 0,
) -> InversionResult:
    """Compute the site's one-patch gradient, filter it as it would be sent, invert it, score against the patch.

    ``image``: shape (1, 1, *spatial) in [0, 1] (the bundle's normalised intensities); ``label``: (1, 1, *spatial).
    """
    if image.shape[0] != 1:
        raise ValueError("the attack targets one patch (batch size 1)")
    gradient = one_step_gradient(model, image, label, loss_fn)
    sent = update_filter(gradient) if update_filter is not None else gradient
    mask = {n: (v != 0) for n, v in sent.items()} if update_filter is not None else None
    recon, similarity = invert_gradient(
        model, sent, label, loss_fn, shape=tuple(image.shape), iterations=iterations, lr=lr, tv_weight=tv_weight,
        seed=seed, sent_mask=mask,
    )  # fmt: skip
    truth = image[0, 0].detach().cpu().numpy()
    rec = recon[0, 0].cpu().numpy()
    data_range = float(truth.max() - truth.min()) or 1.0
    win = min(7, min(truth.shape) - (1 - min(truth.shape) % 2))
    result = InversionResult(
        ssim=ssim(truth, rec, data_range=data_range, win_size=win),
        psnr=psnr(truth, rec, data_range=data_range),
        gradient_similarity=similarity,
        iterations=iterations,
        reconstruction=rec,
    )
    log.info("gradient inversion: SSIM %.3f, PSNR %.1f dB, gradient cosine %.3f", result.ssim, result.psnr, similarity)
    return result
