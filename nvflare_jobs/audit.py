"""Audit trail of what leaves each site, and what the server received.

Why: a hospital must be able to show, per job and round, exactly what was sent (which filters, with which
parameters, the ε spent so far, how many bytes) and prove that the server got those bytes and nothing else.

* :class:`SiteAuditFilter` is a client task-result filter added LAST to the job's chain (after every privacy
  filter; NVFlare runs a site's ``privacy.json`` scope filters before the job's), so it sees the update exactly as
  it leaves. It appends one JSON line per sent update to
  ``<site workspace>/audit/updates.jsonl`` (or ``audit_dir``), with ``O_APPEND`` and ``fsync``: a job that crashes
  later keeps every record written so far.
* :class:`ServerAuditFilter` is a server task-result filter added FIRST (before decoders and the update guard); it
  appends the same digest of what arrived to ``<server workspace>/audit/received.jsonl``.
* :func:`payload_digest` is the digest both compute: sha256 over the DXO's data in a canonical encoding (keys
  sorted; each array as name, dtype, shape and raw little-endian bytes), so site and server hashes are equal iff
  the model payload is bit-identical. ``bytes`` is the size of that payload.

Neither filter changes the update. A failure to write the site record stops the update (fail closed: nothing
leaves without a record).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants

from fetalseg.plumbing import append_jsonl
from nvflare_jobs.config import DP_REPORT_KEY

SITE_FILE = "updates.jsonl"
SERVER_FILE = "received.jsonl"
_PRIVACY_REPORT_KEY = "fetalfl_privacy"  # privacy.nvflare_filters.REPORT_META_KEY


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value))


def _encode(value: Any, out: hashlib._Hash) -> int:
    """Feed a canonical encoding of ``value`` to ``out``; return the payload bytes (array data) counted."""
    if isinstance(value, Mapping):
        total = 0
        for key in sorted(value, key=str):
            out.update(b"K" + str(key).encode() + b"\0")
            total += _encode(value[key], out)
        return total
    if isinstance(value, (list, tuple)):
        out.update(b"L%d\0" % len(value))
        return sum(_encode(v, out) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        out.update(b"J" + json.dumps(value).encode() + b"\0")
        return 0
    arr = _as_array(value)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    out.update(b"A" + str(arr.dtype).encode() + b"\0" + json.dumps(list(arr.shape)).encode() + b"\0")
    data = arr.tobytes()
    out.update(data)
    return len(data)


def payload_digest(data: Any) -> tuple[str, int]:
    """(sha256 hex, payload bytes) of a DXO's data (see module doc)."""
    digest = hashlib.sha256()
    size = _encode(data or {}, digest)
    return digest.hexdigest(), size


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and fsync it (and the folder on first write), so a crash keeps it; concurrent writers
    never interleave (:func:`fetalseg.plumbing.append_jsonl`)."""
    append_jsonl(path, record)


def read_records(path: str | os.PathLike[str], *, job: str | None = None) -> list[dict[str, Any]]:
    """Records of an audit file (a torn last line, from a crash mid-write, is skipped), optionally of one job."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (job is None or row.get("job") == job):
            rows.append(row)
    return rows


def _workspace_root(fl_ctx: FLContext) -> Path | None:
    engine = fl_ctx.get_engine()
    workspace = getattr(engine, "get_workspace", lambda: None)() if engine else None
    if workspace is None:
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
    root = getattr(workspace, "get_root_dir", lambda: None)() if workspace is not None else None
    return Path(root) if root else None


def _epsilon(meta: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """(ε, δ) after this round: DP-SGD's report, else the last filter report that states one."""
    eps = delta = None
    dp = meta.get(DP_REPORT_KEY)
    if isinstance(dp, Mapping):
        eps, delta = dp.get("epsilon"), dp.get("delta")
    for report in meta.get(_PRIVACY_REPORT_KEY) or []:
        details = report.get("details", {}) if isinstance(report, Mapping) else {}
        if isinstance(details, Mapping) and isinstance(details.get("epsilon"), (int, float)):
            eps, delta = details["epsilon"], details.get("delta", delta)
    as_float = lambda v: float(v) if isinstance(v, (int, float)) else None  # noqa: E731
    return as_float(eps), as_float(delta)


class _AuditFilter(Filter):
    file_name = SITE_FILE

    def __init__(self, audit_dir: str | None = None) -> None:
        super().__init__()
        self.audit_dir = audit_dir

    def _path(self, fl_ctx: FLContext) -> Path:
        if self.audit_dir:
            return Path(self.audit_dir).expanduser() / self.file_name
        root = _workspace_root(fl_ctx)
        if root is None:
            raise RuntimeError(f"{type(self).__name__}: no workspace to write the audit file in; set audit_dir")
        return root / "audit" / self.file_name

    @staticmethod
    def _common(shareable: Shareable, fl_ctx: FLContext) -> dict[str, Any]:
        rnd = shareable.get_header(AppConstants.CURRENT_ROUND, None)
        if rnd is None:
            rnd = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        return {
            "job": fl_ctx.get_job_id(),
            "round": rnd,
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME),
            "time": time.time(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


class SiteAuditFilter(_AuditFilter):
    """Client task-result filter (last in the chain): one fsynced JSON line per update that leaves the site.

    Args:
        chain: the configured filter chain (``[{"type", "path", "args", "sites", "tasks"}]``, from the job
            config); the entries that apply to this site are recorded with their parameters.
        audit_dir: folder of ``updates.jsonl`` (default: ``<site workspace>/audit``).
    """

    def __init__(self, chain: list[dict[str, Any]] | None = None, audit_dir: str | None = None) -> None:
        super().__init__(audit_dir)
        self.chain = list(chain or [])

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable  # an error reply carries no data
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return shareable
        site = fl_ctx.get_identity_name()
        sha, size = payload_digest(dxo.data)
        eps, delta = _epsilon(dxo.meta or {})
        record = {
            **self._common(shareable, fl_ctx),
            "site": site,
            "kind": dxo.data_kind,
            "filters": [f for f in self.chain if not f.get("sites") or site in f["sites"]],
            "filter_reports": list((dxo.meta or {}).get(_PRIVACY_REPORT_KEY) or []),
            "epsilon": eps,
            "delta": delta,
            "bytes": size,
            "sha256": sha,
        }
        append_record(self._path(fl_ctx), record)  # raises -> NVFlare sends an error reply, not the update
        self.log_info(fl_ctx, f"audit: round {record['round']} update {sha[:12]} ({size} bytes) recorded")
        return shareable


class ServerAuditFilter(_AuditFilter):
    """Server task-result filter (first in the chain): the digest of every update as it arrived."""

    file_name = SERVER_FILE

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        try:
            dxo = from_shareable(shareable)
        except Exception:
            return shareable
        peer = fl_ctx.get_peer_context()
        sha, size = payload_digest(dxo.data)
        record = {
            **self._common(shareable, fl_ctx),
            "site": peer.get_identity_name(default="?") if peer else "?",
            "kind": dxo.data_kind,
            "bytes": size,
            "sha256": sha,
        }
        try:
            append_record(self._path(fl_ctx), record)
        except OSError as exc:  # the server's own record must not stop training; say so loudly
            self.log_error(fl_ctx, f"audit: could not record an update from {record['site']}: {exc}")
        return shareable


def format_records(rows: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """One line per record for a terminal: time, job, round, site, bytes, ε, hash, filters."""
    yield f"{'time (UTC)':20} {'job':20} {'round':>5} {'site':10} {'bytes':>10} {'epsilon':>8}  sha256        filters"
    for r in rows:
        eps = r.get("epsilon")
        filters = ",".join(str(f.get("type") or f.get("path")) for f in r.get("filters") or []) or "-"
        yield (
            f"{r.get('time_utc', ''):20} {str(r.get('job'))[:20]:20} {r.get('round')!s:>5} "
            f"{str(r.get('site'))[:10]:10} {r.get('bytes', 0):>10} {('-' if eps is None else f'{eps:.3g}'):>8}  "
            f"{str(r.get('sha256', ''))[:12]}  {filters}"
        )
