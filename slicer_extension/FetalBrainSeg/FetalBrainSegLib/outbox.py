"""Corrections that could not be sent, kept on disk until they are.

Why: a radiologist's correction is hours of work that exists nowhere else. When sending fails for a reason that
may go away (server down or restarting, network, expired token: :func:`errors.is_retryable`), the label file is
written here atomically (temporary file, fsync, rename) before the user is told, and "Re-send pending" delivers it
later, surviving a Slicer restart. Corrections the server refused as wrong (4xx) are not kept as pending: sending
them again cannot succeed; the radiologist fixes the segmentation still open in Slicer.

Layout: ``<root>/<entry_id>.nii.gz`` (the label) and ``<root>/<entry_id>.json`` (written last: an entry exists only
once both are complete). ``entry_id`` is derived from server and case, so a newer correction of the same case
replaces the older pending one, and a successful submission removes any pending one (it would overwrite newer work).
An entry whose later re-send is refused is kept with status ``rejected`` and never deleted automatically.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomic

log = logging.getLogger(__name__)

PENDING = "pending"
REJECTED = "rejected"


@dataclass
class OutboxEntry:
    """One kept correction."""

    entry_id: str
    server_url: str
    image_id: str
    tag: str
    label_file: str  # file name inside the outbox folder
    created: float
    attempts: int = 0
    last_error: str = ""
    status: str = PENDING
    params: dict[str, Any] | None = None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.created))
        return f"case '{self.image_id}' ({when}, {self.attempts} attempt(s))"


class Outbox:
    """A folder of kept corrections."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def entry_id_for(server_url: str, image_id: str) -> str:
        digest = hashlib.sha256(f"{server_url}\n{image_id}".encode()).hexdigest()[:16]
        stem = "".join(c if (c.isalnum() or c in "-_") else "_" for c in image_id)[:60]
        return f"{stem}-{digest}"

    def put(
        self,
        server_url: str,
        image_id: str,
        label_bytes: bytes,
        *,
        tag: str = "final",
        error: str = "",
        params: dict[str, Any] | None = None,
    ) -> OutboxEntry:
        """Keep ``label_bytes`` (a NIfTI file) for ``image_id`` on ``server_url``; replaces a pending one."""
        entry_id = self.entry_id_for(server_url, image_id)
        label_file = f"{entry_id}.nii.gz"
        write_bytes_atomic(self.root / label_file, label_bytes)
        entry = OutboxEntry(
            entry_id=entry_id,
            server_url=server_url,
            image_id=image_id,
            tag=tag,
            label_file=label_file,
            created=time.time(),
            attempts=1,
            last_error=error,
            params=params,
        )
        self._write_meta(entry)
        log.info("kept correction of %s in the outbox (%s)", image_id, error or "not sent")
        return entry

    def entries(self, server_url: str | None = None, *, status: str | None = PENDING) -> list[OutboxEntry]:
        """Complete entries (oldest first), optionally only for one server and/or one status (None: all)."""
        out = []
        for meta in sorted(self.root.glob("*.json")):
            try:
                data = json.loads(meta.read_text(encoding="utf-8"))
                entry = OutboxEntry(**data)
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable outbox entry %s: %s", meta.name, e)
                continue
            if not (self.root / entry.label_file).is_file():
                log.warning("outbox entry %s has no label file; ignoring it", meta.name)
                continue
            if server_url is not None and entry.server_url != server_url:
                continue
            if status is not None and entry.status != status:
                continue
            out.append(entry)
        return sorted(out, key=lambda e: e.created)

    def label_bytes(self, entry: OutboxEntry) -> bytes:
        return (self.root / entry.label_file).read_bytes()

    def find(self, server_url: str, image_id: str) -> OutboxEntry | None:
        meta = self.root / f"{self.entry_id_for(server_url, image_id)}.json"
        if not meta.is_file():
            return None
        return next((e for e in self.entries(server_url, status=None) if e.image_id == image_id), None)

    def record_failure(self, entry: OutboxEntry, error: str, *, rejected: bool = False) -> OutboxEntry:
        """Count a failed re-send; a refusal by the server moves the entry to ``rejected``."""
        entry.attempts += 1
        entry.last_error = error
        if rejected:
            entry.status = REJECTED
        self._write_meta(entry)
        return entry

    def remove(self, entry: OutboxEntry) -> None:
        """Forget a delivered correction (metadata first, so a crash never leaves an entry without its label)."""
        for name in (f"{entry.entry_id}.json", entry.label_file):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()

    def _write_meta(self, entry: OutboxEntry) -> None:
        write_bytes_atomic(self.root / f"{entry.entry_id}.json", json.dumps(asdict(entry), indent=1).encode())
