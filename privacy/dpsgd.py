"""DP-SGD for a site's local training: one Opacus engine and accountant for a whole federated job.

What it guarantees: *sample-level* (ε, δ)-differential privacy *per site*: the unit protected is one training case
(one volume) of this site's dataset; ε composes over every optimizer step the site takes in the job (all rounds,
across client restarts through ``state_path``). It says nothing about other sites, nor about a patient with several
volumes (group privacy: ε grows with the number of volumes per patient).

How (Abadi et al. 2016, with Opacus's optimizer and accountants): Poisson sampling of cases with rate
q = 1 / ceil(N / batch_size); per-sample gradients (the bundle's ``DiceCELoss(batch=False)`` is a mean of per-sample
terms, checked at run time; default method ``vmap``, chosen by bench/bench_dp.py); each clipped to L2 norm
``max_grad_norm``; Gaussian noise of std σ·C added to their sum. An empty Poisson draw still
takes a step (noise only) and is accounted: skipping it would reveal that the batch was empty and break the
accounting, and Opacus's own empty batches crash MONAI dict batches.

Typical use in a federated client (the engine lives for the whole job)::

    engine = SitePrivacyEngine(config=DPSGDConfig.from_dict(cfg), dataset_size=len(ds), batch_size=2,
                               state_path=workspace / "dp_state.json")
    engine.reserve(ledger, dataset_id=..., job_id=...)               # before any training (atomic check + hold)
    model, optimizer, loader = engine.make_private(model=net, optimizer=opt, data_loader=loader)
    loss_fn = engine.wrap_loss(bundle.loss())                         # required (vmap: computes the gradients)
    for rnd in rounds:
        engine.load_global_weights(global_state)
        train_epoch(model, loader, optimizer, loss_fn, device=device)   # fetalseg.training
        engine.record(ledger, job_id=..., dataset_id=..., round=rnd)   # before sending
        send(engine.unwrapped_state_dict(), metrics | engine.report())
    engine.release(ledger, dataset_id=..., job_id=...)               # clean end: unspent ε given back
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from opacus.accountants import create_accountant
from opacus.grad_sample import prepare_module
from opacus.optimizers import DPOptimizer, get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping, DPTensorFastGradientClipping
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from fetalseg.plumbing import atomic_write_json
from privacy.accounting import epsilon_for_history, noise_multiplier_for_epsilon
from privacy.dp_config import (  # noqa: F401  (re-exported: the settings live in the torch-free module)
    ACCOUNTANTS,
    DEFAULT_ACCOUNTANT,
    DEFAULT_DELTA,
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    DPSGDConfig,
    _int_at_least,
    check_delta,
    check_ema_decay,
    check_multiplicity,
    steps_per_epoch,
)
from privacy.ema import IterateEMA
from privacy.full_batch import FullBatchLoader
from privacy.ledger import DatasetStatus, PrivacyBudgetExceeded, SiteLedger
from privacy.multiplicity import MultiViewDataset
from privacy.secure_aggregation.distributed_dp import DistributedNoise

log = logging.getLogger(__name__)

SCOPE = "sample-level DP, per site"
# Said wherever ε is reported: what the guarantee does not cover (docs/privacy.md, "Not covered by ε").
NOT_COVERED = (
    "NOT covered by ε: the number of cases (N sets the sample rate; the training, validation and test case and "
    "step counts are reported); hyper-parameters chosen by looking at the data; side channels (timing, "
    "floating-point and RNG-state attacks). Metrics a federated site sends pass privacy.released_metrics: noised "
    "and composed into this ε, or withheld"
)
# Where the noise comes from (no CSPRNG: Opacus's secure_mode needs torchcsprng, which has no build for this torch).
NOISE_SOURCE = (
    "torch.Generator (Mersenne Twister on CPU, Philox on GPU) seeded from os.urandom for each job's engine: not "
    "reproducible from any job-config seed, but not a cryptographically secure generator"
)
STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------------
# Loss: per-sample terms, checked
# ---------------------------------------------------------------------------------------------------------------


class PerSampleLoss(nn.Module):
    """A loss made of per-sample terms, computed sample by sample so ``reduction='none'`` gives one value each.

    Ghost clipping needs the per-sample loss vector; MONAI's ``DiceCELoss`` has no such reduction (setting its
    ``reduction`` attribute does not reach the inner Dice and CE terms, and Opacus would then scale one scalar by
    every sample's clip factor: silently wrong gradients).
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.reduction = "mean"

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        terms = [self.loss_fn(prediction[i : i + 1], target[i : i + 1]).reshape(()) for i in range(len(prediction))]
        per_sample = torch.stack(terms) if terms else prediction.sum() * 0.0
        if self.reduction == "none":
            return per_sample
        if self.reduction == "sum":
            return per_sample.sum()
        return per_sample.mean()


class _CheckedLoss(nn.Module):
    """The loss as given, verified once (on the first batch of ≥ 2) to be the mean of per-sample losses."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.loss_fn = loss_fn
        self.verified = False

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(prediction, target)
        if not self.verified and len(prediction) >= 2:
            with torch.no_grad():
                batch_value = loss.detach().mean()
                per_sample = PerSampleLoss(self.loss_fn)(prediction.detach(), target.detach())
            if not torch.allclose(batch_value, per_sample, rtol=1e-4, atol=1e-6):
                raise ValueError(
                    f"the loss is not a mean of per-sample terms (batch loss {float(batch_value):.6g} != mean of "
                    f"per-sample losses {float(per_sample):.6g}); DP-SGD's per-sample gradients would be wrong. "
                    "Use DiceCELoss(batch=False)"
                )
            self.verified = True
        return loss


class _GhostTensor(DPTensorFastGradientClipping):
    """Opacus's ghost-clipping loss, made to look like a scalar to ``fetalseg.training.train_step``."""

    def dim(self) -> int:
        return 0


class _GhostLoss(DPLossFastGradientClipping):
    def __call__(self, *args: Any, **kwargs: Any) -> _GhostTensor:
        out = super().__call__(*args, **kwargs)
        if out.loss_per_sample.dim() != 1:
            raise ValueError(f"ghost clipping needs one loss per sample, got shape {tuple(out.loss_per_sample.shape)}")
        return _GhostTensor(out.module, out.optimizer, out.loss_per_sample, out.loss_reduction)


def _reject_batch_coupled_loss(loss_fn: Any) -> None:
    """Refuse losses configured to mix samples (e.g. ``DiceLoss(batch=True)`` pools all samples' voxels)."""
    for obj in (loss_fn, getattr(loss_fn, "dice", None)):
        if obj is not None and getattr(obj, "batch", False) is True:
            raise ValueError(
                f"{type(loss_fn).__name__} has batch=True: its Dice term pools every sample of a batch, so "
                "per-sample gradients (and DP-SGD's clipping) would be wrong; use batch=False"
            )


# ---------------------------------------------------------------------------------------------------------------
# Per-sample gradients of the whole network with torch.func
# ---------------------------------------------------------------------------------------------------------------


class _PerSampleGradModule(nn.Module):
    """Base of the engine's own per-sample gradient modes: the loss from :meth:`SitePrivacyEngine.wrap_loss`
    fills ``p.grad_sample`` (shape ``(B, *p.shape)``, the gradients of the per-sample losses) for Opacus's
    ``DPOptimizer`` and returns their mean. In eval mode or without grad the module is the plain network.

    With ``views`` = K > 1 (augmentation multiplicity) a training batch is ``(B, K, C, ...)``: the forward returns
    the ``B·K`` outputs and ``p.grad_sample`` holds, per case, the gradient of the mean of its K views' losses (the
    average of their gradients), which the optimizer then clips: one case, one clipped contribution."""

    def __init__(self, module: nn.Module, views: int = 1) -> None:
        super().__init__()
        self._module = module
        self.views = check_multiplicity(views)
        self._trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        for _, p in self._trainable:
            p.grad_sample = None

    def _check_batch(self, x: torch.Tensor) -> None:
        if int(x.shape[0]) == 0:
            raise ValueError("empty batch: the DP engine takes a noise-only step for an empty Poisson draw instead")
        if self.views > 1 and (x.dim() < 3 or int(x.shape[1]) != self.views):
            raise ValueError(
                f"augmentation multiplicity {self.views}: a training batch must be (cases, {self.views} views, "
                f"channels, ...), got shape {tuple(x.shape)} (iterate the engine's loader)"
            )

    def _check_ready(self, batch: int, target: torch.Tensor) -> None:
        if int(target.shape[0]) != batch:
            raise ValueError(f"{target.shape[0]} targets for a batch of {batch}")
        if any(p.grad_sample is not None for _, p in self._trainable):
            raise RuntimeError("per-sample gradients of the previous batch are still there: call zero_grad() first")

    def compute_grad_samples(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError


class VmapGradSampleModule(_PerSampleGradModule):
    """Per-sample gradients from ``vmap(grad(per-sample loss))`` over the whole network.

    Why: Opacus's modes work layer by layer (hooks copy activations and backprops; "functorch" vmaps each layer's
    own forward again), 1.7–3.5× a plain step on the 3D U-Net. Vectorising the gradient of one sample's loss over
    the batch lets PyTorch batch every convolution (its per-sample weight gradient becomes one grouped
    convolution): the least CPU time of all modes, but grouped convolutions use one core (bench/results/dp.md).

    The gradient needs the labels, so in training mode ``forward`` keeps the batch and returns the network's output
    *without* a graph (a loss that is not the engine's cannot be back-propagated: it fails instead of training
    without DP); the engine's loss then computes the gradients.
    """

    def __init__(self, module: nn.Module, views: int = 1) -> None:
        super().__init__(module, views)
        self._pending: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(x)
        self._check_batch(x)
        self._pending = _plain_tensor(x)
        with torch.no_grad():
            return self._module(self._pending.flatten(0, 1) if self.views > 1 else self._pending)

    def compute_grad_samples(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Set ``p.grad_sample`` for the batch of the last forward; return the per-sample losses."""
        x, self._pending = self._pending, None
        if x is None:
            raise RuntimeError("run the model on the batch before computing its loss")
        self._check_ready(int(x.shape[0]), target)
        params = {n: p.detach() for n, p in self._trainable}
        module = self._module
        views = self.views

        def sample_loss(p: dict[str, torch.Tensor], xi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
            if views > 1:  # xi: (K, C, ...) one case's views; the loss is the mean of per-view terms
                return loss_fn(torch.func.functional_call(module, p, (xi,)), ti).reshape(())
            return loss_fn(torch.func.functional_call(module, p, (xi[None],)), ti[None]).reshape(())

        grads, losses = torch.func.vmap(
            torch.func.grad_and_value(sample_loss), in_dims=(None, 0, 0), randomness="different"
        )(params, x, target)
        for name, p in self._trainable:
            p.grad_sample = grads[name].detach()
        return losses.detach()


class LoopGradSampleModule(_PerSampleGradModule):
    """Per-sample gradients from one ordinary forward and backward pass per sample (micro-batches of one).

    Why: the network has no coupling between the samples of a batch (instance norm; Opacus's validator refuses
    batch norm), so the gradient of sample i's loss computed on sample i alone IS its per-sample gradient, exactly.
    A plain step on B samples costs about B one-sample steps on a CPU, and every pass uses the ordinary
    multi-threaded convolution kernels: close to a plain step in wall-clock time on a multi-core site, where
    ``vmap``'s grouped convolutions run on one core (bench/results/dp.md). Memory: the B graphs are held at once,
    as a plain step holds its batch's graph.

    In training mode ``forward`` runs each sample through the network with autograd and returns the outputs
    detached (a loss that is not the engine's has no graph to back-propagate: it fails instead of training
    without DP); the engine's loss back-propagates each sample's loss alone into ``p.grad_sample``.
    """

    def __init__(self, module: nn.Module, views: int = 1) -> None:
        super().__init__(module, views)
        self._outputs: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self._module(x)
        self._check_batch(x)
        x = _plain_tensor(x)
        # one case at a time; with views, that case's K views run as one batch of K
        self._outputs = [self._module(x[i] if self.views > 1 else x[i : i + 1]) for i in range(int(x.shape[0]))]
        return torch.cat([o.detach() for o in self._outputs])

    def compute_grad_samples(
        self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], target: torch.Tensor
    ) -> torch.Tensor:
        """Set ``p.grad_sample`` for the batch of the last forward; return the per-sample losses."""
        outputs, self._outputs = self._outputs, None
        if outputs is None:
            raise RuntimeError("run the model on the batch before computing its loss")
        self._check_ready(len(outputs), target)
        params = [p for _, p in self._trainable]
        per_param: list[list[torch.Tensor]] = [[] for _ in params]
        losses = []
        for i, out in enumerate(outputs):
            loss = loss_fn(out, target[i] if self.views > 1 else target[i : i + 1]).reshape(())
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for j, (g, p) in enumerate(zip(grads, params)):
                per_param[j].append(torch.zeros_like(p) if g is None else g)
            losses.append(loss.detach())
        for p, gs in zip(params, per_param):
            p.grad_sample = torch.stack(gs)
        return torch.stack(losses)


class LoopLoss(nn.Module):
    """The engine's loss in "loop" mode: per-sample gradients into ``p.grad_sample``, returns the batch loss.

    Each sample's loss is the given loss on that sample alone, so the update is the mean of per-sample terms by
    construction; losses that pool the batch (``batch=True``) are refused before (``wrap_loss``).
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], module: LoopGradSampleModule):
        super().__init__()
        self.loss_fn = loss_fn
        self.module = module

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = self.module.compute_grad_samples(self.loss_fn, _plain_tensor(target))
        return losses.mean().requires_grad_(True)  # backward() of this leaf touches no weight


class VmapLoss(nn.Module):
    """The engine's loss in "vmap" mode: per-sample gradients into ``p.grad_sample``, returns the batch loss.

    MONAI's one-hot conversion writes in place (not vmappable), so targets are one-hot encoded before the vmap and
    the loss is used with ``to_onehot_y=False``; the first batch checks that this gives the original loss value.
    """

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], module: VmapGradSampleModule):
        super().__init__()
        self.loss_fn = loss_fn
        self.module = module
        self.sample_loss_fn, self.onehot = _vmappable_loss(loss_fn)
        self.verified = False

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        prediction, target = _plain_tensor(prediction), _plain_tensor(target)
        views = self.module.views
        if views > 1:  # (B, K, C, ...) -> (B·K, C, ...), the layout of the predictions
            cases, target = int(target.shape[0]), target.flatten(0, 1)
        if self.onehot and target.shape[1] == 1:
            vtarget = nn.functional.one_hot(target[:, 0].long(), prediction.shape[1]).movedim(-1, 1).to(prediction)
        else:
            vtarget = target
        if not self.verified:
            with torch.no_grad():
                original = self.loss_fn(prediction, target).mean()
                per_sample = [
                    self.sample_loss_fn(prediction[i : i + 1], vtarget[i : i + 1]) for i in range(len(target))
                ]
                mean = torch.stack([v.reshape(()) for v in per_sample]).mean()
            if not torch.allclose(original, mean, rtol=1e-4, atol=1e-6):
                raise ValueError(
                    f"the loss is not a mean of per-sample terms (batch loss {float(original):.6g} != mean of "
                    f"per-sample losses {float(mean):.6g}); DP-SGD's per-sample gradients would be wrong"
                )
            self.verified = True
        if views > 1:
            vtarget = vtarget.unflatten(0, (cases, views))
        losses = self.module.compute_grad_samples(self.sample_loss_fn, vtarget)
        return losses.mean().requires_grad_(True)  # backward() of this leaf touches no weight


OWN_MODES: dict[str, type[_PerSampleGradModule]] = {"vmap": VmapGradSampleModule, "loop": LoopGradSampleModule}


def _vmappable_loss(loss_fn: Any) -> tuple[Any, bool]:
    """A copy of ``loss_fn`` taking one-hot targets (``to_onehot_y`` off everywhere) and whether it needs them."""
    holders = [m for m in _modules_of(loss_fn) if getattr(m, "to_onehot_y", False) is True]
    if not holders:
        return loss_fn, False
    clone = copy.deepcopy(loss_fn)
    for m in _modules_of(clone):
        if getattr(m, "to_onehot_y", False) is True:
            m.to_onehot_y = False
    return clone, True


def _modules_of(obj: Any) -> list[Any]:
    return list(obj.modules()) if isinstance(obj, nn.Module) else [obj]


def _plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (its metadata machinery does not go through torch.func)."""
    return t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t


# ---------------------------------------------------------------------------------------------------------------
# Poisson sampling with accounted empty draws
# ---------------------------------------------------------------------------------------------------------------


class _EmptyDraw:
    """Marker the collate function returns for an empty Poisson draw (picklable, for worker processes)."""


class _CollateOrEmpty:
    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, samples: list[Any]) -> Any:
        return _EmptyDraw() if len(samples) == 0 else self.collate_fn(samples)


class PoissonDataLoader:
    """Each case joins each batch independently with probability q; ``len()`` draws per pass.

    An empty draw is not yielded: the engine takes a noise-only step for it right away (accounted), so any
    training loop — including ``fetalseg.training.train_epoch``, which skips empty batches — stays correct.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        num_batches: int,
        collate_fn: Callable[[list[Any]], Any] | None,
        on_empty: Callable[[], None],
        on_batch: Callable[[], None],
        num_workers: int = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.dataset = dataset
        self.worker_init_fn = worker_init_fn
        self.sample_rate = float(sample_rate)
        self.num_batches = int(num_batches)
        self.collate_fn = collate_fn
        self.num_workers = int(num_workers)
        self.generator = generator
        self._on_empty = on_empty
        self._on_batch = on_batch
        self.batch_size = None  # variable: Poisson sampling

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        sampler = UniformWithReplacementSampler(
            num_samples=len(self.dataset),  # type: ignore[arg-type]
            sample_rate=self.sample_rate,
            generator=self.generator,
            steps=self.num_batches,
        )
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=_CollateOrEmpty(self.collate_fn),
            num_workers=self.num_workers,
            worker_init_fn=self.worker_init_fn,
        )
        for batch in loader:
            if isinstance(batch, _EmptyDraw):
                self._on_empty()
                continue
            self._on_batch()
            yield batch


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


class SitePrivacyEngine:
    """One site's DP-SGD engine for one federated job: wraps training once, accounts every step, persists state."""

    def __init__(
        self,
        *,
        config: DPSGDConfig,
        dataset_size: int,
        batch_size: int | None,
        state_path: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(config, DPSGDConfig):
            raise TypeError(f"config must be a DPSGDConfig (use DPSGDConfig.from_dict), got {type(config).__name__}")
        _int_at_least("dataset_size", dataset_size, 1)
        if config.full_batch and batch_size is not None:
            raise ValueError(
                f"full_batch uses every training case in every step (q = 1); a batch_size ({batch_size!r}) "
                "contradicts it: remove batch_size, or set full_batch false"
            )
        if not config.full_batch:
            _int_at_least("batch_size", batch_size, 1)
        config.check_dataset(dataset_size)
        self.config = config
        self.dataset_size = int(dataset_size)
        self.batch_size = None if batch_size is None else int(batch_size)
        self.steps_per_epoch = 1 if config.full_batch else steps_per_epoch(dataset_size, self.batch_size)  # type: ignore[arg-type]
        self.sample_rate = 1.0 / self.steps_per_epoch
        self.expected_batch_size = max(1, int(self.dataset_size * self.sample_rate))
        self.planned_steps = config.planned_total_steps(dataset_size=dataset_size, batch_size=batch_size)
        if config.noise_multiplier is not None:
            self.noise_multiplier = float(config.noise_multiplier)
        elif config.target_epsilon is not None and self.planned_steps is not None:
            self.noise_multiplier = noise_multiplier_for_epsilon(
                target_epsilon=config.target_epsilon,
                sample_rate=self.sample_rate,
                steps=self.planned_steps,
                delta=config.delta,
                accountant=config.accountant,  # type: ignore[arg-type]
            )
        else:  # DPSGDConfig refuses this; never train with an undefined noise
            raise ValueError("target_epsilon needs a plan (planned_steps or planned_rounds + local_epochs)")
        # Distributed DP (privacy.secure_aggregation.distributed_dp): the σ above is what the unmasked sum carries;
        # this site adds σ/√t, and its accountant counts the noise its trust level leaves (σ_site√max(1, t − c)).
        self.distributed = _distributed_noise(config, self.noise_multiplier)
        if self.distributed is not None:
            self.noise_multiplier = self.distributed.site_noise_multiplier
            self.accounting_noise_multiplier = self.distributed.charged_noise_multiplier
        else:
            self.accounting_noise_multiplier = self.noise_multiplier
        self.measured_noise_multipliers: list[float] = []  # per step, distributed DP only (read from the gradients)
        self.max_grad_norm = float(config.max_grad_norm)
        self.state_path = Path(state_path) if state_path is not None else None
        self._accountant = create_accountant(mechanism=config.accountant)
        self.empty_steps = 0
        self._pending_batches = 0
        self._module: nn.Module | None = None
        self._wrapped: nn.Module | None = None
        self._optimizer: DPOptimizer | None = None
        self._loader: PoissonDataLoader | FullBatchLoader | None = None
        self.ema: IterateEMA | None = None
        # Poisson sampling (CPU) and noise (on the model's device, made in make_private) use the engine's own
        # generators. Without a config seed they are seeded from os.urandom: never from torch's global generator,
        # which a federated client seeds from the job config (reproducible initialisation) and which Opacus would
        # otherwise use — anyone holding the config could then regenerate the noise and subtract it.
        self._sampling_generator = _new_generator(config.seed, torch.device("cpu"))
        self._noise_generator: torch.Generator | None = None
        self.noise_source = NOISE_SOURCE if config.seed is None else f"seeded from the job config (seed={config.seed})"
        if config.seed is not None:
            log.warning("DP-SGD noise and sampling are seeded (seed=%d): reproducible, so NOT private", config.seed)
        if self.state_path is not None and self.state_path.exists():
            self._restore()
        log.info(
            "DP-SGD (%s): N=%d, q=%.4g, σ=%.4g, C=%g, δ=%g, accountant=%s, %s planned steps (ε=%s), %d done",
            SCOPE,
            self.dataset_size,
            self.sample_rate,
            self.noise_multiplier,
            self.max_grad_norm,
            config.delta,
            config.accountant,
            self.planned_steps if self.planned_steps is not None else "no",
            _fmt(self.planned_epsilon),
            self.steps,
        )

    # -- accounting ------------------------------------------------------------------------------------------------
    @property
    def history(self) -> list[tuple[float, float, int]]:
        return [tuple(h) for h in self._accountant.history]  # type: ignore[misc]

    @property
    def steps(self) -> int:
        """DP steps taken in this job so far (including noise-only steps on empty draws and before restarts)."""
        return sum(int(h[2]) for h in self._accountant.history)

    @property
    def epsilon(self) -> float:
        """ε spent by this site in this job so far, at the config's δ."""
        return epsilon_for_history(self.history, delta=self.config.delta, accountant=self.config.accountant)  # type: ignore[arg-type]

    def epsilon_after(self, steps: int) -> float:
        """ε this engine would have spent after ``steps`` steps in total (for planning)."""
        return epsilon_for_history(
            [(self.accounting_noise_multiplier, self.sample_rate, int(steps))],
            delta=self.config.delta,
            accountant=self.config.accountant,  # type: ignore[arg-type]
        )

    @property
    def planned_epsilon(self) -> float | None:
        """ε after the planned steps (what a ledger must allow before the job starts); None without a plan."""
        return None if self.planned_steps is None else self.epsilon_after(self.planned_steps)

    def report(self) -> dict[str, Any]:
        """What the site reports with its metrics after a round (all values plain JSON types)."""
        return {
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "accountant": self.config.accountant,
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "steps": self.steps,
            "empty_steps": self.empty_steps,
            "planned_steps": self.planned_steps,
            "planned_epsilon": self.planned_epsilon,
            "target_epsilon": self.config.target_epsilon,
            "dataset_size": self.dataset_size,
            "expected_batch_size": self.expected_batch_size,
            "grad_sample_mode": self.config.grad_sample_mode,
            "full_batch": self.config.full_batch,
            "augmentation_multiplicity": self.config.augmentation_multiplicity,
            "ema_decay": self.config.ema_decay,
            "trained_weights": self.trained_weights,
            "scope": SCOPE,
            "noise_source": self.noise_source,
            "not_covered": NOT_COVERED,
            **self.distributed_report(),
        }

    def distributed_report(self, extra_history: Sequence[tuple[float, float, int]] = ()) -> dict[str, Any]:
        """``{"distributed_dp": ...}`` (empty without distributed DP): the noise shares, ε against the server alone,
        against the server + every other site (local DP) and the charged ε, so far and planned, each composed with
        ``extra_history`` (the site's other releases, e.g. noised metrics), and the noise measured at each step."""
        d = self.distributed
        if d is None:
            return {}
        kw = {"sample_rate": self.sample_rate, "delta": self.config.delta, "accountant": self.config.accountant}
        out: dict[str, Any] = d.describe()
        out.update(d.epsilons(steps=self.steps, extra_history=list(extra_history), **kw))  # type: ignore[arg-type]
        if self.planned_steps is not None:
            planned = d.epsilons(steps=self.planned_steps, extra_history=list(extra_history), **kw)  # type: ignore[arg-type]
            out.update({f"planned_{k}": v for k, v in planned.items()})
        out["composed_with_other_releases"] = bool(extra_history)
        m = self.measured_noise_multipliers
        out["measured_noise_multiplier_last"] = m[-1] if m else None
        out["measured_steps"] = len(m)
        return {"distributed_dp": out}

    def summary(self) -> str:
        """The job's ε in one plain sentence, with what it covers and what it does not (for logs and reports)."""
        plan = (
            f" of the {self.planned_steps} planned (ε={self.planned_epsilon:.3g} at the end of the plan)"
            if self.planned_steps is not None
            else ""
        )
        cfg = self.config
        sampling = (
            "full batch (every case, q = 1)" if cfg.full_batch else f"Poisson sample rate q={self.sample_rate:.3g}"
        )
        extras = (
            f"; {cfg.augmentation_multiplicity} augmented views averaged per case before clipping (one case, "
            "one privacy unit)"
            if cfg.augmentation_multiplicity > 1
            else ""
        )
        extras += (
            f"; sends the EMA of its DP iterates (decay {cfg.ema_decay:g}, post-processing)" if cfg.ema_decay else ""
        )
        return (
            f"DP-SGD ({SCOPE}): ε={self.epsilon:.3g} at δ={self.config.delta:g} ({self.config.accountant} "
            f"accountant) after {self.steps} steps{plan}; σ={self.noise_multiplier:.3g}, clip "
            f"C={self.max_grad_norm:g}, {sampling}{extras}. ε covers the weights this site sends. {NOT_COVERED}. "
            f"Noise: {self.noise_source}."
        )

    # -- ledger ----------------------------------------------------------------------------------------------------
    def check_budget(self, ledger: SiteLedger, *, dataset_id: str, job_id: str | None = None) -> DatasetStatus:
        """Refuse the job (before any training) if its planned ε does not fit in the dataset's budget."""
        planned = self.planned_epsilon
        if planned is None:
            raise ValueError(
                "cannot check a privacy budget without a plan: set planned_steps or planned_rounds + local_epochs"
            )
        return ledger.check_budget(
            dataset_id=dataset_id, planned_epsilon=planned, delta=self.config.delta, job_id=job_id
        )

    def reserve(self, ledger: SiteLedger, *, dataset_id: str, job_id: str) -> DatasetStatus:
        """Reserve this job's planned ε in the site ledger before any training (check + hold, atomically).

        Raises :class:`PrivacyBudgetExceeded` if spent + reserved by other jobs + this plan exceeds the dataset's
        budget: two jobs starting at once at one site cannot both pass when together they would overspend. The
        reservation survives a crash (it then counts until an admin releases it); call :meth:`release` at a clean
        end. Calling it again for the same job (a restarted client) is allowed.
        """
        planned = self.planned_epsilon
        if planned is None:
            raise ValueError(
                "cannot reserve a privacy budget without a plan: set planned_steps or planned_rounds + local_epochs"
            )
        return ledger.reserve(
            job_id=job_id,
            dataset_id=dataset_id,
            epsilon=planned,
            delta=self.config.delta,
            planned_steps=self.planned_steps,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            accountant=self.config.accountant,
            scope=SCOPE,
            **self.ledger_details(planned=True),
        )

    def ledger_details(self, extra_history: Sequence[tuple[float, float, int]] = (), *, planned: bool = False):
        """What a ledger entry adds under distributed DP (nothing otherwise): both ε values beside the charged one."""
        rep = self.distributed_report(extra_history).get("distributed_dp")
        if rep is None:
            return {}
        prefix = "planned_" if planned else ""
        keys = ("sites", "threshold", "colluding_sites", "site_noise_multiplier", "charged_noise_multiplier")
        out = {k: rep[k] for k in keys}
        out.update({k: rep.get(f"{prefix}{k}") for k in ("epsilon_server", "epsilon_local", "epsilon_charged")})
        return {"distributed_dp": out}

    def release(self, ledger: SiteLedger, *, dataset_id: str, job_id: str) -> float:
        """At the job's clean end (after its last :meth:`record`): give back the unspent part of its reservation.

        Returns the ε given back (0.0 if the job held no reservation, e.g. an admin already released it).
        What the job spent stays in the ledger.
        """
        freed = ledger.release(job_id=job_id, dataset_id=dataset_id, missing_ok=True)
        log.info("job %s released its reservation on %s: ε=%.4g unspent given back", job_id, dataset_id, freed)
        return freed

    def record(self, ledger: SiteLedger, *, job_id: str, dataset_id: str, round: int) -> DatasetStatus:
        """Write this job's cumulative ε to the ledger (do it before sending the round's update)."""
        return ledger.record(
            job_id=job_id,
            dataset_id=dataset_id,
            epsilon=self.epsilon,
            delta=self.config.delta,
            round=round,
            steps=self.steps,
            accountant=self.config.accountant,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            scope=SCOPE,
            **self.ledger_details(),
        )

    # -- wrapping --------------------------------------------------------------------------------------------------
    @property
    def trained_weights(self) -> int | None:
        """Scalar weights DP trains (``requires_grad``): the d of the noise's √d; None before make_private."""
        return None if self._module is None else sum(p.numel() for p in self._module.parameters() if p.requires_grad)

    def make_private(
        self, *, model: nn.Module, optimizer: torch.optim.Optimizer, data_loader: DataLoader
    ) -> tuple[nn.Module, DPOptimizer, PoissonDataLoader | FullBatchLoader]:
        """Wrap model (per-sample gradients), optimizer (clip + noise, accounted) and loader (Poisson, or every case
        with ``full_batch``; K views per case with ``augmentation_multiplicity``). Once per job.

        Only parameters with ``requires_grad`` are trained: per-sample gradients, their norms, the clipping and the
        noise cover those alone (a frozen weight gets no noise and counts in no norm)."""
        if self._optimizer is not None:
            raise RuntimeError("make_private is called once per job; reuse the objects it returned in every round")
        if isinstance(optimizer, DPOptimizer):
            raise ValueError("the optimizer is already a DPOptimizer; pass the plain optimizer")
        self._check_planned_steps_left()
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise ValueError(f"the model cannot be trained with DP-SGD: {errors} (use instance or group norm)")
        model_params = {id(p) for p in model.parameters()}
        if any(id(p) not in model_params for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer holds parameters that are not the model's")
        dataset = data_loader.dataset
        n = len(dataset)  # type: ignore[arg-type]
        if n != self.dataset_size:
            raise ValueError(
                f"the engine was set up for dataset_size={self.dataset_size} but the loader has {n} samples: "
                "the sample rate and ε would be wrong"
            )
        if self.config.full_batch:
            pass  # the engine's loader takes every case; the given loader's batch size is not used
        elif data_loader.batch_size is not None and data_loader.batch_size != self.batch_size:
            raise ValueError(
                f"the engine was set up for batch_size={self.batch_size} but the loader uses {data_loader.batch_size}"
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("every parameter of the model is frozen: DP-SGD would release noise and train nothing")
        if self.distributed is not None and type(optimizer) is not torch.optim.SGD:
            # the sum of the sites' updates must be linear in their noised gradients for the noise to add up:
            # Adam(W) divides each site's step by its own noisy second moment
            raise ValueError(
                f"distributed DP needs torch.optim.SGD at the site (a linear update), got {type(optimizer).__name__}: "
                'set bundle_overrides {"optimizer": {"_target_": "torch.optim.SGD", ...}}'
            )
        views = self.config.augmentation_multiplicity
        if views > 1:
            dataset = MultiViewDataset(dataset, views)
        mode = self.config.grad_sample_mode
        if mode in OWN_MODES:
            wrapped: nn.Module = OWN_MODES[mode](model, views)
        else:
            extra = {"max_grad_norm": self.max_grad_norm} if mode == "ghost" else {}
            wrapped = prepare_module(model, grad_sample_mode=mode, batch_first=True, loss_reduction="mean", **extra)
            wrapped.forbid_grad_accumulation()
        first = next(iter(model.parameters()), None)
        self._noise_generator = _new_generator(
            None if self.config.seed is None else self.config.seed + 1,
            first.device if first is not None else torch.device("cpu"),
        )
        optim_class = get_optimizer_class(
            clipping="flat", distributed=False, grad_sample_mode="hooks" if mode in OWN_MODES else mode
        )
        dp_optimizer = optim_class(
            optimizer=optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
            generator=self._noise_generator,
        )
        dp_optimizer.attach_step_hook(self._on_step)
        loader: PoissonDataLoader | FullBatchLoader
        if self.config.full_batch:
            loader = FullBatchLoader(
                dataset,
                collate_fn=data_loader.collate_fn,
                num_workers=data_loader.num_workers,
                worker_init_fn=data_loader.worker_init_fn,
                on_batch=self._on_batch,
            )
        else:
            loader = PoissonDataLoader(
                dataset,
                sample_rate=self.sample_rate,
                num_batches=self.steps_per_epoch,
                collate_fn=data_loader.collate_fn,
                num_workers=data_loader.num_workers,
                worker_init_fn=data_loader.worker_init_fn,
                generator=self._sampling_generator,
                on_empty=self._noise_only_step,
                on_batch=self._on_batch,
            )
        if self.config.ema_decay is not None:
            self.ema = IterateEMA(model, optimizer, wrapped, decay=self.config.ema_decay)
        self._module, self._wrapped, self._optimizer, self._loader = model, wrapped, dp_optimizer, loader
        self.save_state()
        return wrapped, dp_optimizer, loader

    def wrap_loss(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
        """The loss to train with: checked per-sample (hooks/functorch) or Opacus's ghost-clipping loss."""
        _reject_batch_coupled_loss(loss_fn)
        mode = self.config.grad_sample_mode
        if mode in ("functorch", "hooks"):
            return _CheckedLoss(loss_fn)
        if self._optimizer is None or self._wrapped is None:
            raise RuntimeError(f"call make_private before wrap_loss in {mode} mode")
        if mode == "vmap":
            return VmapLoss(loss_fn, self._wrapped)  # type: ignore[arg-type]
        if mode == "loop":
            return LoopLoss(loss_fn, self._wrapped)  # type: ignore[arg-type]
        return _GhostLoss(self._wrapped, self._optimizer, PerSampleLoss(loss_fn), loss_reduction="mean")  # type: ignore[arg-type]

    # -- weights ---------------------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The original (unwrapped) model."""
        if self._module is None:
            raise RuntimeError("make_private has not been called")
        return self._module

    def unwrapped_state_dict(self) -> dict[str, torch.Tensor]:
        """The original module's weights (no ``_module.`` prefix), detached CPU copies: what a site sends."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_global_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the server's global weights into the wrapped model (accepts ``_module.``-prefixed keys too)."""
        self.module.load_state_dict(strip_module_prefix(state_dict))

    # -- state -----------------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        extra = {} if self.distributed is None else {"distributed_dp": self.distributed.describe()}
        return {
            **extra,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "max_grad_norm": self.max_grad_norm,
            "delta": self.config.delta,
            "accountant": self.config.accountant,
            "dataset_size": self.dataset_size,
            "batch_size": self.batch_size,
            "planned_steps": self.planned_steps,
        }

    def save_state(self) -> None:
        """Write the accountant's history atomically (called after every step; cheap)."""
        if self.state_path is None:
            return
        state = {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "history": [list(h) for h in self._accountant.history],
            "empty_steps": self.empty_steps,
            "scope": SCOPE,
        }
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.state_path, state, indent=1)

    def _restore(self) -> None:
        if self.state_path is None:
            raise RuntimeError("no state path to restore from")
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if state.get("version") != STATE_VERSION:
                raise ValueError(f"unsupported state version {state.get('version')!r}")
            history = [(float(s), float(q), int(n)) for s, q, n in state["history"]]
            empty = int(state.get("empty_steps", 0))
            saved = dict(state["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(
                f"DP-SGD state {self.state_path} is unreadable ({exc}); refusing to restart the count at zero. "
                "Restore the file, or start a new job (new job id) so the ledger adds the spends up"
            ) from exc
        mine = self._fingerprint()
        if saved != mine:
            diff = {k: (saved.get(k), mine.get(k)) for k in set(saved) | set(mine) if saved.get(k) != mine.get(k)}
            raise ValueError(
                f"DP-SGD state {self.state_path} belongs to a different configuration (saved, now): {diff}; "
                "a resumed job must use the same settings"
            )
        self._accountant.history = history
        self.empty_steps = empty
        log.info("DP-SGD state restored from %s: %d steps, ε=%.4g", self.state_path, self.steps, self.epsilon)

    # -- hooks -----------------------------------------------------------------------------------------------------
    def _check_planned_steps_left(self) -> None:
        if self.planned_steps is not None and self.steps >= self.planned_steps:
            raise PrivacyBudgetExceeded(
                f"the job's {self.planned_steps} planned DP steps (ε={self.planned_epsilon:.4g}) are used up; "
                "no further step is taken or released"
            )

    def _on_batch(self) -> None:
        self._pending_batches = 1

    def _on_step(self, optimizer: DPOptimizer) -> None:
        """Runs inside ``optimizer.step()`` after noising, before the update is applied: may refuse the step."""
        if self._pending_batches <= 0:
            raise RuntimeError(
                "a DP step was taken without a batch from the engine's Poisson loader; ε would be wrong. "
                "Iterate the data loader returned by make_private"
            )
        if optimizer.noise_multiplier != self.noise_multiplier or optimizer.max_grad_norm != self.max_grad_norm:
            raise RuntimeError("noise multiplier or clip norm changed after make_private; ε would not match the plan")
        self._check_planned_steps_left()
        self._pending_batches -= 1
        if self.distributed is not None:
            self._measure_noise(optimizer)
        self._accountant.step(noise_multiplier=self.accounting_noise_multiplier, sample_rate=self.sample_rate)
        self.save_state()

    def _measure_noise(self, optimizer: DPOptimizer) -> None:
        """The noise this step added, read back from the gradients (noised and scaled grad × batch − clipped sum):
        its std ÷ the clip norm is the noise multiplier actually applied (tests and reports check it is σ/√t)."""
        scale = float(optimizer.expected_batch_size * optimizer.accumulated_iterations)
        total, count = 0.0, 0
        for p in optimizer.params:
            summed = getattr(p, "summed_grad", None)
            if p.grad is None or summed is None:
                continue
            noise = p.grad.detach().double() * scale - summed.detach().double().view_as(p.grad)
            total += float((noise * noise).sum())
            count += noise.numel()
        if count:
            self.measured_noise_multipliers.append(math.sqrt(total / count) / self.max_grad_norm)

    def _noise_only_step(self) -> None:
        """An empty Poisson draw: release noise only (a real DP-SGD step with zero gradients), accounted."""
        opt = self._optimizer
        if opt is None:
            raise RuntimeError("make_private has not been called")
        opt.zero_grad(set_to_none=True)
        for p in opt.params:
            if self.config.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self._pending_batches = 1
        if self.ema is not None:
            self.ema.use_iterate()  # the noise is added to the DP iterate, not to its average
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.empty_steps += 1
        self.save_state()
        log.debug("empty Poisson draw: noise-only step %d (accounted)", self.steps)


def _distributed_noise(config: DPSGDConfig, noise_multiplier: float) -> DistributedNoise | None:
    """The site's share of distributed DP's noise (None when the config is not distributed)."""
    if not config.distributed:
        return None
    if config.distributed_sites is None or config.distributed_threshold is None:
        raise ValueError(
            "distributed DP needs the job's number of sites and secure-aggregation threshold (nvflare_jobs.plan "
            "fills them in from server.secure_aggregation); refusing to guess the noise share"
        )
    return DistributedNoise(
        sites=config.distributed_sites,
        threshold=config.distributed_threshold,
        noise_multiplier=noise_multiplier,
        colluding_sites=config.colluding_sites,
    )


def _new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A private generator on ``device``: seeded with ``seed`` (tests), else with 63 bits from ``os.urandom``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


def strip_module_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove Opacus's ``_module.`` key prefix (a wrapped model's state dict) so the plain network can load it."""
    return {(k[len("_module.") :] if k.startswith("_module.") else k): v for k, v in state_dict.items()}


def _fmt(value: float | None) -> str:
    return "?" if value is None else f"{value:.4g}"
