"""Who did what on the site's MONAI Label server: one fsynced JSON line per saved label and per training start.

Why: a hospital must be able to say which user submitted which correction and who started a fine-tuning run on
which model version (the model that produced the prediction being corrected, and the one training starts from).
The user is the authenticated token's user (``"anonymous"`` when auth is off, i.e. a loopback-only server).
Records never hold tokens or image data: ids, tags, the label file's sha256, the served model's version/sha256.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fetalseg.plumbing import append_jsonl
from fetalseg.settings import AuditSettings

log = logging.getLogger(__name__)

DEFAULT_AUDIT_LOG = Path("~/.fetal-fl/audit/monailabel.jsonl")


def audit_log_path(value: str | os.PathLike[str] | None = None) -> Path:
    """``value``, else ``$FETAL_FL_APP_AUDIT_LOG``, else ``~/.fetal-fl/audit/monailabel.jsonl``."""
    text = str(value) if value else AuditSettings.load().app_audit_log or str(DEFAULT_AUDIT_LOG)
    return Path(text).expanduser().resolve()


def model_version(described: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of :meth:`ModelStore.describe` that identify a served model."""
    keys = ("bundle_version", "origin", "job_id", "round", "sha256", "trained", "modified")
    return {k: described.get(k) for k in keys if k in described}


def record(path: Path, event: str, *, user: str, role: str | None, **fields: Any) -> None:
    """Append one event (one fsynced line under a lock: :func:`fetalseg.plumbing.append_jsonl`); an audit write
    failure is logged as an error but does not undo the action."""
    entry = {
        "time": time.time(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "event": event,
        "user": user,
        "role": role,
        **fields,
    }
    try:
        append_jsonl(path, entry)
    except OSError as exc:
        log.error("audit: could not record %s by %s in %s: %s", event, user, path, exc)
