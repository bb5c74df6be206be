"""The statistics job's own config (one JSON file; kept apart from the training job's ``nvflare_jobs/config.py``).

Keys: ``name``, ``sites``, ``data.root`` (simulations; a hospital sets ``FETAL_FL_SITE_DATA``), ``scope`` (the
sites' ``privacy.json`` scope the job declares), ``require_ledger``, ``request`` (what to release and at what
privacy: :class:`privacy.statistics.StatisticsRequest`) and ``nvflare`` (NVFlare's own result cleansers:
``min_count`` and ``max_bins_percent`` — NOT differential privacy, see docs/federated_statistics.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from privacy.statistics import StatisticsRequest, StatisticsRequestError

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.json"
CONFIG_FILE_NAME = "fedstats_config.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEYS = {"name", "sites", "data", "scope", "require_ledger", "request", "nvflare"}


@dataclass(frozen=True)
class StatsJobConfig:
    """A validated statistics job config."""

    name: str
    sites: tuple[str, ...]
    request: StatisticsRequest
    data_root: str | None = None
    scope: str | None = "statistics"
    require_ledger: bool = True
    min_count: int = 3
    max_bins_percent: float | None = None
    min_clients: int | None = None
    raw_request: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StatsJobConfig:
        if not isinstance(d, Mapping):
            raise StatisticsRequestError("the statistics config must be an object")
        unknown = sorted(set(d) - _KEYS)
        if unknown:
            raise StatisticsRequestError(
                f"unknown key(s) {unknown} in the statistics config (allowed: {sorted(_KEYS)})"
            )
        name = d.get("name", "fetal_stats")
        if not isinstance(name, str) or not _NAME.match(name):
            raise StatisticsRequestError(f"name must be 1-64 letters, digits, '_', '.', '-', got {name!r}")
        sites = d.get("sites")
        if not isinstance(sites, list) or not sites or not all(isinstance(s, str) and _NAME.match(s) for s in sites):
            raise StatisticsRequestError(f"sites must be a non-empty list of site names, got {sites!r}")
        if len(set(sites)) != len(sites):
            raise StatisticsRequestError(f"sites must be unique, got {sites}")
        data = d.get("data") or {}
        if not isinstance(data, Mapping) or set(data) - {"root"}:
            raise StatisticsRequestError(f"data must be {{'root': <folder or null>}}, got {data!r}")
        nv = d.get("nvflare") or {}
        if not isinstance(nv, Mapping) or set(nv) - {"min_count", "max_bins_percent", "min_clients"}:
            raise StatisticsRequestError(f"nvflare must hold min_count, max_bins_percent, min_clients; got {nv!r}")
        min_count = nv.get("min_count", 3)
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 0:
            raise StatisticsRequestError(f"nvflare.min_count must be an integer >= 0, got {min_count!r}")
        mbp = nv.get("max_bins_percent")
        if mbp is not None and (isinstance(mbp, bool) or not isinstance(mbp, (int, float)) or not 0 < mbp <= 100):
            raise StatisticsRequestError(f"nvflare.max_bins_percent must be in (0, 100] or null, got {mbp!r}")
        min_clients = nv.get("min_clients")
        if min_clients is not None and (
            isinstance(min_clients, bool) or not isinstance(min_clients, int) or not 1 <= min_clients <= len(sites)
        ):
            raise StatisticsRequestError(f"nvflare.min_clients must be 1..{len(sites)} or null, got {min_clients!r}")
        scope = d.get("scope", "statistics")
        if scope is not None and (not isinstance(scope, str) or not _NAME.match(scope)):
            raise StatisticsRequestError(f"scope must be a scope name or null, got {scope!r}")
        require_ledger = d.get("require_ledger", True)
        if not isinstance(require_ledger, bool):
            raise StatisticsRequestError(f"require_ledger must be true or false, got {require_ledger!r}")
        raw = d.get("request")
        if not isinstance(raw, Mapping):
            raise StatisticsRequestError("request is required: {statistics, features, privacy}")
        return cls(
            name=name,
            sites=tuple(sites),
            request=StatisticsRequest.from_dict(raw),
            data_root=data.get("root"),
            scope=scope,
            require_ledger=require_ledger,
            min_count=min_count,
            max_bins_percent=mbp,
            min_clients=min_clients,
            raw_request=json.loads(json.dumps(raw)),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sites": list(self.sites),
            "data": {"root": self.data_root},
            "scope": self.scope,
            "require_ledger": self.require_ledger,
            "request": self.raw_request,
            "nvflare": {
                "min_count": self.min_count,
                "max_bins_percent": self.max_bins_percent,
                "min_clients": self.min_clients,
            },
        }

    def with_changes(self, **changes: Any) -> StatsJobConfig:
        """A copy with top-level fields changed (``request`` as a dict is validated again)."""
        d = self.to_dict()
        for key, value in changes.items():
            if key == "data_root":
                d["data"] = {"root": value}
            elif key in ("min_count", "max_bins_percent", "min_clients"):
                d["nvflare"][key] = value
            else:
                d[key] = value
        return StatsJobConfig.from_dict(d)

    def nvflare_statistic_configs(self) -> dict[str, Any]:
        """The ``statistic_configs`` of NVFlare's ``StatisticsController``: every histogram with its public range."""
        out: dict[str, Any] = {}
        for s in self.request.statistics:
            if s == "histogram":
                out[s] = {f.name: {"bins": f.bins, "range": [f.low, f.high]} for f in self.request.features}
            else:
                out[s] = {}
        return out


def load_stats_config(path: str | Path = DEFAULT_CONFIG) -> StatsJobConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics config {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StatisticsRequestError(f"{path}: not valid JSON ({e})") from e
    try:
        return StatsJobConfig.from_dict(data)
    except (StatisticsRequestError, ValueError) as e:
        raise StatisticsRequestError(f"{path}: {e}") from None


__all__ = ["CONFIG_FILE_NAME", "DEFAULT_CONFIG", "StatsJobConfig", "load_stats_config"]
