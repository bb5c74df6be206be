"""A site's local part: the weights a site learns from its own cases and never sends (FedBN-style local groups,
a fine-tune without DP), kept in their own checkpoint file beside the shared (federated, DP) global model.

Why a file format of its own, here in the core: the NVFlare client writes it and the MONAI Label app loads it, and
the two never import each other (they meet through files). The file holds ONLY the local tensors (bundle key names,
no wrapper prefix) and its provenance, and says what it is (``part: "local"``, ``sharing: "local: never sent"``),
so every exit of the site (job export, model install, ``GET /model``) can recognise and refuse it.

A local part is only meaningful beside the global model it was learned with: it records that model (``job_id``,
``global_round``: the global model after that many aggregations, and ``global_model_sha256``: the hash of its shared
weights when the site received it), and :func:`check_matches_global` refuses any other pairing, so a site never
serves a local part on top of a global model from another job or round.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fetalseg.bundle import load_checkpoint_file, save_checkpoint

PART_KEY = "part"
LOCAL = "local"
NEVER_SENT = "local: never sent"
# a checkpoint whose weights include a site's local part (merged into a whole model) records the part here
CONTAINS_LOCAL_KEY = "local_part"
GLOBAL_SHA_KEY = "global_model_sha256"  # hash of the shared weights of the global model the part goes with
GLOBAL_ROUND_KEY = "global_round"  # that global model's number of aggregations
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


def shared_part_hash(state: Mapping[str, torch.Tensor], local_keys: Iterable[str], *, prefix: str = "") -> str:
    """SHA-256 of a global model's SHARED weights: key names with ``prefix`` (e.g. ``net.``) removed, the local
    part's keys (bundle names) left out. The NVFlare client hashes the federated state it received, the MONAI Label
    app the bundle checkpoint it serves; the two agree exactly when the shared weights are the same."""
    stripped = {(k[len(prefix) :] if prefix and k.startswith(prefix) else k): v for k, v in state.items()}
    local = {k[len(prefix) :] if prefix and k.startswith(prefix) else k for k in local_keys}
    return state_hash(stripped, [k for k in stripped if k not in local])


def check_matches_global(
    tensors: Mapping[str, torch.Tensor],
    info: Mapping[str, Any],
    *,
    global_state: Mapping[str, torch.Tensor],
    global_info: Mapping[str, Any],
    source: str = "local part",
) -> None:
    """Raise :class:`LocalPartError` unless the local part (``tensors``, ``info``) was learned with the global model
    ``global_state`` (bundle key names) / ``global_info`` (its checkpoint facts). Why: a local part fitted to
    another global model (another job, an earlier round, the best instead of the final model) silently degrades
    or breaks the served model; refusing is the only safe answer.

    Checked: the file's recorded keys are its tensors; every key is a weight of the global model with the same
    shape; the global model is the one the part records (the hash of its shared weights when the site received it,
    else the same job id and number of aggregations)."""
    recorded = info.get("keys")
    if recorded is not None and sorted(recorded) != sorted(tensors):
        raise LocalPartError(f"{source}: the file lists keys {sorted(recorded)[:3]}... that are not its tensors")
    missing = sorted(set(tensors) - set(global_state))
    if missing:
        raise LocalPartError(
            f"{source}: {len(missing)} key(s) are not parameters of the network of the global model (e.g. "
            f"{missing[:3]}): it was learned for another network; install the global model of the same job"
        )
    wrong = [k for k in tensors if tuple(tensors[k].shape) != tuple(global_state[k].shape)]
    if wrong:
        k = wrong[0]
        raise LocalPartError(
            f"{source}: {len(wrong)} tensor(s) with another shape than in the global model (e.g. {k}: "
            f"{tuple(tensors[k].shape)} vs {tuple(global_state[k].shape)}); install the global model of the same job"
        )
    job, round_ = info.get("job_id"), info.get(GLOBAL_ROUND_KEY)
    want = info.get(GLOBAL_SHA_KEY)
    g_job, g_round = global_info.get("job_id"), global_info.get("round")
    learned_with = f"job {job!r}" + (f", global model after {round_} round(s)" if round_ is not None else "")
    served = f"job {g_job!r}, round {g_round!r}"
    fix = (
        f"install the global model of job {job!r} it was learned with together with it (fetal-fl app "
        "install-model <that job's folder or checkpoint> --local <this file>), or remove the local part"
    )
    if not want and not job:
        raise LocalPartError(f"{source} records no global model it was learned with (no job id, no hash): {fix}")
    if job and g_job and str(job) != str(g_job):
        raise LocalPartError(f"{source} was learned with {learned_with}; the global model is from {served}: {fix}")
    if want:
        have = shared_part_hash(global_state, tensors)
        if have != want:
            raise LocalPartError(
                f"{source} was learned with {learned_with} (shared weights sha256 {str(want)[:12]}…); the global "
                f"model ({served}) has shared weights sha256 {have[:12]}…: {fix}"
            )
        return
    if not g_job:
        raise LocalPartError(
            f"{source} records only job {job!r}, and the global model records no job id: the pairing cannot be "
            f"checked; {fix}"
        )
    if round_ is not None and g_round is not None and int(round_) != int(g_round):
        raise LocalPartError(f"{source} was learned with {learned_with}; the global model is from {served}: {fix}")


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
    ckpt = load_checkpoint_file(path)
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
