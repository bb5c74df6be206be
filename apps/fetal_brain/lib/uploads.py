"""Where uploaded files wait while they are checked, and how their type is told.

Uploads live in one private folder per server process (mode 0700, removed at exit); the app accepts a file path
for inference only if it lies there, so ``/infer?image=/etc/passwd`` and friends cannot reach anything else.
A DICOM series arrives as a ``.zip``; it is unpacked defensively (no absolute paths, no ``..``, no links,
bounded size and count) into a flat folder.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from pathlib import Path

from apps.fetal_brain.lib.errors import (
    BadRequestError,
    PayloadTooLargeError,
    UnprocessableError,
    UnsupportedMediaTypeError,
)
from apps.fetal_brain.lib.volumes import SEG_NRRD, is_dicom_dir
from fetalseg.data.io import suffix_of

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
LABEL_SUFFIXES = (".nii.gz", ".nii", SEG_NRRD, ".nrrd")
ZIP = ".zip"
MAX_ZIP_MEMBERS = 5000

_lock = threading.Lock()
_dir: Path | None = None


PREFIX = "fetal-brain-uploads-"


def private_dir() -> Path:
    """This process's private upload folder (created on first use; removed at exit and at server shutdown)."""
    global _dir
    with _lock:
        if _dir is None or not _dir.is_dir():
            _remove_orphans()
            _dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")).resolve()
            atexit.register(shutil.rmtree, _dir, True)
        return _dir


def remove_private_dir() -> None:
    """Delete this process's upload folder now (uvicorn ends by re-raising SIGTERM, so atexit may not run)."""
    global _dir
    with _lock:
        if _dir is not None:
            shutil.rmtree(_dir, ignore_errors=True)
            _dir = None


def _remove_orphans() -> None:
    """Upload folders left by server processes that no longer run (killed before they could clean up)."""
    import psutil

    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        pid = folder.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def new_upload_path(suffix: str, *, name: str | None = None) -> Path:
    """A fresh path inside the private folder ending in ``suffix``; named after the client's file when given,
    so error messages speak of ``scan.nii.gz`` rather than a random temporary name."""
    folder = Path(tempfile.mkdtemp(dir=private_dir()))
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(name or "").name)[:100].lstrip(".")
    if stem:
        lowered = stem.lower()
        for known in (SEG_NRRD, ZIP, *IMAGE_SUFFIXES, ".upload"):
            if lowered.endswith(known):
                stem = stem[: -len(known)]
                break
    path = folder / f"{stem or 'upload'}{suffix}"
    path.touch()
    return path


def new_result_path(suffix: str) -> Path:
    """A fresh file for an inference result (removed once sent) in the private folder."""
    folder = private_dir() / "results"
    folder.mkdir(exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="segmentation-", suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


def discard(path: str | Path) -> None:
    """Remove an upload (file or unpacked folder) with the private sub-folder it was received in."""
    path = Path(path)
    if not is_private(path):
        return
    top = private_dir() / path.resolve().relative_to(private_dir()).parts[0]
    if top.name == "results" or not top.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(top, ignore_errors=True)


def scrub(message: str) -> str:
    """``message`` without this server's private folder path (do not tell clients where uploads live)."""
    return message.replace(str(private_dir()) + os.sep, "").replace(str(private_dir()), "")


def is_private(path: str | Path) -> bool:
    """True if ``path`` resolves to something inside this process's private upload folder."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):
        return False
    base = private_dir()
    return resolved != base and base in resolved.parents


def sniff_suffix(path: Path, filename: str | None, *, allowed: tuple[str, ...]) -> str:
    """The upload's type from its file name, or from its first bytes when the name has no known suffix.

    Raises :class:`UnsupportedMediaTypeError` (415) for anything that is not an image format this app reads.
    """
    name = (filename or "").lower()
    if name.endswith(SEG_NRRD) and SEG_NRRD in allowed:
        return SEG_NRRD
    if name.endswith(ZIP) and ZIP in allowed:
        return ZIP
    suffix = suffix_of(name) if name else ""
    if suffix in allowed:
        return suffix
    if suffix or (name and "." in Path(name).name):
        raise UnsupportedMediaTypeError(
            f"file {Path(name).name!r}: unsupported type; send one of {', '.join(allowed)}"
            + (" (a DICOM series as a .zip)" if ZIP in allowed else "")
        )
    with open(path, "rb") as fh:
        head = fh.read(352)
    guess = ""
    if head[:2] == b"\x1f\x8b":
        guess = ".nii.gz"
    elif head[:4] == b"NRRD":
        guess = ".nrrd"
    elif head[:4] == b"PK\x03\x04":
        guess = ZIP
    elif len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        guess = ".nii"
    if guess not in allowed:
        raise UnsupportedMediaTypeError(f"upload without a file name is not a recognised image ({', '.join(allowed)})")
    return guess


def unpack_dicom_zip(archive: Path, *, max_bytes: int) -> Path:
    """Unpack a zipped DICOM series into a new flat folder in the private area; return that folder."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise UnprocessableError(f"upload {archive.name}: not a valid zip archive ({exc})") from exc
    with zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        if not members:
            raise UnprocessableError("zip archive is empty; expected the files of one DICOM series")
        if len(members) > MAX_ZIP_MEMBERS:
            raise UnprocessableError(f"zip archive has {len(members)} files; at most {MAX_ZIP_MEMBERS} allowed")
        total = sum(m.file_size for m in members)
        if total > max_bytes:
            raise PayloadTooLargeError(f"zip archive unpacks to {total} bytes, over the {max_bytes}-byte upload limit")
        out = Path(tempfile.mkdtemp(prefix="dicom-", dir=archive.parent))
        seen: set[str] = set()
        written = 0
        for member in members:
            name = member.filename.replace("\\", "/")
            if name.startswith("/") or ".." in name.split("/") or ":" in name.split("/")[0]:
                raise BadRequestError(f"zip member {member.filename!r} has an absolute or parent path")
            if (member.external_attr >> 16) & 0o170000 == 0o120000:
                raise BadRequestError(f"zip member {member.filename!r} is a symbolic link")
            base = Path(name).name
            if not base or base.startswith(".") or base.startswith("__MACOSX"):
                continue
            target = base if base not in seen else f"{len(seen)}-{base}"
            seen.add(target)
            with zf.open(member) as src, open(out / target, "wb") as dst:
                while block := src.read(1 << 20):  # count real bytes: header sizes can lie (zip bombs)
                    written += len(block)
                    if written > max_bytes:
                        shutil.rmtree(out, ignore_errors=True)
                        raise PayloadTooLargeError(f"zip archive unpacks to over the {max_bytes}-byte upload limit")
                    dst.write(block)
    if not is_dicom_dir(out):
        shutil.rmtree(out, ignore_errors=True)
        raise UnprocessableError("zip archive does not hold DICOM files (expected one DICOM series)")
    return out
