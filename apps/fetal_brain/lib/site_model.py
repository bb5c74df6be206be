"""Install the model a site serves: the federated global model, and this site's local part beside it.

Why a step of its own around :func:`apps.fetal_brain.lib.exchange.install_model`: a local part (weights the site
learned from its own cases, never sent; :mod:`fetalseg.local_part`) is only valid on the global model it was learned
with. Here the pair is checked BEFORE anything is replaced (keys, shapes, job id, hash of the global model's shared
weights: :func:`fetalseg.local_part.check_matches_global`) and the merged model must give finite output; a mismatch
installs nothing. Installing a global model without a local part retires an installed part that does not belong to
it (moved to ``history/``): the server would refuse to serve the pair anyway.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from apps.fetal_brain.lib.errors import InputError, UnprocessableError
from apps.fetal_brain.lib.exchange import check_forward, find_checkpoint, install_model
from apps.fetal_brain.lib.model_store import HISTORY_DIR, ModelStore, load_into, read_checkpoint
from fetalseg.local_part import (
    LocalPartError,
    apply_local_part,
    check_matches_global,
    holds_local_parts,
    read_local_part,
    save_local_part,
)

log = logging.getLogger(__name__)

LocalPart = tuple[dict[str, torch.Tensor], dict[str, Any]]


def _global_of(
    source: str | Path, store: ModelStore, *, trust_pickle: bool, job_id: str | None, fl_round: int | None
) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """(file, bundle-key state, facts) of the global checkpoint ``source`` as :func:`install_model` will record it."""
    path = find_checkpoint(source)
    state, info = read_checkpoint(path, trust_pickle=trust_pickle)
    network = store.untrained_network()
    load_into(network, state, source=path.name)
    facts = dict(info)
    meta = info.get("meta_props")
    if "round" not in facts and isinstance(meta, dict) and isinstance(meta.get("current_round"), int):
        facts["round"] = meta["current_round"]
    if job_id:
        facts["job_id"] = job_id
    if fl_round is not None:
        facts["round"] = int(fl_round)
    return path, {k: v.detach().clone() for k, v in network.state_dict().items()}, facts


def check_local_part(
    local_path: str | Path, *, global_state: dict[str, torch.Tensor], global_info: dict[str, Any], store: ModelStore
) -> LocalPart:
    """The local part at ``local_path``, checked against the global model it is to be served with; raises
    :class:`UnprocessableError` (nothing installed) when it does not belong to it or the pair gives no finite
    output."""
    local_path = Path(local_path).expanduser()
    try:
        tensors, info = read_local_part(local_path)
        check_matches_global(tensors, info, global_state=global_state, global_info=global_info, source=local_path.name)
        merged = store.untrained_network()
        merged.load_state_dict(global_state, strict=True)
        apply_local_part(merged, tensors, source=local_path.name)
    except (LocalPartError, FileNotFoundError) as exc:
        raise UnprocessableError(f"nothing installed: {exc}") from exc
    bundle = store.bundle
    check_forward(merged, patch_size=tuple(bundle.patch_size), num_classes=bundle.num_classes)
    return tensors, info


def retire_stale_local_part(store: ModelStore, *, global_state: dict[str, torch.Tensor], global_info: dict) -> None:
    """Move an installed local part that was not learned with this global model to ``history/``, with a warning."""
    current = store.local_part_path
    if not current.is_file():
        return
    try:
        tensors, info = read_local_part(current)
        check_matches_global(tensors, info, global_state=global_state, global_info=global_info, source=current.name)
        return  # it belongs to this global model: it stays
    except Exception as exc:  # an unreadable part is retired as well
        reason = str(exc)
    history = current.parent / HISTORY_DIR
    history.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    moved = history / f"{current.stem}-{stamp}{current.suffix}"
    os.replace(current, moved)
    log.warning("the installed local part does not belong to the new global model (%s); moved to %s", reason, moved)


def install_site_model(
    source: str | Path,
    *,
    store: ModelStore,
    local_part: str | Path | None = None,
    origin: str | None = None,
    job_id: str | None = None,
    fl_round: int | None = None,
    trust_pickle: bool = False,
    allow_grid_mismatch: bool = False,
) -> dict[str, Any]:
    """Install the global checkpoint ``source`` as the served model and, with ``local_part``, this site's local part
    beside it (checked first: both or neither). Returns the store's description (``parts`` says which is which)."""
    path, global_state, facts = _global_of(source, store, trust_pickle=trust_pickle, job_id=job_id, fl_round=fl_round)
    if holds_local_parts(facts):
        raise InputError(
            f"{path.name} holds a site's local part (learned without DP, never sent): install the federated global "
            "checkpoint as the model and this site's local part with --local"
        )
    local = None
    if local_part is not None:
        local = check_local_part(local_part, global_state=global_state, global_info=facts, store=store)
    else:
        retire_stale_local_part(store, global_state=global_state, global_info=facts)
    if local is not None and store.local_part_path.exists():
        store.local_part_path.unlink()  # the old part goes first: in between, the new global model is served alone
    described = install_model(
        path,
        store=store,
        origin=origin,
        job_id=job_id,
        fl_round=fl_round,
        trust_pickle=trust_pickle,
        allow_grid_mismatch=allow_grid_mismatch,
    )
    if local is None:
        return described
    tensors, info = local
    kept = {k: v for k, v in info.items() if k not in {"part", "sharing", "parameters", "keys", "installed_from"}}
    save_local_part(
        tensors,
        store.local_part_path,
        parameters=str(info.get("parameters")),
        **kept,
        installed_from=str(Path(local_part).expanduser().resolve()),  # type: ignore[arg-type]
    )
    log.info("installed the local part %s beside the global model %s", local_part, path)
    return store.describe()
