"""The one served checkpoint: load it (reloading when it changes), describe it, replace it atomically.

Training (in MONAI Label's subprocess), ``fetal-fl app install-model`` and the server all go through this class, so
"which model is served, where did it come from" has one answer. A checkpoint is replaced by
:func:`fetalseg.bundle.save_checkpoint` (temp file + rename), and readers key their cache on the file's inode and
mtime, so an inference always loads one whole model, old or new, never half of each.

Checkpoints are read with :func:`fetalseg.bundle.load_checkpoint_file` (``torch.load(weights_only=True)``): a model
file from elsewhere cannot run code here.

A site's local part (:mod:`fetalseg.local_part`: weights learned from the site's own cases, never sent) lives in its
own file beside the served checkpoint and is loaded over it; the served file itself stays the shared global model,
so what may leave the site (``GET /model``) and what may not are two different files. The pair is served only if the
local part was learned with that global model (:func:`fetalseg.local_part.check_matches_global`: keys, shapes, job,
hash of the shared weights); otherwise nothing is served (503) and ``/info/`` says why.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from apps.fetal_brain.lib.config import LOCAL_PART_FILE
from apps.fetal_brain.lib.errors import InputError, UnprocessableError
from fetalseg.bundle import Bundle, load_checkpoint_file, save_checkpoint
from fetalseg.local_part import (
    NEVER_SENT,
    LocalPartError,
    apply_local_part,
    check_matches_global,
    holds_local_parts,
    read_local_part,
)
from fetalseg.plumbing import file_lock, lock_file_for

log = logging.getLogger(__name__)

HISTORY_DIR = "history"
KEEP_HISTORY = 5
_PREFIXES = ("_module.", "module.")  # Opacus GradSampleModule / DataParallel wrappers


@dataclass(frozen=True)
class LoadedModel:
    """A network ready for inference and the checkpoint facts it was loaded from."""

    network: torch.nn.Module
    info: dict[str, Any]
    stamp: tuple[int, ...] | None


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_safe(info: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-representable part of a checkpoint's info dict (scalar tensors become numbers)."""

    def convert(value: Any) -> Any:
        if isinstance(value, (str, bool, int, float)) or value is None:
            return value
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return value.item()
        if isinstance(value, Mapping):
            out = {str(k): convert(v) for k, v in value.items()}
            return {k: v for k, v in out.items() if v is not _SKIP}
        if isinstance(value, (list, tuple)):
            items = [convert(v) for v in value]
            return [v for v in items if v is not _SKIP]
        return _SKIP

    out = {str(k): convert(v) for k, v in info.items()}
    return {k: v for k, v in out.items() if v is not _SKIP}


_SKIP = object()


def read_checkpoint(path: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, info) of a checkpoint file: ``{"model": state, **info}`` or a bare state dict.

    Wrapper prefixes (``_module.`` from Opacus, ``module.`` from DataParallel) are removed. ``trust_pickle``
    allows arbitrary pickled objects (only for files from a source you trust).
    """
    path = Path(path)
    try:
        ckpt = load_checkpoint_file(path, trust_pickle=trust_pickle)
    except Exception as exc:  # torch raises pickle/zip/runtime errors for bad files
        hint = "" if trust_pickle else " (if it holds Python objects from a trusted source, use --trust-pickle)"
        reason = f"{type(exc).__name__}: {exc}"
        raise UnprocessableError(f"checkpoint {path.name}: cannot be loaded ({reason}){hint}") from exc
    if isinstance(ckpt, Mapping) and isinstance(ckpt.get("model"), Mapping):
        state, info = ckpt["model"], {k: v for k, v in ckpt.items() if k != "model"}
    elif isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        state, info = ckpt, {}
    else:
        raise UnprocessableError(f"checkpoint {path.name}: holds no state dict (expected {{'model': state_dict, ...}})")
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        clean[str(key)] = torch.as_tensor(value)
    return clean, json_safe(info)


def unwrap(state: Mapping[str, torch.Tensor], keys: set[str]) -> Mapping[str, torch.Tensor]:
    """``state`` without a prefix shared by all its keys (``net.`` from a wrapper module) if that makes the keys
    exactly ``keys``; otherwise ``state`` unchanged."""
    if set(state) == keys or not state:
        return state
    first = next(iter(state))
    for key in keys:
        prefix = first[: -len(key)] if first.endswith(key) and len(first) > len(key) else ""
        if prefix.endswith(".") and all(k.startswith(prefix) for k in state):
            stripped = {k[len(prefix) :]: v for k, v in state.items()}
            if set(stripped) == keys:
                return stripped
    return state


def load_into(network: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load ``state`` strictly, with an error that lists what does not fit the bundle's network.

    A wrapper's key prefix (e.g. ``net.`` in NVFlare's own persisted global model) is removed first.
    """
    own = network.state_dict()
    state = unwrap(state, set(own))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights missing (e.g. {missing[:3]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected weights (e.g. {unexpected[:3]})")
    if mismatched:
        k = mismatched[0]
        shapes = f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        problems.append(f"{len(mismatched)} weights with the wrong shape (e.g. {shapes})")
    if problems:
        raise UnprocessableError(f"checkpoint {source} does not fit the bundle's network: " + "; ".join(problems))
    network.load_state_dict(state, strict=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ModelStore:
    """The served checkpoint at ``path`` for ``bundle``'s network (thread-safe; cheap to call per request)."""

    def __init__(
        self, path: str | Path, *, bundle: Bundle, device: str = "cpu", local_part_path: str | Path | None = None
    ) -> None:
        self.path = Path(path)
        self.local_part_path = Path(local_part_path) if local_part_path else self.path.with_name(LOCAL_PART_FILE)
        self.bundle = bundle
        self.device = device
        self._lock = threading.Lock()
        self._loaded: LoadedModel | None = None
        self._describe_cache: tuple[tuple[int, ...] | None, dict[str, Any]] | None = None

    # -- reading --------------------------------------------------------------------------------------------------
    def stamp(self) -> tuple[int, ...] | None:
        """(inode, mtime ns, size) of the checkpoint (then of the local part, if any), or None when there is neither:
        changes on every publish or install."""
        own, local = _file_stamp(self.path), _file_stamp(self.local_part_path)
        if own is None and local is None:
            return None
        return (*(own or (0, 0, 0)), *(local or ()))

    def local_part(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, info) of this site's local part, or None when there is none."""
        if not self.local_part_path.is_file():
            return None
        try:
            return read_local_part(self.local_part_path)
        except Exception as exc:
            raise UnprocessableError(f"local part {self.local_part_path.name}: cannot be loaded ({exc})") from exc

    def check_pair(
        self,
        local: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]],
        *,
        global_state: Mapping[str, torch.Tensor] | None,
        global_info: Mapping[str, Any],
    ) -> None:
        """Raise :class:`LocalPartError` unless the local part belongs to the served global model (``global_state``
        in bundle key names; None when no global checkpoint is installed): a local part on any other global model
        is never served."""
        name = self.local_part_path.name
        if global_state is None:
            raise LocalPartError(
                f"local part {name} is installed but no global model ({self.path.name}): a local part is served "
                "only on the global model it was learned with; install both (fetal-fl app install-model "
                f"<job's global checkpoint> --local <local part>) or remove {self.local_part_path}"
            )
        check_matches_global(local[0], local[1], global_state=global_state, global_info=global_info, source=name)

    def _pair_problem(self, local: tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]) -> str | None:
        """Why the installed local part cannot be served with the installed global model, or None."""
        try:
            global_state: dict[str, torch.Tensor] | None = None
            info: dict[str, Any] = {}
            if self.path.is_file():
                state, info = read_checkpoint(self.path)
                network = self.untrained_network()
                load_into(network, state, source=self.path.name)
                global_state = network.state_dict()
            self.check_pair(local, global_state=global_state, global_info=info)
        except (UnprocessableError, LocalPartError) as exc:
            return str(exc)
        return None

    def untrained_network(self) -> torch.nn.Module:
        """The bundle's network with a fixed seed, so an untrained server answers the same on every start."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return self.bundle.network(device="cpu")

    def current(self) -> LoadedModel:
        """The served model, reloaded if the checkpoint changed since the last call."""
        with self._lock:
            stamp = self.stamp()
            if self._loaded is not None and self._loaded.stamp == stamp:
                return self._loaded
            network = self.untrained_network()
            info: dict[str, Any] = {}
            if stamp is not None:
                try:
                    if self.path.is_file():
                        state, info = read_checkpoint(self.path)
                        load_into(network, state, source=str(self.path))
                    local = self.local_part()
                    if local is not None and not holds_local_parts(info):  # a merged model already holds its own
                        has_global = self.path.is_file()
                        self.check_pair(
                            local, global_state=network.state_dict() if has_global else None, global_info=info
                        )
                        apply_local_part(network, local[0], source=str(self.local_part_path))
                except (UnprocessableError, LocalPartError) as exc:  # the server's own model: not the client's fault
                    raise InputError(f"the served model cannot be loaded: {exc}", status=503) from exc
                log.info("loaded model %s (origin: %s)", self.path, info.get("origin", "unknown"))
            network = network.to(self.device).eval()
            self._loaded = LoadedModel(network=network, info=info, stamp=stamp)
            return self._loaded

    def describe(self) -> dict[str, Any]:
        """What ``/info/`` reports: version, whether trained, origin (job, round), validation Dice, checksum."""
        stamp = self.stamp()
        cached = self._describe_cache
        if cached is not None and cached[0] == stamp:
            return dict(cached[1])
        out: dict[str, Any] = {"bundle_version": self.bundle.version, "path": str(self.path)}
        if _file_stamp(self.path) is None:
            out.update(
                trained=False,
                origin="untrained",
                note=f"no checkpoint at {self.path}: serving the bundle's randomly initialised network",
            )
        else:
            try:
                _, info = read_checkpoint(self.path)
            except UnprocessableError as exc:
                out.update(trained=False, origin="unreadable", note=str(exc))
            else:
                out.update(info)
                out.setdefault("origin", "unknown")
                out["trained"] = True
                out["sha256"] = file_sha256(self.path)
                out["modified"] = datetime.fromtimestamp(stamp[1] / 1e9, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.update(self._parts(out))
        self._describe_cache = (stamp, out)
        return dict(out)

    def _parts(self, info: Mapping[str, Any]) -> dict[str, Any]:
        """``parts``: which weights are shared (federated; with their ε, δ, accountant, privacy unit) and which are
        this site's own (never sent, learned without DP from N cases); ``privacy`` of the shared part at top level."""
        if holds_local_parts(info):  # the app's own fine-tune (or a merged model): every weight learned here
            local_all = {
                "parameters": "all",
                "sharing": NEVER_SENT,
                "learned": "fine-tuned on this site's corrected cases without DP",
            }
            return {"parts": {"shared": None, "local": local_all}}
        try:
            local = self.local_part()
        except UnprocessableError as exc:
            local, problem = None, str(exc)
        else:
            problem = None
        local_info = local[1] if local is not None else {}
        privacy = info.get("privacy") or local_info.get("shared_privacy")
        shared = {
            "origin": info.get("origin", "untrained"),
            "job_id": info.get("job_id"),
            "round": info.get("round"),
            "privacy": privacy
            if privacy
            else {"dp": False, "note": "no differential-privacy guarantee recorded for the shared model"},
        }
        out: dict[str, Any] = {"parts": {"shared": shared, "local": None}}
        if privacy and "privacy" not in info:
            out["privacy"] = privacy
        if local is not None:
            mismatch = self._pair_problem(local)
            if mismatch:  # nothing is served (503 on /infer); /info/ says why
                out["parts"]["local"] = {"error": mismatch, "sharing": NEVER_SENT}
                return out
            out["parts"]["local"] = {
                "parameters": local_info.get("parameters"),
                "weights": int(sum(t.numel() for t in local[0].values())),
                "sharing": NEVER_SENT,
                "learned": "without DP on this site's own cases",
                "training_cases": local_info.get("training_cases"),
                "fine_tune_epochs": local_info.get("fine_tune_epochs"),
                # the epoch the site's own validation cases chose (0: the part as trained in the rounds)
                "fine_tune_epoch_kept": (local_info.get("fine_tune_selection") or {}).get("epoch_selected"),
                "job_id": local_info.get("job_id"),
                "global_round": local_info.get("global_round"),
                "global_model_sha256": local_info.get("global_model_sha256"),
                "matches_global": True,
                "sha256": file_sha256(self.local_part_path),
            }
        elif problem:
            out["parts"]["local"] = {"error": problem}
        return out

    # -- writing --------------------------------------------------------------------------------------------------
    def publish(self, network: torch.nn.Module, **info: Any) -> dict[str, Any]:
        """Make ``network`` the served model (atomic replace); the previous checkpoint goes to ``history/``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(lock_file_for(self.path)):
            if self.path.exists():
                history = self.path.parent / HISTORY_DIR
                history.mkdir(exist_ok=True)
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
                shutil.copy2(self.path, history / f"{self.path.stem}-{stamp}{self.path.suffix}")
                for old in sorted(history.glob(f"{self.path.stem}-*{self.path.suffix}"))[:-KEEP_HISTORY]:
                    old.unlink(missing_ok=True)
            info = {"bundle_version": self.bundle.version, "published_at": utc_now(), **json_safe(info)}
            save_checkpoint(network, self.path, **info)
        log.info("published model %s (origin: %s)", self.path, info.get("origin"))
        return self.describe()
