"""The app's settings, from MONAI Label ``--conf key value`` pairs or ``FETAL_BRAIN_<KEY>`` environment variables.

Why both: ``--conf`` is the MONAI Label way and reaches the training subprocess too (MONAI Label passes it on
through its environment); the environment variables let scripts and tests configure a server they start without
building a command line. ``--conf`` wins over the environment. Unknown keys are logged, not silently ignored, so
a typo in a key is visible in the server log. :class:`AppConfig` is one pydantic-settings model
(:class:`fetalseg.settings.EnvSettings`): one typed field per key, a bad value is one ``ValueError`` naming the key
(or the variable it came from). docs/configuration.md lists the variables (generated from the fields, test-checked).

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
  labels; default ``~/.cache/fetal-fl/pacs/<hash of the URL>``), ``pacs_timeout_s`` (default 30), ``pacs_series`` (the
  regular expression a series' SeriesDescription must match to be a case; default
  ``apps.fetal_brain.lib.dicomweb_store.DEFAULT_SERIES_PATTERN``: T2 and reconstruction names).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from apps.fetal_brain.lib.auth import users_file as resolve_users_file
from fetalseg.bundle import Bundle, variants
from fetalseg.settings import EnvSettings, SettingsError

log = logging.getLogger(__name__)

ENV_PREFIX = "FETAL_BRAIN_"
MODEL_NAME = "fetal_brain_seg"
LOCAL_PART_FILE = "local_part.pt"
PUBLISH_POLICIES = ("if_better", "always")
# keys MONAI Label itself (or its sample apps) put into conf; accepted without a warning
_MONAILABEL_KEYS = {"server_mode", "models", "preload", "skip_trainers", "skip_strategies", "skip_scoring"}
_ENV_ONLY = {"pacs_user", "pacs_password"}
Triple = tuple[int, int, int]


class AppConfig(EnvSettings):
    """Parsed, checked settings of one server: one field per key (see the module docstring), ``FETAL_BRAIN_<KEY>``
    in the environment, ``--conf`` winning. Build it with :meth:`from_conf`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    variant: str | None = Field(None, description="a bundle variant overlay (`configs/variants/<name>.json`)")
    pixdim: tuple[float, float, float] | None = Field(None, description="voxel size in mm (`4` or `4,4,4`)")
    patch_size: Triple | None = Field(None, description="training patch (`32` or `32,32,32`, multiples of 16)")
    sw_overlap: float | None = Field(None, ge=0.0, le=0.95, description="sliding-window overlap (0..0.95)")
    infer_roi_size: Triple | None = Field(None, description="sliding-window ROI for inference only (`80,80,96`)")
    bundle_overrides: dict[str, Any] = Field(
        default_factory=dict, description="JSON object of bundle config ids -> values"
    )
    model_path: Path | None = Field(None, description="the served checkpoint (default: the bundle's)")
    local_part_path: Path | None = Field(None, description="this site's local part, loaded over the served model")
    device: str = Field("auto", validate_default=True, description="`auto`, `cpu`, `cuda`, `cuda:N`")
    max_upload_mb: float = Field(1024, ge=0.001, description="larger uploads get HTTP 413")
    infer_workers: int = Field(1, ge=1, le=16, description="inferences that run at the same time")
    allow_remote: bool = Field(False, description="serve clients that are not on this machine")
    train_publish: Literal["if_better", "always"] = Field(
        "if_better", description="publish a fine-tuned model only if it is not worse (`if_better`), or `always`"
    )
    entropy_candidates: int = Field(8, ge=1, le=1000, description="unlabelled images scored per `entropy` call")
    auth: bool = Field(False, description="require a bearer token on every route but `/health`")
    users_file: Path | None = Field(None, description="the users/tokens file (`fetal-fl app user add` writes it)")
    cors_origins: tuple[str, ...] = Field((), description="comma-separated browser origins allowed by CORS")
    audit_log: Path | None = Field(None, description="who saved which label and started which training")
    prepared_cache_mb: float = Field(512, ge=0, le=2**20, description="memory for pre-processed images; 0: off")
    prepare_on_start: bool = Field(True, description="prepare every study at server start, in the background")
    pacs_credentials: Path | None = Field(None, description='a JSON file `{"user", "password"}`, mode 0600')
    pacs_cache: Path | None = Field(None, description="local folder of fetched series and labels")
    pacs_timeout_s: float = Field(30.0, ge=0.1, le=3600, description="PACS request timeout in seconds")
    pacs_series: str | None = Field(
        None,
        description="regular expression a PACS series' SeriesDescription must match to be a case (default: T2 "
        "and reconstruction names)",
    )
    pacs_user: str | None = Field(None, repr=False, description="PACS user (environment only, never `--conf`)")
    pacs_password: SecretStr | None = Field(
        None, repr=False, description="PACS password (environment only, never `--conf`)"
    )

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any] | None = None, *, env: Mapping[str, str] | None = None) -> AppConfig:
        """``FETAL_BRAIN_*`` variables of ``env`` (default ``os.environ``) with ``conf`` winning; ValueError if bad."""
        conf = {str(k): v for k, v in (conf or {}).items()}
        on_command_line = sorted(_ENV_ONLY & set(conf))
        if on_command_line:
            raise SettingsError(
                f"{on_command_line} must not be passed with --conf (visible to every user of the machine): use "
                "--conf pacs_credentials <file> or the FETAL_BRAIN_PACS_USER / FETAL_BRAIN_PACS_PASSWORD environment"
            )
        env_keys = {
            k[len(ENV_PREFIX) :].lower() for k in (os.environ if env is None else env) if k.startswith(ENV_PREFIX)
        }
        unknown = sorted((set(conf) | env_keys) - set(cls.model_fields) - _MONAILABEL_KEYS)
        if unknown:
            log.warning("ignoring unknown app settings %s (known: %s)", unknown, sorted(cls.model_fields))
        values = {k: v for k, v in conf.items() if k in cls.model_fields and v not in (None, "")}
        return cls.load(env, **values)

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes."""
        return int(self.max_upload_mb * 2**20)

    @property
    def prepared_cache_bytes(self) -> int:
        """``prepared_cache_mb`` in bytes."""
        return int(self.prepared_cache_mb * 2**20)

    @field_validator("variant", mode="before")
    @classmethod
    def _variant(cls, value: Any) -> str | None:
        text = str(value).strip() if value is not None else ""
        if not text:
            return None
        if text not in variants():
            raise ValueError(f"unknown bundle variant {text!r}; available: {', '.join(variants()) or 'none'}")
        return text

    @field_validator("pixdim", mode="before")
    @classmethod
    def _pixdim(cls, value: Any, info: ValidationInfo) -> list[float] | None:
        return _triple(value, str(info.field_name), float, minimum=0.01)

    @field_validator("patch_size", "infer_roi_size", mode="before")
    @classmethod
    def _grid(cls, value: Any, info: ValidationInfo) -> list[int] | None:
        return _triple(value, str(info.field_name), int, minimum=16, multiple=16)

    @field_validator("bundle_overrides", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> dict[str, Any]:
        if value in (None, ""):
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        try:
            parsed = json.loads(str(value))
        except json.JSONDecodeError as exc:
            raise ValueError(f"bundle_overrides must be a JSON object, got {value!r} ({exc})") from exc
        if not isinstance(parsed, dict):
            raise ValueError(f"bundle_overrides must be a JSON object, got {type(parsed).__name__}")
        return parsed

    @field_validator("model_path", "local_part_path", "audit_log", "pacs_credentials", "pacs_cache", mode="before")
    @classmethod
    def _resolved(cls, value: Any) -> Path | None:
        return Path(str(value)).expanduser().resolve() if value not in (None, "") else None

    @field_validator("pacs_series", mode="before")
    @classmethod
    def _pattern(cls, value: Any) -> str | None:
        if value in (None, ""):
            return None
        try:
            re.compile(str(value))
        except re.error as exc:
            raise ValueError(f"pacs_series {value!r} is not a regular expression ({exc})") from exc
        return str(value)

    @field_validator("users_file", mode="before")
    @classmethod
    def _users_file(cls, value: Any) -> Path | None:
        return resolve_users_file(str(value)) if value not in (None, "") else None

    @field_validator("train_publish", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> str:
        return str(value).strip().lower()

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> tuple[str, ...]:
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

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str:
        text = str(value).strip().lower()
        if text == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if text == "cpu":
            return text
        if text.startswith("cuda"):
            if not torch.cuda.is_available():
                raise ValueError(f"device {text!r} requested but CUDA is not available on this machine")
            return text
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")

    @model_validator(mode="after")
    def _into_bundle_overrides(self) -> AppConfig:
        """pixdim / patch_size / sw_overlap become bundle overrides; a patch size carries the inference window."""
        if self.pixdim is not None:
            self.bundle_overrides["pixdim"] = list(self.pixdim)
        if self.patch_size is not None:
            self.bundle_overrides["patch_size"] = list(self.patch_size)
        if "patch_size" in self.bundle_overrides:
            self.bundle_overrides.setdefault("sw_roi_size", self.bundle_overrides["patch_size"])
        if self.sw_overlap is not None:
            self.bundle_overrides["sw_overlap"] = self.sw_overlap
        return self

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


def _triple(value: Any, name: str, kind: type, *, minimum: float, multiple: int | None = None) -> list | None:
    """``4`` / ``"4"`` / ``"4,4,4"`` / ``"[4, 4, 4]"`` / ``[4, 4, 4]`` -> three values of ``kind``."""
    if value is None or value == "":
        return None
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
