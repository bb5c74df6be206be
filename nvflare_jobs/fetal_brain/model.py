"""The network NVFlare federates: the MONAI bundle's ``network_def``, wrapped so a job config can build it.

NVFlare builds the server's model from a class path plus JSON arguments, so the wrapper's only arguments are the
bundle overrides (e.g. a smaller ``patch_size`` for tests) and an initialisation seed. The layers themselves are
never written here: they come from :meth:`fetalseg.bundle.Bundle.network`. The wrapped network sits under
``self.net``, so federated state-dict keys start with ``net.``; :meth:`FetalBrainNet.bundle_state_dict` and
:func:`save_bundle_checkpoint` strip that prefix to write the bundle's own checkpoint format.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fetalseg.bundle import Bundle, save_checkpoint

PREFIX = "net."


class FetalBrainNet(torch.nn.Module):
    """The bundle's segmentation network (fresh weights; deterministic when ``init_seed`` is given)."""

    def __init__(self, bundle_overrides: Mapping[str, Any] | None = None, init_seed: int | None = 0) -> None:
        super().__init__()
        # Stored under the argument names so NVFlare's job exporter can re-create this object from its config.
        self.bundle_overrides = dict(bundle_overrides or {})
        self.init_seed = init_seed
        bundle = Bundle("common", overrides=self.bundle_overrides)
        if init_seed is None:
            self.net = bundle.network()
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(init_seed))
                self.net = bundle.network()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def bundle_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights with the bundle's own key names (what ``CheckpointLoader`` and the MONAI Label app load)."""
        return {k: v.detach().cpu() for k, v in self.net.state_dict().items()}


def to_state_dict(params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """NVFlare parameters (NumPy arrays or tensors) as a torch state dict."""
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v)) for k, v in params.items()}


def save_bundle_checkpoint(
    params: Mapping[str, Any], path: str | Path, *, bundle_overrides: Mapping[str, Any] | None = None, **info: Any
) -> Path:
    """Write federated weights (``net.``-prefixed) in the bundle's checkpoint format, atomically.

    The weights are loaded into a fresh :class:`FetalBrainNet` first (strict), so a checkpoint is only written when
    it really fits the bundle's network. The overrides are recorded with ``info`` (a model trained at another
    ``pixdim`` / ``patch_size`` must be used with the same values).
    """
    model = FetalBrainNet(bundle_overrides, init_seed=None)
    model.load_state_dict(to_state_dict(params), strict=True)
    return save_checkpoint(model.net, path, bundle_overrides=dict(bundle_overrides or {}), **info)
