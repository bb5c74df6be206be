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


def write_initial_model(
    checkpoint: str | Path, out: str | Path, *, bundle_overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Turn a bundle checkpoint into the initial global model NVFlare's persistor loads (``net.``-prefixed keys).

    Why: a federation usually starts from a model pretrained on public data (with DP-SGD it is what keeps the
    private model usable); the bundle's checkpoint format has no ``net.`` prefix. The weights are loaded strictly
    into the job's network first, so a checkpoint of another architecture or grid fails here, before any site
    trains. Returns provenance for the job's records (file name, the first 16 hex digits of its SHA-256: enough
    to tell checkpoints apart, and short of what NVFlare's exporter flags as a possible secret; its own info).
    """
    import hashlib

    from fetalseg.bundle import load_checkpoint

    source = Path(checkpoint)
    if not source.is_file():
        raise ValueError(f"initial_checkpoint {source} does not exist (a bundle checkpoint .pt is expected)")
    model = FetalBrainNet(bundle_overrides, init_seed=None)
    try:
        info = load_checkpoint(model.net, source)
    except Exception as e:  # unpickling errors, missing/unexpected keys, shape mismatches
        raise ValueError(
            f"initial_checkpoint {source} does not fit the job's network (bundle overrides "
            f"{dict(bundle_overrides or {})}): {type(e).__name__}: {str(e).splitlines()[0][:300]}"
        ) from e
    save_checkpoint(model, out)  # {"model": net.-prefixed state dict}, atomically
    return {
        "file": source.name,
        "sha256_prefix": hashlib.sha256(source.read_bytes()).hexdigest()[:16],
        "info": {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) or v is None},
    }
