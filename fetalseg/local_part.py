"""A site's local part: the weights a site learns from its own cases and never sends (FedBN-style local groups,
a fine-tune without DP), kept in their own checkpoint file beside the shared (federated, DP) global model.

Why a file format of its own, here in the core: the NVFlare client writes it and the MONAI Label app loads it, and
the two never import each other (they meet through files). The file holds ONLY the local tensors (bundle key names,
no wrapper prefix) and its provenance, and says what it is (``part: "local"``, ``sharing: "local: never sent"``),
so every exit of the site (job export, model install, ``GET /model``) can recognise and refuse it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetalseg.bundle import save_checkpoint

PART_KEY = "part"
LOCAL = "local"
NEVER_SENT = "local: never sent"
# a checkpoint whose weights include a site's local part (merged into a whole model) records the part here
CONTAINS_LOCAL_KEY = "local_part"
LOCAL_FINETUNE_ORIGIN = "local-finetune"  # the MONAI Label app's own fine-tune on the site's cases (no DP)


class LocalPartError(ValueError):
    """A local part that does not fit, or a model with local parts on its way out of the site."""


class _Tensors(nn.Module):
    """Just enough of a module for :func:`fetalseg.bundle.save_checkpoint` (atomic write) to save named tensors."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self._tensors = dict(tensors)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return dict(self._tensors)


def state_hash(state: Mapping[str, torch.Tensor], keys: Iterable[str] | None = None) -> str:
    """SHA-256 of the named tensors (sorted by name; float64 bytes, so the dtype a copy went through does not
    change it): identifies the global model a local part was learned on."""
    digest = hashlib.sha256()
    for key in sorted(state if keys is None else keys):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().to(torch.float64).contiguous().numpy().tobytes())
    return digest.hexdigest()


def save_local_part(tensors: Mapping[str, torch.Tensor], path: str | Path, *, parameters: str, **info: Any) -> Path:
    """Write ``tensors`` (bundle key names) with their provenance, atomically; nothing else goes in the file."""
    if not tensors:
        raise LocalPartError("a local part needs at least one tensor")
    meta = {PART_KEY: LOCAL, "sharing": NEVER_SENT, "parameters": parameters, "keys": sorted(tensors), **info}
    return save_checkpoint(_Tensors({k: v.detach().cpu().clone() for k, v in tensors.items()}), path, **meta)


def is_local_part(info: Mapping[str, Any]) -> bool:
    return info.get(PART_KEY) == LOCAL


def holds_local_parts(info: Mapping[str, Any]) -> bool:
    """True for a checkpoint that must not leave the site: a local part, a whole model with a local part merged in,
    or the app's own fine-tune on the site's cases (learned without DP)."""
    return is_local_part(info) or bool(info.get(CONTAINS_LOCAL_KEY)) or info.get("origin") == LOCAL_FINETUNE_ORIGIN


def read_local_part(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, info) of a local-part file; :class:`LocalPartError` if the file is not one."""
    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping) or not is_local_part(ckpt):
        raise LocalPartError(f"{path} is not a site's local part (no '{PART_KEY}: {LOCAL}' in it)")
    state = {str(k): torch.as_tensor(v) for k, v in ckpt["model"].items()}
    return state, {k: v for k, v in ckpt.items() if k != "model"}


def apply_local_part(network: nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str = "local part") -> None:
    """Copy the local tensors into ``network`` (in place). Strict: every key must be one of the network's
    parameters with the same shape, or nothing is changed."""
    params = dict(network.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise LocalPartError(f"{source}: {len(unknown)} key(s) are not parameters of the network (e.g. {unknown[:3]})")
    wrong = [k for k, v in tensors.items() if tuple(v.shape) != tuple(params[k].shape)]
    if wrong:
        k = wrong[0]
        shapes = f"{tuple(tensors[k].shape)} vs {tuple(params[k].shape)}"
        raise LocalPartError(f"{source}: {len(wrong)} tensor(s) with the wrong shape (e.g. {k}: {shapes})")
    with torch.no_grad():
        for key, value in tensors.items():
            params[key].copy_(value.to(params[key].dtype))
