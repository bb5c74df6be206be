"""The process environment the project reads, in one place: typed pydantic-settings classes, one prefix.

Why here: the federated client, the privacy filters, the statistics job, the CLI and the app all run at a site and
must read a variable the same way without importing each other, so the classes live in the core (every layer may
import it). New variables are named ``FETAL_FL_<NAME>``; the older names (``FETALFL_``, ``FETALSEG_``) are still
read as deprecated aliases: a :class:`DeprecationWarning` on every read (Python shows it once per place) and one log
line per process. A bad value is one :class:`SettingsError` naming the variable.

Two things stay outside this module: the MONAI Label app's own settings (``--conf KEY VALUE`` or
``FETAL_BRAIN_<KEY>``, :class:`apps.fetal_brain.lib.config.AppConfig`, built on :class:`EnvSettings` too) and the
Slicer module's ``FETAL_BRAIN_SEG_*`` variables (it runs inside Slicer without this project installed).
docs/configuration.md lists every variable; a test checks that list against these classes.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import AliasChoices, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

log = logging.getLogger(__name__)

PREFIX = "FETAL_FL_"
DEPRECATED: dict[str, str] = {}  # old variable name -> the name that replaces it
_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("fetal_fl_environ", default=None)
_LOGGED: set[str] = set()
_S = TypeVar("_S", bound="EnvSettings")


class SettingsError(ValueError):
    """A variable (or app setting) whose value cannot be used; the message names it."""


def variable(name: str, *old: str, description: str, default: Any = None, **kwargs: Any) -> Any:
    """A field read from ``name`` (else, deprecated, from each of ``old``); ``description`` is what the docs show."""
    for previous in old:
        DEPRECATED[previous] = name
    return Field(default, validation_alias=AliasChoices(name, *old), description=description, **kwargs)


class _Environ(EnvSettingsSource):
    """The environment source, reading the mapping :meth:`EnvSettings.load` was given (else ``os.environ``)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        env = _ENVIRON.get()
        return parse_env_vars(os.environ if env is None else env, False, self.env_ignore_empty, None)


class EnvSettings(BaseSettings):
    """Base of every settings class here: environment only (no .env file, no secrets folder), empty = unset,
    values arrive as strings (validators parse lists themselves), frozen."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, extra="ignore", frozen=True, enable_decoding=False
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Given values (e.g. ``--conf``) win over the environment; nothing else is read."""
        return init_settings, _Environ(settings_cls)

    @classmethod
    def load(cls: type[_S], environ: Mapping[str, str] | None = None, /, **values: Any) -> _S:
        """Read the settings from ``environ`` (default ``os.environ``), ``values`` winning; raise SettingsError."""
        env = os.environ if environ is None else environ
        _warn_deprecated(cls, env)
        token = _ENVIRON.set(env)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(describe(exc, cls, set(values))) from None
        finally:
            _ENVIRON.reset(token)


def env_names(cls: type[BaseSettings], name: str) -> list[str]:
    """The variables field ``name`` of ``cls`` is read from, the current name first."""
    info = cls.model_fields[name]
    alias = info.validation_alias
    if isinstance(alias, AliasChoices):
        return [str(choice) for choice in alias.choices]
    if isinstance(alias, str):
        return [alias]
    return [f"{cls.model_config.get('env_prefix', '')}{name}".upper()]


def describe(exc: ValidationError, cls: type[BaseSettings], given: set[str]) -> str:
    """One line per bad value, naming the key (given values) or the variable (environment)."""
    lines = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        if field not in cls.model_fields:  # an alias was reported: map it back to its field
            field = next((f for f in cls.model_fields if field.upper() in env_names(cls, f)), field)
        where = field if field in given or field not in cls.model_fields else _variable_set(cls, field)
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] != "value_error":  # pydantic's own words: add the value
            message = f"{message[:1].lower()}{message[1:]}, got {error.get('input')!r}"
        lines.append(message if message.startswith(where) else f"{where}: {message}")
    return "; ".join(lines)


def _variable_set(cls: type[BaseSettings], field: str) -> str:
    env = _ENVIRON.get()
    env = os.environ if env is None else env
    names = env_names(cls, field)
    return next((n for n in names if env.get(n)), names[0])


def _warn_deprecated(cls: type[BaseSettings], env: Mapping[str, str]) -> None:
    for field in cls.model_fields:
        names = env_names(cls, field)
        used = next((n for n in names if env.get(n)), None)
        for old in names[1:]:
            if not env.get(old):
                continue
            new = names[0]
            if old == used:
                message = f"${old} is deprecated: set ${new} instead"
                warnings.warn(message, DeprecationWarning, stacklevel=3)
            else:
                message = f"ignoring the deprecated ${old}={env[old]}: ${used} is set"
            if old not in _LOGGED:
                _LOGGED.add(old)
                log.warning(message)


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


class SiteSettings(EnvSettings):
    """Where a site's data, per-job state and privacy ledger are: set once in the NVFlare client's environment."""

    site_data: str | None = variable(
        "FETAL_FL_SITE_DATA", "FETALFL_SITE_DATA", description="the site's own data folder (wins over everything)"
    )
    data_root: str | None = variable(
        "FETAL_FL_DATA_ROOT",
        "FETALFL_DATA_ROOT",
        description="a folder holding `<site>/` data folders (wins over the job config's `data.root`)",
    )
    site_state: str | None = variable(
        "FETAL_FL_SITE_STATE",
        "FETALFL_SITE_STATE",
        description="per-job state that survives a client restart: DP accountant, client-DP count, the local part "
        "(unset: `./privacy_state`)",
    )
    privacy_ledger: str | None = variable(
        "FETAL_FL_PRIVACY_LEDGER",
        "FETALFL_PRIVACY_LEDGER",
        description="the site's ε ledger across jobs (`fetal-fl privacy ledger init`); unset: ε is accounted within "
        "the job only",
    )

    @property
    def site_data_dir(self) -> Path | None:
        """``site_data`` as a path (``~`` expanded)."""
        return _path(self.site_data)

    @property
    def state_dir(self) -> Path | None:
        """``site_state`` as a path (``~`` expanded)."""
        return _path(self.site_state)


class BundleSettings(EnvSettings):
    """Which copy of the MONAI bundle the core uses."""

    bundle_dir: str | None = variable(
        "FETAL_FL_BUNDLE_DIR",
        "FETALSEG_BUNDLE_DIR",
        description="another copy of the bundle (default: the one inside `apps/fetal_brain/model/`)",
    )


class AuditSettings(EnvSettings):
    """Where the app server's audit log goes when its ``audit_log`` setting is not given."""

    app_audit_log: str | None = variable(
        "FETAL_FL_APP_AUDIT_LOG",
        description="the app's audit log of saved labels and trainings (default `~/.fetal-fl/audit/monailabel.jsonl`);"
        " app setting `audit_log` wins",
    )


class UsersSettings(EnvSettings):
    """The app's users/tokens file as the server and ``fetal-fl app user ...`` both read it."""

    users_file: str | None = variable(
        "FETAL_BRAIN_USERS_FILE",
        "FETAL_FL_USERS_FILE",
        description="the app's users/tokens file, read by the server **and** `fetal-fl app user ...` "
        "(default `~/.fetal-fl/app_users.json`); the app setting `users_file` / `--users-file` wins",
    )


class DistributedDPSettings(EnvSettings):
    """A site's trust for distributed DP (``privacy.dp_sgd.distributed``): how many other sites may collude."""

    dp_colluding_sites: str | None = variable(
        "FETAL_FL_DP_COLLUDING_SITES",
        "FETALFL_DP_COLLUDING_SITES",
        description="the site's trust for distributed DP: `all` (default: every other site may collude) or an "
        "integer c; checked by `nvflare_jobs.secure_aggregation.distributed`",
    )


class CryptenSettings(EnvSettings):
    """Fixed-point precision of the encrypted-inference protocol (CrypTen's default is 16 bits)."""

    crypten_precision_bits: int = variable(
        "FETAL_FL_CRYPTEN_PRECISION_BITS",
        default=16,
        ge=1,
        le=30,
        description="CrypTen's fixed-point precision in bits for encrypted inference",
    )


class PrivateInferAuditSettings(EnvSettings):
    """Test hooks of the encrypted-inference audit: where a party writes what it saw, and the other's secret."""

    private_infer_audit: str | None = variable(
        "FETAL_FL_PRIVATE_INFER_AUDIT",
        description="encrypted-inference audit (tests): the JSON file a party writes what it received to",
    )
    private_infer_audit_secret: str | None = variable(
        "FETAL_FL_PRIVATE_INFER_AUDIT_SECRET",
        description="encrypted-inference audit (tests): the other party's secret (`.npy`) to look for",
    )


SETTINGS: tuple[type[EnvSettings], ...] = (
    SiteSettings,
    BundleSettings,
    AuditSettings,
    UsersSettings,
    DistributedDPSettings,
    CryptenSettings,
    PrivateInferAuditSettings,
)


def variables(classes: tuple[type[BaseSettings], ...] = SETTINGS) -> Iterator[tuple[str, list[str], str, str]]:
    """(variable, deprecated names, class name, description) for every field of ``classes``."""
    for cls in classes:
        for name, info in cls.model_fields.items():
            names = env_names(cls, name)
            yield names[0], names[1:], cls.__name__, _description(info)


def _description(info: FieldInfo) -> str:
    return " ".join((info.description or "").split())


def markdown_table(classes: tuple[type[BaseSettings], ...] = SETTINGS) -> str:
    """The environment table of docs/configuration.md, generated from the classes (a test compares the two)."""
    rows = ["| variable | deprecated name | class | meaning |", "|---|---|---|---|"]
    for name, old, owner, description in variables(classes):
        rows.append(f"| `{name}` | {', '.join(f'`{o}`' for o in old) or '–'} | `{owner}` | {description} |")
    return "\n".join(rows)
