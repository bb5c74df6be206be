"""Augmentation multiplicity (De et al. 2022): K augmented views of one case, averaged before that case's clipping.

Why: with tens of cases per site, DP-SGD's noise dominates the clipped signal. Averaging the gradients of K random
views (patches, flips, intensity changes from the bundle's train transforms) of ONE case lowers the variance of
that case's gradient without changing what one case can contribute: the average of K gradients is still ONE
vector, clipped to norm ≤ C like any per-case gradient. The privacy unit (one case) and the accounting (q, σ,
steps) are therefore unchanged by K (tests/privacy/test_multiplicity.py checks the ≤ C bound with K views).

The views are stacked on a new axis after the case axis: a batch is ``(cases, K, channels, ...)``; the engine's
per-sample gradient modules (``vmap`` and ``loop``) run a case's K views as one batch and differentiate the mean
of their losses (the bundle's loss is a mean of per-sample terms, checked at run time).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from privacy.dp_config import MULTIPLICITY_MODES, check_multiplicity  # noqa: F401  (re-exported)

# Per-sample gradient modes that average a case's views before clipping (privacy.dpsgd's own modes).
VIEW_KEYS: tuple[str, ...] = ("image", "label")


def _plain(t: Any) -> torch.Tensor:
    """A tensor without MONAI metadata (the views are stacked; their per-view metadata is not needed)."""
    t = torch.as_tensor(t)
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


class MultiViewDataset(Dataset):
    """``dataset[i]`` drawn K times (each draw re-runs the random transforms), image and label stacked: (K, C, ...).

    The underlying dataset must apply its random transforms on every access (MONAI's ``CacheDataset`` caches only
    the deterministic prefix, as ``fetalseg.training.build_train_dataset`` builds it).
    """

    def __init__(self, dataset: Dataset, views: int) -> None:
        self.dataset = dataset
        self.views = check_multiplicity(views)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def _draw(self, index: int) -> list[dict[str, Any]]:
        item = self.dataset[index]
        items = item if isinstance(item, list) else [item]  # a crop transform with num_samples > 1 gives a list
        if not items or not all(isinstance(it, dict) and all(k in it for k in VIEW_KEYS) for it in items):
            raise ValueError(f"augmentation multiplicity needs dict samples with {VIEW_KEYS}, got {type(item)}")
        return items

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        drawn: list[dict[str, Any]] = []
        while len(drawn) < self.views:
            drawn += self._draw(index)
        drawn = drawn[: self.views]
        return {key: torch.stack([_plain(v[key]) for v in drawn]) for key in VIEW_KEYS}
