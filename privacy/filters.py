"""Filters on what leaves a site: plain functions on ``{name: numpy array}`` weight differences.

Two mechanisms, with very different guarantees (``docs/privacy.md``):

* **Percentile sharing** (Shokri & Shmatikov 2015, as NVFlare's ``PercentilePrivacy``): send only the largest
  |Δw| — the values above the ``percentile``-th percentile of |Δw| — optionally clipped to ±``gamma``. It adds no
  noise and is **NOT differential privacy**: it only reduces how much of the update travels. Here it really shrinks
  the message: :func:`encode_sparse` sends the kept values and their positions (a bit mask or an index list,
  whichever is smaller), and :func:`decode_sparse` rebuilds the dense difference on the server before aggregation.
* **Client-level DP** (:func:`clip_and_noise`, :class:`ClientDPAccountant`): clip the whole update to L2 norm
  ``clip_norm`` and add Gaussian noise of std ``noise_multiplier × clip_norm`` to every coordinate. That is a
  Gaussian mechanism whose unit is the site's whole contribution of the round; ε composes over rounds.

Every function validates its parameters and raises on bad ones (never returns its input unfiltered), and returns
a :class:`FilterReport` of what it did (fraction kept, norms, bytes) that callers log.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fetalseg.plumbing import atomic_write_json
from privacy.accounting import DEFAULT_ACCOUNTANT, DEFAULT_DELTA, check_accountant, check_delta, epsilon

log = logging.getLogger(__name__)

NOT_DP_NOTICE = "percentile sharing is NOT differential privacy (no noise; it only limits what is sent)"
SPARSE_FORMAT = "fetalfl-sparse-v1"
CLIENT_DP_SCOPE = "client-level DP, per site, composed over rounds"
CLIENT_DP_UNIT = "the site's whole contribution of a round"

Arrays = Mapping[str, np.ndarray]


@dataclass
class FilterReport:
    """What a filter did to one update (logged and put into the update's metadata)."""

    filter: str
    fraction_kept: float
    norm_before: float
    norm_after: float
    bytes_before: int
    bytes_after: int
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def log(self, logger: logging.Logger = log) -> None:
        logger.info(
            "%s: kept %.2f%% of values, L2 norm %.4g -> %.4g, %d -> %d bytes (%.3fx) %s",
            self.filter,
            100.0 * self.fraction_kept,
            self.norm_before,
            self.norm_after,
            self.bytes_before,
            self.bytes_after,
            self.bytes_after / max(self.bytes_before, 1),
            self.details,
        )


# ---------------------------------------------------------------------------------------------------------------
# Common checks
# ---------------------------------------------------------------------------------------------------------------


def check_update(diff: Arrays) -> dict[str, np.ndarray]:
    """An update must be a non-empty mapping of names to finite floating-point arrays."""
    if not isinstance(diff, Mapping) or not diff:
        raise ValueError("the update must be a non-empty mapping of parameter names to arrays")
    out = {}
    for name, value in diff.items():
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"update entry {name!r} has dtype {arr.dtype}; only floating-point differences")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"update entry {name!r} has NaN or infinite values")
        out[str(name)] = arr
    return out


def l2_norm(diff: Arrays) -> float:
    """Global L2 norm over every array of the update (scaled by the largest |value|, so squares cannot overflow)."""
    arrays = [np.asarray(a, dtype=np.float64) for a in diff.values()]
    peak = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    if peak == 0.0 or not math.isfinite(peak):
        return peak
    return peak * math.sqrt(math.fsum(float(np.sum(np.square(a / peak))) for a in arrays))


def dense_nbytes(diff: Arrays) -> int:
    return int(sum(np.asarray(a).nbytes for a in diff.values()))


# ---------------------------------------------------------------------------------------------------------------
# Percentile sharing (NOT differential privacy)
# ---------------------------------------------------------------------------------------------------------------


def check_percentile_params(*, percentile: float, gamma: float | None) -> None:
    """Raise ValueError unless 0 <= percentile <= 100 and gamma is None or > 0 (NVFlare's filter passes instead)."""
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not math.isfinite(percentile):
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile!r}")
    if gamma is not None and (
        isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma <= 0
    ):
        raise ValueError(f"gamma (the clip on shared |Δw|) must be a finite number > 0 or None, got {gamma!r}")


def percentile_masks(diff: Arrays, *, percentile: float, num_steps: int = 1) -> tuple[dict[str, np.ndarray], float]:
    """Which values are shared: |Δw / num_steps| >= the global ``percentile``-th percentile (NVFlare's rule).

    0-d arrays are always shared (NVFlare does not filter scalars). Returns the masks and the cutoff.
    """
    check_percentile_params(percentile=percentile, gamma=None)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    arrays = check_update(diff)
    # like NVFlare, scalars take part in the percentile but are always shared
    flat = np.concatenate([np.abs(a.ravel() / num_steps) for a in arrays.values()])
    cutoff = float(np.percentile(flat, percentile)) if flat.size else 0.0
    masks = {}
    for name, a in arrays.items():
        masks[name] = np.ones(a.shape, bool) if a.ndim == 0 else np.abs(a / num_steps) >= cutoff
    return masks, cutoff


def percentile_share(
    diff: Arrays, *, percentile: float, gamma: float | None = None, num_steps: int = 1
) -> tuple[dict[str, np.ndarray], FilterReport]:
    """Dense percentile sharing (NVFlare semantics, fail-closed): drop small |Δw|, clip the rest to ±gamma·steps."""
    check_percentile_params(percentile=percentile, gamma=gamma)
    arrays = check_update(diff)
    masks, cutoff = percentile_masks(arrays, percentile=percentile, num_steps=num_steps)
    out = {name: _share_values(a, masks[name], gamma=gamma, num_steps=num_steps) for name, a in arrays.items()}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(int(m.size) for m in masks.values())
    report = FilterReport(
        filter="percentile_share",
        fraction_kept=kept / max(total, 1),
        norm_before=l2_norm(arrays),
        norm_after=l2_norm(out),
        bytes_before=dense_nbytes(arrays),
        bytes_after=dense_nbytes(out),
        details={
            "percentile": float(percentile),
            "gamma": gamma,
            "cutoff": cutoff,
            "dp": False,
            "notice": NOT_DP_NOTICE,
        },
    )
    return out, report


def _share_values(a: np.ndarray, mask: np.ndarray, *, gamma: float | None, num_steps: int) -> np.ndarray:
    out = np.where(mask, a, 0).astype(a.dtype, copy=False)
    if gamma is not None and a.ndim > 0:
        limit = float(gamma) * num_steps  # NVFlare clips Δw / num_steps to ±gamma
        out = np.clip(out, -limit, limit).astype(a.dtype, copy=False)
    return out


def encode_sparse(
    diff: Arrays, *, percentile: float, gamma: float | None = None, num_steps: int = 1
) -> tuple[dict[str, Any], FilterReport]:
    """Percentile sharing that sends only the shared values and their positions.

    Returns a payload of plain types and numpy arrays (what NVFlare's serializer carries) and a report whose
    ``bytes_after`` counts every array of the payload. Positions are a packed bit mask or a sorted index list
    (uint16/uint32), whichever is smaller for that tensor.
    """
    check_percentile_params(percentile=percentile, gamma=gamma)
    arrays = check_update(diff)
    masks, cutoff = percentile_masks(arrays, percentile=percentile, num_steps=num_steps)
    tensors: dict[str, Any] = {}
    shared: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        values_dense = _share_values(a, masks[name], gamma=gamma, num_steps=num_steps)
        shared[name] = values_dense
        tensors[name] = _encode_tensor(values_dense, masks[name])
    payload = {"format": SPARSE_FORMAT, "tensors": tensors}
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(int(m.size) for m in masks.values())
    report = FilterReport(
        filter="sparse_percentile_share",
        fraction_kept=kept / max(total, 1),
        norm_before=l2_norm(arrays),
        norm_after=l2_norm(shared),
        bytes_before=dense_nbytes(arrays),
        bytes_after=payload_nbytes(payload),
        details={
            "percentile": float(percentile),
            "gamma": gamma,
            "cutoff": cutoff,
            "dp": False,
            "notice": NOT_DP_NOTICE,
        },
    )
    return payload, report


def _encode_tensor(values_dense: np.ndarray, mask: np.ndarray) -> dict[str, Any]:
    shape = list(values_dense.shape)
    dtype = values_dense.dtype.str
    if values_dense.ndim == 0:
        return {"shape": shape, "dtype": dtype, "encoding": "dense", "values": values_dense.reshape(1).copy()}
    flat_mask = mask.ravel()
    values = values_dense.ravel()[flat_mask].copy()
    n, k = flat_mask.size, int(flat_mask.sum())
    index_dtype = np.uint16 if n <= np.iinfo(np.uint16).max + 1 else np.uint32
    index_bytes = k * np.dtype(index_dtype).itemsize
    mask_bytes = (n + 7) // 8
    if index_bytes < mask_bytes:
        positions = np.flatnonzero(flat_mask).astype(index_dtype)
        return {"shape": shape, "dtype": dtype, "encoding": "index", "positions": positions, "values": values}
    return {"shape": shape, "dtype": dtype, "encoding": "mask", "positions": np.packbits(flat_mask), "values": values}


def decode_sparse(payload: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Rebuild the dense weight difference from :func:`encode_sparse`'s payload (zeros where nothing was shared).

    Any inconsistency (unknown format, wrong sizes, positions out of range) raises ValueError: a half-decoded
    update must never reach the aggregator.
    """
    if not isinstance(payload, Mapping) or payload.get("format") != SPARSE_FORMAT:
        raise ValueError(f"not a {SPARSE_FORMAT} payload")
    tensors = payload.get("tensors")
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError("sparse payload has no tensors")
    out = {}
    for name, t in tensors.items():
        try:
            shape = tuple(int(s) for s in t["shape"])
            dtype = np.dtype(t["dtype"])
            values = np.asarray(t["values"], dtype=dtype).ravel()
            encoding = t["encoding"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"sparse tensor {name!r} is malformed: {exc}") from None
        n = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if encoding == "dense":
            if values.size != n:
                raise ValueError(f"sparse tensor {name!r}: {values.size} dense values for shape {shape}")
            out[name] = values.reshape(shape)
            continue
        positions = np.asarray(t.get("positions"))
        if encoding == "mask":
            if positions.dtype != np.uint8 or positions.size != (n + 7) // 8:
                raise ValueError(f"sparse tensor {name!r}: bit mask of {positions.size} bytes for {n} values")
            mask = np.unpackbits(positions, count=n).astype(bool)
            index = np.flatnonzero(mask)
        elif encoding == "index":
            if not np.issubdtype(positions.dtype, np.unsignedinteger):
                raise ValueError(f"sparse tensor {name!r}: index positions must be unsigned integers")
            index = positions.astype(np.int64)
            if index.size and (index.max() >= n or np.any(np.diff(index) <= 0)):
                raise ValueError(f"sparse tensor {name!r}: positions out of range or not strictly increasing")
        else:
            raise ValueError(f"sparse tensor {name!r}: unknown encoding {encoding!r}")
        if index.size != values.size:
            raise ValueError(f"sparse tensor {name!r}: {index.size} positions but {values.size} values")
        dense = np.zeros(n, dtype=dtype)
        dense[index] = values
        out[name] = dense.reshape(shape)
    return out


def payload_nbytes(payload: Any) -> int:
    """Bytes of every array in a payload plus its other fields as JSON: what a serializer must at least send."""
    arrays: list[np.ndarray] = []

    def strip(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            arrays.append(obj)
            return None
        if isinstance(obj, Mapping):
            return {k: strip(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return [strip(v) for v in obj]
        return obj

    meta = json.dumps(strip(payload), default=str)
    return int(sum(a.nbytes for a in arrays) + len(meta.encode()))


# ---------------------------------------------------------------------------------------------------------------
# Client-level DP on the update
# ---------------------------------------------------------------------------------------------------------------

ADJACENCIES = ("replace", "add_remove")


@dataclass(frozen=True)
class ClientDPConfig:
    """Clip the update to ``clip_norm`` and add N(0, (noise_multiplier·clip_norm)²) per coordinate, every round.

    ``adjacency``: ``"replace"`` (default) protects any change of the site's data, so the L2 sensitivity of the
    clipped update is 2·clip_norm; ``"add_remove"`` compares with the site sending nothing (sensitivity clip_norm),
    as in DP-FedAvg with client sampling at a trusted server.
    """

    clip_norm: float
    noise_multiplier: float
    delta: float = DEFAULT_DELTA
    adjacency: str = "replace"
    accountant: str = DEFAULT_ACCOUNTANT  # as every new plan of the project (PRV: tighter than RDP at the same σ)

    def __post_init__(self) -> None:
        for name in ("clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        check_delta(self.delta)
        if self.adjacency not in ADJACENCIES:
            raise ValueError(f"adjacency must be one of {ADJACENCIES}, got {self.adjacency!r}")
        check_accountant(self.accountant)

    @property
    def sensitivity(self) -> float:
        return (2.0 if self.adjacency == "replace" else 1.0) * float(self.clip_norm)

    @property
    def noise_std(self) -> float:
        return float(self.noise_multiplier) * float(self.clip_norm)

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std ÷ sensitivity: the σ the accountant uses."""
        return self.noise_std / self.sensitivity

    def epsilon(self, rounds: int) -> float:
        """ε after ``rounds`` noised updates (each a full-participation Gaussian release, q = 1)."""
        return epsilon(
            noise_multiplier=self.effective_noise_multiplier,
            sample_rate=1.0,
            steps=int(rounds),
            delta=self.delta,
            accountant=self.accountant,  # type: ignore[arg-type]
        )

    def epsilon_any_change(self, rounds: int) -> float:
        """ε against any change of the site's data (sensitivity 2·clip_norm) whatever ``adjacency`` says.

        What a dataset's ledger is charged: adding, removing or replacing one case moves the clipped update by up
        to 2·clip_norm, which the ``add_remove`` ε (site present or absent) does not cover.
        """
        return replace(self, adjacency="replace").epsilon(rounds)


def clip_and_noise(
    diff: Arrays, *, config: ClientDPConfig, rng: np.random.Generator | None = None
) -> tuple[dict[str, np.ndarray], FilterReport]:
    """Clip the update's global L2 norm to ``clip_norm``, then add Gaussian noise to every coordinate.

    ``rng`` defaults to a generator seeded from the OS entropy pool (numpy's PCG64 is not a cryptographic RNG; see
    docs/privacy.md). Arrays keep their dtype.
    """
    if not isinstance(config, ClientDPConfig):
        raise TypeError(f"config must be a ClientDPConfig, got {type(config).__name__}")
    arrays = check_update(diff)
    rng = rng if rng is not None else np.random.default_rng()
    norm = l2_norm(arrays)
    scale = min(1.0, config.clip_norm / norm) if norm > 0 else 1.0
    out = {}
    for name, a in arrays.items():
        noise = rng.normal(0.0, config.noise_std, size=a.shape)
        with np.errstate(over="ignore"):  # an overflow is caught just below
            out[name] = (a.astype(np.float64) * scale + noise).astype(a.dtype)
        if not np.all(np.isfinite(out[name])):  # noise beyond the dtype's range: never send inf
            raise ValueError(f"noise std {config.noise_std:g} overflows {a.dtype} in {name!r}; lower σ·clip_norm")
    report = FilterReport(
        filter="client_dp",
        fraction_kept=1.0,
        norm_before=norm,
        norm_after=l2_norm(out),
        bytes_before=dense_nbytes(arrays),
        bytes_after=dense_nbytes(out),
        details={
            "clipped": norm > config.clip_norm,
            "norm_clipped": norm * scale,
            "clip_norm": config.clip_norm,
            "noise_std": config.noise_std,
            "dp": True,
        },
    )
    return out, report


class ClientDPAccountant:
    """Counts a site's noised updates and gives the client-level ε of the job (state optionally persisted)."""

    def __init__(self, *, config: ClientDPConfig, state_path: str | os.PathLike[str] | None = None) -> None:
        self.config = config
        self.rounds = 0
        self.state_path = Path(state_path) if state_path is not None else None
        if self.state_path is not None and self.state_path.exists():
            try:
                state = json.loads(self.state_path.read_text(encoding="utf-8"))
                saved = state["config"]
                rounds = int(state["rounds"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RuntimeError(f"client-DP state {self.state_path} is unreadable ({exc}); not resetting") from exc
            if saved != asdict(config):
                raise ValueError(f"client-DP state {self.state_path} belongs to another configuration: {saved}")
            self.rounds = rounds

    def step(self) -> None:
        """Count one noised update (call before it is sent)."""
        self.rounds += 1
        if self.state_path is not None:
            atomic_write_json(self.state_path, {"config": asdict(self.config), "rounds": self.rounds})

    @property
    def epsilon(self) -> float:
        return self.config.epsilon(self.rounds)

    def report(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "delta": self.config.delta,
            "accountant": self.config.accountant,
            "rounds": self.rounds,
            "noise_multiplier": self.config.noise_multiplier,
            "effective_noise_multiplier": self.config.effective_noise_multiplier,
            "clip_norm": self.config.clip_norm,
            "adjacency": self.config.adjacency,
            "scope": CLIENT_DP_SCOPE,
            "unit": CLIENT_DP_UNIT,
        }
