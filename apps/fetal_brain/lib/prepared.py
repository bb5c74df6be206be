"""Pre-processed inputs of datastore images, kept in memory and prepared ahead of /infer.

Why: at the bundle's 2 mm model grid the network needs ~0.5 s for a FeTA-size volume (256³ at 0.5 mm), while
reading its 60 MB ``.nii.gz`` and resampling it to the model grid takes ~0.5 s more (``bench/results/infer.md``).
That work depends only on the file and the bundle's pre-processing, not on the model, so it is done once per file:
when a case is handed out by ``/activelearning`` (the radiologist's "next case", then /infer), downloaded by a
client (``GET /datastore/image``: a viewer opening it) or uploaded, a background thread prepares it, and the
/infer that follows (or an /infer after fine-tuning published a new model) runs the network at once. The result
is identical: the same pre-processed tensor the /infer would compute.

At server start every study is prepared too (``prepare_on_start``, default on): unlabelled cases first, on one
background thread at the lowest CPU priority (Linux), until the memory budget is full (the warm-up never evicts
anything), so an /infer on any study the server already had is warm after the warm-up; files that appear or
change later are prepared when handed out, downloaded or uploaded, as above. ``/info/`` shows its progress.

An entry is keyed by the file's identity (resolved path, inode, mtime, size) and the pre-processing's fingerprint,
so a replaced study is prepared again; entries are dropped least recently used beyond ``max_bytes`` (setting
``prepared_cache_mb``; 0 turns the cache and the prefetching off). Only files inside the studies folder are kept:
one-off uploads with an /infer request are never cached.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

Prepared = dict[str, Any]


def prepared_nbytes(data: Prepared) -> int:
    """Bytes held by the tensors and arrays of a pre-processed item (what the cache budget counts)."""
    total = 0
    for value in data.values():
        if isinstance(value, torch.Tensor):
            total += value.element_size() * value.nelement()
        elif hasattr(value, "nbytes"):
            total += int(value.nbytes)
    return total


class PreparedInputs:
    """LRU cache of pre-processed datastore images with background prefetching (thread-safe)."""

    def __init__(self, *, root: str | Path, max_bytes: int, fingerprint: str) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root).resolve()
        self.max_bytes = int(max_bytes)
        self.fingerprint = fingerprint
        self._entries: OrderedDict[tuple, tuple[Prepared, int]] = OrderedDict()
        self._pending: dict[tuple, Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._prefetcher: ThreadPoolExecutor | None = None
        self.hits = self.misses = self.prefetched = self.failed_prefetches = 0
        self.warm_up: dict[str, Any] = {"state": "not started", "prepared": 0, "failed": 0, "studies": 0}
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def key(self, path: str | Path) -> tuple | None:
        """Identity of ``path`` if it may be cached (a file or DICOM folder inside the studies folder), else None."""
        resolved = Path(path).resolve()
        if not self.enabled or not resolved.is_relative_to(self.root):
            return None
        try:
            st = os.stat(resolved)
        except OSError:
            return None
        return (str(resolved), st.st_ino, st.st_mtime_ns, st.st_size, self.fingerprint)

    def get(self, path: str | Path, prepare: Callable[[str], Prepared]) -> Prepared:
        """The pre-processed ``path``: from the cache, from a prefetch in flight (waited for), or ``prepare(path)``.

        A failed preparation raises to this caller (bad input keeps its 4xx) and leaves nothing cached."""
        key = self.key(path)
        if key is None:
            return prepare(str(path))
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[0]
            pending = self._pending.get(key)
            if pending is None:
                pending = Future()
                self._pending[key] = pending
                owner = True
                self.misses += 1
            else:
                owner = False
                self.hits += 1  # a prefetch started before this request: it waits for that work, never redoes it
        if not owner:
            return pending.result()
        return self._fill(key, pending, lambda: prepare(str(path)))[0]

    def _fill(
        self, key: tuple, pending: Future, work: Callable[[], Prepared], *, evict: bool = True
    ) -> tuple[Prepared, bool]:
        """Run ``work`` for ``key``, hand the result to whoever waits on ``pending``, keep it if it fits (dropping
        the least recently used entries unless ``evict`` is False); return it and whether it was kept."""
        try:
            data = {k: v for k, v in work().items() if k == "image"}
        except BaseException as exc:
            with self._lock:
                self._pending.pop(key, None)
            pending.set_exception(exc)
            raise
        size = prepared_nbytes(data)
        with self._lock:
            self._pending.pop(key, None)
            kept = size <= self.max_bytes and (evict or self._bytes + size <= self.max_bytes)
            if kept:
                self._entries[key] = (data, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        pending.set_result(data)
        return data, kept

    def prefetch(self, path: str | Path, prepare: Callable[[str], Prepared]) -> bool:
        """Prepare ``path`` in the background (one thread; errors are logged, /infer reports them); True if queued."""
        key = self.key(path)
        if key is None:
            return False
        with self._lock:
            if key in self._entries or key in self._pending:
                return False
            pending: Future = Future()
            self._pending[key] = pending
            if self._prefetcher is None:
                self._prefetcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
            prefetcher = self._prefetcher

        def run() -> None:
            try:
                self._fill(key, pending, lambda: prepare(str(path)))
                with self._lock:
                    self.prefetched += 1
            except Exception as exc:
                with self._lock:
                    self.failed_prefetches += 1
                log.info("prefetch of %s failed (its /infer will say why): %s", path, exc)

        def abandon(job: Future) -> None:  # cancelled by close(): whoever waits on the entry gets an error
            if job.cancelled():
                with self._lock:
                    self._pending.pop(key, None)
                pending.set_exception(RuntimeError("the server is shutting down"))

        prefetcher.submit(run).add_done_callback(abandon)
        return True

    def warm(self, paths: Iterable[str | Path], prepare: Callable[[str], Prepared]) -> threading.Thread | None:
        """Prepare ``paths`` in order on a low-priority background thread until the budget is full.

        Why a thread of its own: the prefetch thread serves the studies users are about to open and must not
        queue behind a whole datastore. Nothing is evicted (what users touched stays), a study already kept or
        being prepared is skipped, a failure is counted and the next study goes on. Returns the thread (None when
        the cache is off)."""
        paths = list(paths)
        with self._lock:
            self.warm_up = {"state": "off" if not self.enabled else "running", "prepared": 0, "failed": 0,
                            "studies": len(paths)}  # fmt: skip
        if not self.enabled:
            return None
        thread = threading.Thread(target=self._warm, args=(paths, prepare), name="prepare-studies", daemon=True)
        thread.start()
        return thread

    def _warm(self, paths: list[str | Path], prepare: Callable[[str], Prepared]) -> None:
        _lowest_cpu_priority()
        state = "done"
        for path in paths:
            if self._closed:
                state = "stopped: server shutting down"
                break
            key = self.key(path)
            if key is None:
                continue
            with self._lock:
                if key in self._entries or key in self._pending:
                    continue
                pending: Future = Future()
                self._pending[key] = pending
            try:
                _, kept = self._fill(key, pending, lambda p=path: prepare(str(p)), evict=False)
            except Exception as exc:
                with self._lock:
                    self.warm_up["failed"] += 1
                log.info("preparing study %s failed (its /infer will say why): %s", path, exc)
                continue
            if not kept:
                state = "stopped: memory budget full (prepared_cache_mb)"
                break
            with self._lock:
                self.warm_up["prepared"] += 1
        with self._lock:
            self.warm_up["state"] = state
        log.info("prepared studies at start: %s", self.warm_up)

    def wait_idle(self, timeout: float | None = None) -> None:
        """Block until the prefetches queued so far have finished (for tests and benchmarks)."""
        with self._lock:
            futures = list(self._pending.values())
        for future in futures:
            try:
                future.result(timeout=timeout)
            except Exception:  # a failed prefetch is logged where it ran
                continue

    def stats(self) -> dict[str, Any]:
        """What ``/info/`` shows: entries, bytes used and allowed, hits, misses, prefetches."""
        with self._lock:
            return {
                "enabled": self.enabled,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "prefetched": self.prefetched,
                "failed_prefetches": self.failed_prefetches,
                "pending": len(self._pending),
                "warm_up": dict(self.warm_up),
            }

    def close(self) -> None:
        self._closed = True
        with self._lock:
            prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            prefetcher.shutdown(wait=False, cancel_futures=True)


def _lowest_cpu_priority() -> None:
    """Give the calling thread the lowest CPU priority (nice 19) so user requests win the cores. Linux only:
    there a thread id is a schedulable task; elsewhere the call would name a process, so nothing is changed."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as exc:  # not fatal: the warm-up then runs at normal priority
        log.info("could not lower the warm-up thread's priority: %s", exc)
