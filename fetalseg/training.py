"""Training steps shared by the centralized baseline, the NVFlare client and MONAI Label fine-tuning.

All three train the bundle's network with the bundle's transforms, loss and optimizer through these functions,
so a federated round and a local epoch are the same code. The privacy layer wraps the model, optimizer and loader
(Opacus) and then calls :func:`train_epoch` like everyone else.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.data import CacheDataset, DataLoader, Dataset
from monai.utils import set_determinism

from fetalseg.bundle import Bundle, save_checkpoint
from fetalseg.data.loaders import Case
from fetalseg.evaluation import evaluate_cases
from fetalseg.metrics import nanmean

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """What one pass over the local data did."""

    loss: float
    steps: int
    samples: int
    seconds: float


@dataclass
class FitResult:
    """Outcome of :func:`fit`: per-epoch history and the best validation score."""

    history: list[dict[str, Any]] = field(default_factory=list)
    best_mean_dice: float = float("nan")
    best_epoch: int = -1
    epochs_run: int = 0
    seconds: float = 0.0
    checkpoint: Path | None = None


def items_of(cases: Sequence[Case]) -> list[dict]:
    return [c.as_item() for c in cases]


def build_train_dataset(bundle: Bundle, cases: Sequence[Case], *, cache: bool = True) -> Dataset:
    """Dataset applying the bundle's ``train_transforms``; the deterministic prefix is cached in memory."""
    if bundle.purpose != "train":
        raise ValueError("build_train_dataset needs Bundle('train')")
    items = items_of(cases)
    if not items:
        raise ValueError("no training cases")
    if any("label" not in it for it in items):
        raise ValueError("every training case needs a label")
    transform = bundle.train_transforms()
    if cache:
        return CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    return Dataset(items, transform=transform)


def build_train_loader(
    bundle: Bundle,
    cases: Sequence[Case] | None = None,
    *,
    dataset: Dataset | None = None,
    batch_size: int | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
) -> DataLoader:
    """Loader over ``cases`` (or a prebuilt ``dataset``), batch size from ``train.json`` unless given."""
    dataset = dataset if dataset is not None else build_train_dataset(bundle, cases or [])
    bs = int(batch_size if batch_size is not None else bundle.get("batch_size"))
    return DataLoader(dataset, batch_size=bs, shuffle=shuffle, num_workers=num_workers)


def train_step(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device | str = "cpu",
) -> float:
    """One optimisation step on one batch; returns the loss value."""
    images = batch["image"].to(device)
    labels = batch["label"].to(device)
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(images), labels)
    if loss.dim() > 0:  # a per-sample loss (as DP-SGD uses) is averaged here
        loss = loss.mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def train_epoch(
    model: torch.nn.Module,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass over ``loader`` (at most ``max_steps`` batches). Empty batches are skipped, not stepped on."""
    model.train()
    start = time.perf_counter()
    total, steps, samples = 0.0, 0, 0
    for batch in loader:
        if max_steps is not None and steps >= max_steps:
            break
        n = int(batch["image"].shape[0])
        if n == 0:
            continue
        value = train_step(model, batch, optimizer, loss_fn, device=device)
        if not math.isfinite(value):
            raise FloatingPointError(f"training loss became {value} at step {steps}; lower the learning rate")
        total += value
        steps += 1
        samples += n
        if on_step is not None:
            on_step(steps, value)
    return EpochStats(loss=total / max(steps, 1), steps=steps, samples=samples, seconds=time.perf_counter() - start)


def fit(
    bundle: Bundle,
    train_cases: Sequence[Case],
    val_cases: Sequence[Case],
    *,
    max_epochs: int | None = None,
    time_budget_s: float | None = None,
    val_interval: int = 5,
    network: torch.nn.Module | None = None,
    checkpoint: Path | None = None,
    seed: int | None = None,
    progress: bool = False,
    checkpoint_info: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, FitResult]:
    """Train on ``train_cases``, validate on ``val_cases`` every ``val_interval`` epochs, keep the best weights.

    Stops after ``max_epochs`` (default: ``train.json``) or when ``time_budget_s`` is used up, whichever is first;
    the final validation always runs. The best model (by validation mean Dice) is returned and, if ``checkpoint``
    is given, written there atomically.
    """
    seed = int(bundle.get("seed", 0) if seed is None else seed)
    set_determinism(seed=seed)
    max_epochs = int(max_epochs if max_epochs is not None else bundle.get("max_epochs"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = (network or bundle.network()).to(device)
    optimizer = bundle.optimizer(model.parameters())
    loss_fn = bundle.loss()
    loader = build_train_loader(bundle, train_cases)
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    start = time.perf_counter()
    bar = _progress(total=max_epochs, enabled=progress, desc="train")
    for epoch in range(1, max_epochs + 1):
        stats = train_epoch(model, loader, optimizer, loss_fn, device=device)
        record: dict[str, Any] = {"epoch": epoch, "loss": stats.loss, "seconds": time.perf_counter() - start}
        out_of_time = time_budget_s is not None and time.perf_counter() - start >= time_budget_s
        if val_cases and (epoch % val_interval == 0 or epoch == max_epochs or out_of_time):
            scores = evaluate_cases(model, val_cases, bundle=bundle, device=device, with_hd95=False)
            record["val_mean_dice"] = nanmean(s.mean_dice for s in scores)
            if not (record["val_mean_dice"] <= result.best_mean_dice):  # first score or better (NaN-safe)
                result.best_mean_dice = record["val_mean_dice"]
                result.best_epoch = epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        result.history.append(record)
        result.epochs_run = epoch
        bar.update(1)
        bar.set_postfix(loss=f"{stats.loss:.3f}", dice=f"{result.best_mean_dice:.3f}")
        log.info("epoch %d loss %.4f %s", epoch, stats.loss, record.get("val_mean_dice", ""))
        if out_of_time:
            break
    bar.close()
    result.seconds = time.perf_counter() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    if checkpoint is not None:
        info = {"epoch": result.best_epoch, "val_mean_dice": result.best_mean_dice, "bundle_version": bundle.version}
        result.checkpoint = save_checkpoint(model, checkpoint, **info, **(checkpoint_info or {}))
    return model, result


def _progress(*, total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="epoch", leave=False)
