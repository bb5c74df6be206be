"""Shared pieces of the small-N DP tests: a dataset whose random 'augmentation' is reproducible, one-step engines."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine

SIZE = 16


class NoisyViews(torch.utils.data.Dataset):
    """``n`` cases; every access returns a new random view (image + noise drawn from a call counter's seed)."""

    def __init__(self, n: int, *, dtype: torch.dtype = torch.float64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, SIZE, SIZE, SIZE, generator=g, dtype=dtype)
        self.labels = torch.randint(0, 8, (n, 1, SIZE, SIZE, SIZE), generator=g)
        self.calls = 0

    def __len__(self) -> int:
        return len(self.images)

    def view(self, index: int, call: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + call)
        noise = 0.5 * torch.randn(self.images[index].shape, generator=g, dtype=self.images.dtype)
        return {"image": self.images[index] + noise, "label": self.labels[index]}

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        self.calls += 1
        return self.view(index, self.calls - 1)


def one_step_engine(net, dataset, *, lr: float = 1.0, optimizer_params=None, after_step=None, **cfg):
    """A full-batch engine on ``dataset`` with plain SGD; returns (engine, model, optimizer, loader).

    ``after_step`` runs after every applied update, before any hook the engine registers (it sees the raw update).
    """
    cfg = {"noise_multiplier": 1e-9, "max_grad_norm": 1e-3, "full_batch": True, "seed": 0} | cfg
    engine = SitePrivacyEngine(config=DPSGDConfig(**cfg), dataset_size=len(dataset), batch_size=None)
    params = net.parameters() if optimizer_params is None else optimizer_params
    optimizer = torch.optim.SGD(params, lr=lr)
    if after_step is not None:
        optimizer.register_step_post_hook(lambda *_: after_step())
    model, dp_optimizer, loader = engine.make_private(
        model=net, optimizer=optimizer, data_loader=DataLoader(dataset, batch_size=1)
    )
    return engine, model, dp_optimizer, loader


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])
