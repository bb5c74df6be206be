"""Full-batch DP-GD: every training case in every step (sample rate q = 1, no Poisson sampling).

Why (small-N DP literature, e.g. De et al. 2022, Sander et al. 2023): with N of a few tens, Poisson subsampling
buys little amplification while it multiplies the noise relative to the signal of a small batch; one step on all N
clipped per-case gradients has the best signal-to-noise per unit of ε. The accountant is told q = 1, one step per
local epoch (``planned_rounds × local_epochs`` steps). The batch holds all N cases at once (× K views with
augmentation multiplicity): its memory is that of N·K samples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate


class FullBatchLoader:
    """One batch per pass: the whole dataset, in its order (its random transforms are drawn anew each pass)."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        on_batch: Callable[[], None],
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        worker_init_fn: Callable[[int], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn or default_collate
        self.num_workers = int(num_workers)
        self.worker_init_fn = worker_init_fn
        self._on_batch = on_batch
        self.batch_size = None  # the whole dataset (not a fixed physical batch size)
        self.sample_rate = 1.0

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[Any]:
        n = len(self.dataset)  # type: ignore[arg-type]
        loader = DataLoader(
            self.dataset,
            batch_size=n,
            shuffle=False,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            worker_init_fn=self.worker_init_fn,
        )
        for batch in loader:
            self._on_batch()
            yield batch
