"""The project's one home for file and process plumbing, with one set of guarantees.

Every part (core, privacy, the MONAI Label app, the NVFlare jobs, the benchmarks) writes files and takes locks
through these functions, so "can a reader see half a file", "can two writers collide", "does a crash keep the
record" have one answer:

* **Atomic writes** (:func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`,
  :func:`atomic_open`, :func:`atomic_path`): a reader sees the old file or the new one, never a mix. The data goes
  to a temporary file with a unique name (``tempfile.mkstemp``) in the target's own folder, is flushed and fsynced,
  is renamed over the target with ``os.replace`` and the folder is fsynced. Two writers of one target never share
  a temporary file: the last rename wins and either result is whole. On every failure (an exception in the
  caller's block, a full disk, Ctrl-C) the temporary file is removed and the target is left as it was.
  The file gets the permissions a plain ``open(path, "w")`` would give (``0o666`` less the umask) unless ``perm``
  says otherwise.
* **Atomic folders** (:func:`atomic_dir`): a folder is built in a hidden sibling and renamed onto the target only
  when the block succeeds; a previous folder is moved aside first and removed after.
* **Append-only JSON lines** (:func:`append_jsonl`): one record is one line, written with one ``write`` on an
  ``O_APPEND`` descriptor under :func:`file_lock`, fsynced before returning (and the folder when the file is new),
  so a crash keeps every record written before it and concurrent writers (threads or processes) never interleave.
* **Locks** (:func:`file_lock`): ``filelock.FileLock`` (``flock`` on a lock file that stays in place), exclusive
  between processes and between threads of one process. :func:`lock_file_for` names the lock file that guards a
  data file (a hidden sibling, ``.<name>.lock``).
* **Ports** (:func:`free_port`): a TCP port that is free on 127.0.0.1 right now.

Checkpoints are read in one place too: :func:`fetalseg.bundle.load_checkpoint_file` (``torch.load`` with
``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from filelock import FileLock

LOOPBACK = "127.0.0.1"
JSONL_PERMISSIONS = 0o640  # audit trails and the privacy ledger: owner writes, group reads, others nothing


# -- permissions and fsync -----------------------------------------------------------------------------------------
def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would change it for every thread meanwhile)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_permissions() -> int:
    """What ``open(path, "w")`` gives a new file: ``0o666`` less the umask."""
    return 0o666 & ~_umask()


def _fsync(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder, so a file created or renamed in it survives a crash (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        _fsync(folder)


# -- atomic files --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _replacing(path: Path, *, prefix: str, suffix: str, perm: int | None) -> Iterator[Path]:
    """The one implementation of every atomic write: a unique temporary file beside ``path`` that the caller fills;
    fsynced, given its permissions and renamed over ``path`` when the block ends normally, removed otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.close(fd)
    try:
        yield Path(name)
        _fsync(name)
        os.chmod(name, default_permissions() if perm is None else perm)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike[str], mode: str = "wb", *, perm: int | None = None, encoding: str = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``"wb"`` or ``"w"``) that replaces ``path`` when the block ends normally.

    The temporary file is ``.<name>.<random>.tmp`` beside ``path``; see the module doc for the guarantees.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes a whole new file: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    with (
        _replacing(path, prefix=f".{path.name}.", suffix=".tmp", perm=perm) as tmp,
        open(tmp, mode, **({} if "b" in mode else {"encoding": encoding})) as fh,
    ):
        yield fh


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, perm: int | None = None) -> Iterator[Path]:
    """A temporary path for a library that writes by file name; it replaces ``path`` when the block ends normally.

    The temporary file is ``.tmp-<random>-<name>``: it keeps ``path``'s extension, from which libraries such as
    nibabel or slicerio choose the format and compression. Guarantees as for :func:`atomic_open`.
    """
    path = Path(path)
    with _replacing(path, prefix=".tmp-", suffix=f"-{path.name}", perm=perm) as tmp:
        yield tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, perm: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically (see the module doc); return the path."""
    with atomic_open(path, "wb", perm=perm) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(
    path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8", perm: int | None = None
) -> Path:
    """Replace ``path`` with ``text`` atomically (see the module doc); return the path."""
    return atomic_write_bytes(path, text.encode(encoding), perm=perm)


def atomic_write_json(
    path: str | os.PathLike[str],
    data: Any,
    *,
    indent: int | None = None,
    sort_keys: bool = False,
    default: Any = None,
    perm: int | None = None,
) -> Path:
    """Replace ``path`` with ``data`` as JSON (and a final newline) atomically. The JSON is encoded before the
    file is touched, so a value that cannot be encoded changes nothing."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, default=default) + "\n"
    return atomic_write_text(path, text, perm=perm)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """An empty hidden sibling folder (``.<name>.partial-<random>``) to fill; it becomes ``target`` when the block
    ends normally and is removed otherwise.

    An existing ``target`` folder is moved aside (``.<name>.old-<random>``) just before the rename and removed after
    it (put back if the rename fails). Whether an existing folder may be replaced is the caller's decision: check
    it before, or at the end of the block (that check then runs just before the swap).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
        _swap_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _swap_dir(staging: Path, target: Path) -> None:
    if not (target.exists() or target.is_symlink()):
        os.replace(staging, target)
        fsync_dir(target.parent)
        return
    if target.is_symlink() or not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, trash / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(trash / target.name, target)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    shutil.rmtree(trash, ignore_errors=True)


# -- locks and append-only logs ------------------------------------------------------------------------------------
def lock_file_for(path: str | os.PathLike[str]) -> Path:
    """The lock file that guards ``path``: its hidden sibling ``.<name>.lock``."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def file_lock(lock_file: str | os.PathLike[str], *, timeout: float = -1) -> FileLock:
    """An exclusive lock on ``lock_file`` (created if missing, never removed), between processes and threads.

    Use it as a context manager. ``timeout`` seconds (-1: wait forever) before ``filelock.Timeout`` is raised.
    """
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock_file), timeout=timeout)


def append_jsonl(
    path: str | os.PathLike[str],
    record: Mapping[str, Any],
    *,
    lock: bool = True,
    create: bool = True,
    allow_nan: bool = True,
    perm: int = JSONL_PERMISSIONS,
) -> str:
    """Append ``record`` as one JSON line (keys sorted, non-JSON values as ``str``), fsynced; return the line.

    ``lock=False`` when the caller already holds ``file_lock(lock_file_for(path))`` (read, decide and append under
    one lock); ``create=False`` to refuse a missing file (``FileNotFoundError``) rather than start a new one.
    """
    line = json.dumps(record, sort_keys=True, default=str, allow_nan=allow_nan)
    data = memoryview((line + "\n").encode())
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (append_jsonl was told not to create it)")
    with file_lock(lock_file_for(path)) if lock else contextlib.nullcontext():
        new = create and not path.exists()
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), perm)
        try:
            while data:  # one write in practice; a short write (full disk, signal) continues in order, under the lock
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    if new:
        fsync_dir(path.parent)
    return line


# -- network -------------------------------------------------------------------------------------------------------
def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free on ``host`` (127.0.0.1 unless told) right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen, *, timeout: float = 20.0) -> None:
    """Terminate ``process``, wait up to ``timeout`` s, then kill it: a server that ignores SIGTERM never outlives
    whoever started it (the one copy of this for the app launcher, Orthanc and the tests)."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
