"""The app's settings, from MONAI Label ``--conf key value`` pairs or ``FETAL_BRAIN_<KEY>`` environment variables.

Why both: ``--conf`` is the MONAI Label way and reaches the training subprocess too (MONAI Label passes it on
through its environment); the environment variables let scripts and tests configure a server they start without
building a command line. ``--conf`` wins over the environment. Unknown keys are logged, not silently ignored, so
a typo in a key is visible in the server log.

Keys (all optional):

* ``variant``: a bundle variant overlay (``configs/variants/<name>.json``, e.g. ``tiny`` for 32³ test volumes,
  ``feta`` for real FeTA data).
* ``pixdim`` (``4`` or ``4,4,4``), ``patch_size`` (``32`` or ``32,32,32``), ``sw_overlap`` (0..0.95),
  ``bundle_overrides`` (JSON object of bundle config ids -> values): change the bundle's config for this server,
  e.g. tiny test volumes; the network and transforms still come from the bundle.
* ``infer_roi_size`` (``80`` or ``80,80,96``): sliding-window ROI for inference only (default: the bundle's
  ``sw_roi_size``, which is its ``patch_size``); a ROI that covers the whole
  model grid turns many overlapping windows into one.
* ``model_path``: the served checkpoint (default: the bundle's ``models/model.pt``); training publishes there and
  ``fetal-fl app install-model`` installs there.
* ``local_part_path``: this site's local part (``fetalseg.local_part``: weights learned from the site's own cases,
  never sent), loaded over the served global checkpoint; ``fetal-fl app install-model --local`` installs it there.
  Unset: the bundle's ``models/local_part.pt`` if that file exists, else none.
* ``device``: ``auto`` (default), ``cpu``, ``cuda``, ``cuda:N``.
* ``max_upload_mb`` (default 1024): larger uploads get HTTP 413.
* ``infer_workers`` (default 1): inferences that run at the same time; more queue (other requests never do).
* ``allow_remote`` (default false): serve clients that are not on this machine (the front refuses them otherwise).
* ``auth`` (default false): require ``Authorization: Bearer <token>`` on every route but ``/health`` (roles:
  annotator, trainer, admin; see :mod:`apps.fetal_brain.lib.auth`). The server refuses to start with auth off
  when it is bound to a non-loopback address or serves remote clients (``allow_remote``).
* ``users_file``: the users/tokens file ``fetal-fl app user add`` writes; the server and that command both resolve
  it with :func:`apps.fetal_brain.lib.auth.users_file` (this key, else ``$FETAL_BRAIN_USERS_FILE``, else the
  deprecated ``$FETAL_FL_USERS_FILE``, else ``~/.fetal-fl/app_users.json``).
* ``audit_log``: who saved which label and started which training (default ``$FETAL_FL_APP_AUDIT_LOG`` or
  ``~/.fetal-fl/audit/monailabel.jsonl``).
* ``cors_origins``: comma-separated browser origins allowed by CORS (default: the server's own origin only).
* ``train_publish`` (``if_better`` default, or ``always``): publish a fine-tuned model only if its validation Dice
  is at least the current model's, or always.
* ``entropy_candidates`` (default 8): unlabelled images scored per call of the ``entropy`` strategy.
* ``prepared_cache_mb`` (default 512): memory for datastore images already pre-processed to the model grid
  (prepared in the background when ``/activelearning`` hands a case out, a client downloads an image or an image
  is uploaded, so the /infer that follows only runs the network); 0 turns it off.
  See :mod:`apps.fetal_brain.lib.prepared`.
* ``prepare_on_start`` (default true): also prepare every study at server start, unlabelled first, on a
  lowest-priority background thread, until ``prepared_cache_mb`` is full.
* With ``--studies http(s)://<pacs>/dicom-web`` (a DICOMweb server as the datastore,
  :mod:`apps.fetal_brain.lib.dicomweb_store`): ``pacs_credentials`` (a JSON file ``{"user", "password"}``, mode
  0600; else ``FETAL_BRAIN_PACS_USER`` / ``FETAL_BRAIN_PACS_PASSWORD`` in the environment, never ``--conf``: a
  command line is visible to every user of the machine), ``pacs_cache`` (the local folder of fetched series and
  labels; default ``~/.cache/fetal-fl/pacs/<hash of the URL>``), ``pacs_timeout_s`` (default 30).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apps.fetal_brain.lib.auth import users_file as resolve_users_file
from fetalseg.bundle import Bundle, variants

log = logging.getLogger(__name__)

ENV_PREFIX = "FETAL_BRAIN_"
MODEL_NAME = "fetal_brain_seg"
LOCAL_PART_FILE = "local_part.pt"
PUBLISH_POLICIES = ("if_better", "always")
# keys MONAI Label itself (or its sample apps) put into conf; accepted without a warning
_MONAILABEL_KEYS = {"server_mode", "models", "preload", "skip_trainers", "skip_strategies", "skip_scoring"}
_KEYS = {
    "variant",
    "pixdim",
    "patch_size",
    "sw_overlap",
    "infer_roi_size",
    "bundle_overrides",
    "model_path",
    "local_part_path",
    "device",
    "max_upload_mb",
    "infer_workers",
    "allow_remote",
    "train_publish",
    "entropy_candidates",
    "auth",
    "users_file",
    "cors_origins",
    "audit_log",
    "prepared_cache_mb",
    "prepare_on_start",
    "pacs_credentials",
    "pacs_cache",
    "pacs_timeout_s",
    "pacs_user",  # environment only (FETAL_BRAIN_PACS_USER / FETAL_BRAIN_PACS_PASSWORD)
    "pacs_password",
}
_ENV_ONLY = {"pacs_password"}


@dataclass(frozen=True)
class AppConfig:
    """Parsed, checked settings of one server (see the module docstring for each key)."""

    variant: str | None = None
    bundle_overrides: dict[str, Any] = field(default_factory=dict)
    model_path: Path | None = None
    local_part_path: Path | None = None
    device: str = "cpu"
    max_upload_bytes: int = 1024 * 2**20
    infer_workers: int = 1
    allow_remote: bool = False
    train_publish: str = "if_better"
    entropy_candidates: int = 8
    infer_roi_size: tuple[int, int, int] | None = None
    auth: bool = False
    users_file: Path | None = None
    cors_origins: tuple[str, ...] = ()
    audit_log: Path | None = None
    prepared_cache_bytes: int = 512 * 2**20
    prepare_on_start: bool = True
    pacs_credentials: Path | None = None
    pacs_cache: Path | None = None
    pacs_timeout_s: float = 30.0

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None) -> AppConfig:
        """Merge ``FETAL_BRAIN_*`` environment variables and ``conf`` (which wins); raise ValueError if invalid."""
        env = os.environ if env is None else env
        raw: dict[str, Any] = {
            k[len(ENV_PREFIX) :].lower(): v for k, v in env.items() if k.startswith(ENV_PREFIX) and v != ""
        }
        on_command_line = sorted(_ENV_ONLY & {str(k) for k in (conf or {})})
        if on_command_line:
            raise ValueError(
                f"{on_command_line} must not be passed with --conf (visible to every user of the machine): use "
                "--conf pacs_credentials <file> or the FETAL_BRAIN_PACS_USER / FETAL_BRAIN_PACS_PASSWORD environment"
            )
        raw.update({str(k): v for k, v in (conf or {}).items()})
        unknown = sorted(set(raw) - _KEYS - _MONAILABEL_KEYS)
        if unknown:
            log.warning("ignoring unknown app settings %s (known: %s)", unknown, sorted(_KEYS))

        overrides = _json_object(raw.get("bundle_overrides"), "bundle_overrides")
        if "pixdim" in raw:
            overrides["pixdim"] = _triple(raw["pixdim"], "pixdim", float, minimum=0.01)
        if "patch_size" in raw:
            overrides["patch_size"] = _triple(raw["patch_size"], "patch_size", int, minimum=16, multiple=16)
        if "patch_size" in overrides:  # a smaller/larger model patch: inference windows follow unless set
            overrides.setdefault("sw_roi_size", overrides["patch_size"])
        if "sw_overlap" in raw:
            overrides["sw_overlap"] = _number(raw["sw_overlap"], "sw_overlap", float, low=0.0, high=0.95)
        publish = str(raw.get("train_publish", "if_better")).strip().lower()
        if publish not in PUBLISH_POLICIES:
            raise ValueError(f"train_publish must be one of {PUBLISH_POLICIES}, got {publish!r}")
        model_path = raw.get("model_path")
        local_part_path = raw.get("local_part_path")
        variant = str(raw["variant"]).strip() if raw.get("variant") not in (None, "") else None
        if variant is not None and variant not in variants():
            raise ValueError(f"unknown bundle variant {variant!r}; available: {', '.join(variants()) or 'none'}")
        return cls(
            variant=variant,
            bundle_overrides=overrides,
            model_path=Path(str(model_path)).expanduser().resolve() if model_path else None,
            local_part_path=Path(str(local_part_path)).expanduser().resolve() if local_part_path else None,
            device=_device(str(raw.get("device", "auto"))),
            max_upload_bytes=int(_number(raw.get("max_upload_mb", 1024), "max_upload_mb", float, low=0.001) * 2**20),
            infer_workers=int(_number(raw.get("infer_workers", 1), "infer_workers", int, low=1, high=16)),
            allow_remote=_bool(raw.get("allow_remote", False), "allow_remote"),
            train_publish=publish,
            infer_roi_size=(
                tuple(_triple(raw["infer_roi_size"], "infer_roi_size", int, minimum=16, multiple=16))
                if raw.get("infer_roi_size") not in (None, "")
                else None
            ),
            auth=_bool(raw.get("auth", False), "auth"),
            users_file=resolve_users_file(raw["users_file"]) if raw.get("users_file") else None,
            cors_origins=_origins(raw.get("cors_origins")),
            audit_log=Path(str(raw["audit_log"])).expanduser().resolve() if raw.get("audit_log") else None,
            entropy_candidates=int(
                _number(raw.get("entropy_candidates", 8), "entropy_candidates", int, low=1, high=1000)
            ),
            prepared_cache_bytes=int(
                _number(raw.get("prepared_cache_mb", 512), "prepared_cache_mb", float, low=0, high=2**20) * 2**20
            ),
            prepare_on_start=_bool(raw.get("prepare_on_start", True), "prepare_on_start"),
            pacs_credentials=_path(raw.get("pacs_credentials")),
            pacs_cache=_path(raw.get("pacs_cache")),
            pacs_timeout_s=_number(raw.get("pacs_timeout_s", 30), "pacs_timeout_s", float, low=0.1, high=3600),
        )

    def bundle(self, purpose: str = "inference", **extra: Any) -> Bundle:
        """The bundle parsed for ``purpose`` with this server's overrides (plus ``extra`` overrides)."""
        return Bundle(purpose, variant=self.variant, overrides={**self.bundle_overrides, **extra})

    def resolved_model_path(self, bundle: Bundle | None = None) -> Path:
        """Where the served checkpoint lives: ``model_path`` or the bundle's ``models/model.pt``."""
        if self.model_path is not None:
            return self.model_path
        return (bundle or self.bundle("common")).checkpoint_path

    def resolved_local_part_path(self, bundle: Bundle | None = None) -> Path:
        """Where this site's local part lives: ``local_part_path`` or ``local_part.pt`` beside the served model."""
        if self.local_part_path is not None:
            return self.local_part_path
        return self.resolved_model_path(bundle).with_name(LOCAL_PART_FILE)


def _path(value: Any) -> Path | None:
    return Path(str(value)).expanduser().resolve() if value not in (None, "") else None


def _json_object(value: Any, name: str) -> dict[str, Any]:
    if value in (None, ""):
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    try:
        parsed = json.loads(str(value))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} must be a JSON object, got {value!r} ({exc})") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"{name} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _triple(value: Any, name: str, kind: type, *, minimum: float, multiple: int | None = None) -> list:
    """``4`` / ``"4"`` / ``"4,4,4"`` / ``"[4, 4, 4]"`` / ``[4, 4, 4]`` -> three values of ``kind``."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        parts: list[Any] = [p for p in text.replace(",", " ").split() if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise ValueError(f"{name} needs 1 or 3 values, got {value!r}")
    try:
        values = [kind(float(p)) if kind is int else kind(p) for p in parts]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numbers, got {value!r}") from exc
    if kind is int and any(float(p) != int(float(p)) for p in parts):
        raise ValueError(f"{name} must be whole numbers, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} values must be >= {minimum}, got {values}")
    if multiple and any(v % multiple for v in values):
        raise ValueError(f"{name} values must be multiples of {multiple} (the bundle's 16*n input shape), got {values}")
    return values


def _number(value: Any, name: str, kind: type, *, low: float | None = None, high: float | None = None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a number, got {value!r}") from exc
    if kind is int and number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name} must be within [{low}, {high}], got {value!r}")
    return number


def _bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _origins(value: Any) -> tuple[str, ...]:
    """``"https://a.example, http://b:8080"`` -> checked origins (scheme://host[:port], no path, no wildcard)."""
    if value in (None, ""):
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    origins = []
    for item in (str(i).strip().rstrip("/") for i in items):
        if not item:
            continue
        if item == "*" or not re.match(r"^https?://[A-Za-z0-9.\-\[\]:]+$", item):
            raise ValueError(f"cors_origins entries must look like https://host[:port] (no '*'), got {item!r}")
        origins.append(item)
    return tuple(origins)


def _device(value: str) -> str:
    value = value.strip().lower()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return value
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {value!r} requested but CUDA is not available on this machine")
        return value
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
