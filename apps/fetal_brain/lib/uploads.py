"""Where uploaded files wait while they are checked, and how their type is told.

Uploads live in one private folder per server process (mode 0700, removed at exit); the app accepts a file path
for inference only if it lies there, so ``/infer?image=/etc/passwd`` and friends cannot reach anything else.
A DICOM series arrives as a ``.zip``; it is unpacked defensively (no absolute paths, no ``..``, no links,
bounded size and count) into a flat folder.

Every upload is then checked for what its header promises before a voxel is read (:func:`check_upload`): a small
compressed file can declare gigabytes (a 2 MB label once held a worker for over a minute inflating 2.2 GB), so
shape, type and total size are bounded from the header alone, and decompression itself never goes past what the
header declares (plus a small margin).
"""

from __future__ import annotations

import atexit
import bz2
import gzip
import io
import logging
import math
import os
import shutil
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
# What one upload may declare (a 256³ FeTA volume is 16.8 M voxels, 64 MiB as float32).
MAX_AXIS = 2048  # voxels along one axis (also: slices of a DICOM series)
MAX_VOXELS = 512**3
MAX_INFLATED_BYTES = 1 << 30  # voxel data once decompressed
MAX_HEADER_BYTES = 1 << 20  # NIfTI header + extensions, NRRD header text
MAX_LABEL_LAYERS = 16  # a Slicer .seg.nrrd holds one layer per group of overlapping segments
INFLATE_MARGIN = 64 << 10  # decompressed bytes allowed past what the header declares
_INFLATE_BLOCK = 1 << 20
_NRRD_GRID_KINDS = {"domain", "space", "none", "???"}  # NRRD axis kinds of grid axes (others: list, vector...)

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


# -- what an upload declares, checked before a voxel is read -----------------------------------------------------
@dataclass(frozen=True)
class Declared:
    """What a file's header promises: grid axes (x, y, z), values per voxel (``layers``), bytes per value."""

    spatial: tuple[int, ...]
    layers: int
    itemsize: int

    @property
    def voxels(self) -> int:
        return math.prod(self.spatial) * self.layers

    @property
    def nbytes(self) -> int:
        return self.voxels * self.itemsize


@dataclass(frozen=True)
class _Stream:
    """Where a file's voxel data lies: from byte ``offset``, ``codec``-encoded ('' = text, bounded by the upload
    size itself), ``expected`` bytes once decoded (NIfTI: header and extensions included)."""

    offset: int
    codec: str
    expected: int


def _refuse(name: str, what: str) -> UnprocessableError:
    return UnprocessableError(f"{name}: {what} (refused from its header, no voxel data read)")


def check_upload(path: Path, *, role: str, grid: Sequence[int] | None = None, name: str | None = None) -> None:
    """Refuse an uploaded NIfTI/NRRD file or unpacked DICOM folder from what its header declares (3D, size and
    type within limits, a label on its image's ``grid``), then check, without keeping it, that its compressed data
    decodes to what the header declares: never more (a bomb whose header lies), never less (truncated).

    Why: readers trust headers and decompress whatever is there, so this runs before anything reads voxels.
    Raises :class:`UnprocessableError` (422) with the reason.
    """
    name = f"{role} {name or path.name}"
    lowered = path.name.lower()
    if path.is_dir():
        declared, stream = _dicom_declared(path, name), None
    elif lowered.endswith(".nrrd"):
        declared, stream = _nrrd_declared(path, name)
    else:
        declared, stream = _nifti_declared(path, name)
    _check_declared(declared, name, grid=grid, cropped=lowered.endswith(SEG_NRRD))
    if stream is not None:
        _check_stream(path, stream, name)


def _check_declared(declared: Declared, name: str, *, grid: Sequence[int] | None, cropped: bool) -> None:
    """A 3D grid of bounded size and a plain numeric type; a label on (``cropped``: inside) its image's grid."""
    shape = declared.spatial + ((declared.layers,) if declared.layers > 1 else ())
    if len(declared.spatial) != 3:
        raise _refuse(name, f"declares a {len(shape)}D array of shape {shape}; expected a 3D volume")
    if declared.layers > (MAX_LABEL_LAYERS if cropped else 1):
        raise _refuse(name, f"declares shape {shape}, {declared.layers} values per voxel; expected a 3D volume")
    if min(declared.spatial) < 1:
        raise _refuse(name, f"declares an empty axis (shape {shape})")
    if grid is not None:
        want = tuple(int(n) for n in grid)
        want = want[:3] if len(want) == 4 and want[3] == 1 else want
        inside = len(want) == 3 and all(a <= b for a, b in zip(declared.spatial, want, strict=True))
        if declared.spatial != want and not (cropped and inside):
            where = "inside" if cropped else "equal to"
            raise _refuse(name, f"declares shape {declared.spatial}, not {where} its image's shape {want}")
    if max(declared.spatial) > MAX_AXIS:
        raise _refuse(name, f"declares shape {shape}; at most {MAX_AXIS} voxels per axis allowed")
    if declared.voxels > MAX_VOXELS or declared.nbytes > MAX_INFLATED_BYTES:
        raise _refuse(
            name,
            f"declares {declared.voxels} voxels, {declared.nbytes} bytes of data; at most {MAX_VOXELS} voxels and "
            f"{MAX_INFLATED_BYTES} bytes allowed",
        )


def _checked_dtype(dtype: np.dtype, name: str) -> int:
    """Bytes per value of a plain integer or float voxel type (no RGB, complex, records or 128-bit floats)."""
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        raise _refuse(name, f"declares voxel type {dtype}; expected integers or floats")
    return dtype.itemsize


def _nifti_declared(path: Path, name: str) -> tuple[Declared, _Stream]:
    """The NIfTI-1/2 header, read through a bounded reader (the first 540 bytes only) and parsed by nibabel."""
    import nibabel as nib
    from nibabel.spatialimages import HeaderDataError

    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if gzipped else open(path, "rb") as fh:
            head = fh.read(540)
    except (EOFError, OSError, zlib.error) as exc:
        raise _refuse(name, f"its header cannot be read ({exc})") from exc
    sizes = {int.from_bytes(head[:4], order) for order in ("little", "big")}
    klass = nib.Nifti2Header if 540 in sizes else nib.Nifti1Header if 348 in sizes else None
    if klass is None or len(head) < klass.sizeof_hdr:
        raise _refuse(name, "has no NIfTI header")
    try:
        header = klass(head[: klass.sizeof_hdr], check=False)
        magic = np.asarray(header["magic"]).item()
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(header.get_data_offset())
    except (HeaderDataError, ValueError, TypeError, KeyError) as exc:
        raise _refuse(name, f"invalid NIfTI header ({exc})") from exc
    if magic not in (b"n+1", b"n+2"):
        raise _refuse(name, f"is not a single-file NIfTI (magic {magic!r}); send one .nii or .nii.gz file")
    if not klass.sizeof_hdr <= offset <= MAX_HEADER_BYTES:
        raise _refuse(
            name, f"declares its voxel data at byte {offset}; expected {klass.sizeof_hdr}..{MAX_HEADER_BYTES}"
        )
    if min(shape, default=0) < 0:
        raise _refuse(name, f"declares a negative size (shape {shape})")
    if len(shape) > 4:
        raise _refuse(name, f"declares a {len(shape)}D array of shape {shape}; expected a 3D volume")
    declared = Declared(shape[:3], math.prod(shape[3:]), _checked_dtype(dtype, name))
    return declared, _Stream(0, "gzip" if gzipped else "raw", offset + declared.nbytes)


def _nrrd_declared(path: Path, name: str) -> tuple[Declared, _Stream | None]:
    """The NRRD header (text up to the first blank line, at most ``MAX_HEADER_BYTES``), parsed by pynrrd."""
    import nrrd

    with open(path, "rb") as fh:
        head = fh.read(MAX_HEADER_BYTES)
    lines, offset = [], 0
    for line in io.BytesIO(head):
        lines.append(line)
        offset += len(line)
        if len(lines) > 1 and not line.strip():
            break
    else:
        raise _refuse(name, f"no end of NRRD header (blank line) in its first {MAX_HEADER_BYTES} bytes")
    try:
        header = nrrd.read_header(lines)
        dtype = np.dtype(nrrd.reader._determine_datatype(header))
        sizes = [int(n) for n in header["sizes"]]
    except Exception as exc:  # pynrrd raises NRRDError, KeyError, ValueError... for bad headers
        raise _refuse(name, f"invalid NRRD header ({type(exc).__name__}: {exc})") from exc
    detached = header.get("data file", header.get("datafile"))
    if detached is not None:  # readers would open that path on the server
        raise _refuse(name, f"names a separate data file ({detached!r}); send one .nrrd with its data attached")
    for skip in ("line skip", "lineskip", "byte skip", "byteskip"):
        if int(header.get(skip, 0) or 0) != 0:
            raise _refuse(name, f"uses '{skip}', which uploads do not support")
    kinds = [str(k).lower() for k in header.get("kinds") or ["domain"] * len(sizes)]
    grid = [k in _NRRD_GRID_KINDS for k in kinds] + [True] * (len(sizes) - len(kinds))
    spatial = tuple(n for n, on_grid in zip(sizes, grid, strict=False) if on_grid)
    layers = math.prod(n for n, on_grid in zip(sizes, grid, strict=False) if not on_grid)
    if min(sizes, default=0) < 0:
        raise _refuse(name, f"declares a negative size (sizes {sizes})")
    declared = Declared(spatial, layers, _checked_dtype(dtype, name))
    encoding = str(header.get("encoding", "")).lower()
    codecs = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}
    if encoding in ("ascii", "text", "txt", "hex"):
        return declared, None  # text is never smaller than its values: the upload limit bounds it
    if encoding not in codecs:
        raise _refuse(name, f"uses NRRD encoding {encoding!r}; expected raw, gzip, bzip2 or ascii")
    return declared, _Stream(offset, codecs[encoding], declared.nbytes)


def _check_stream(path: Path, stream: _Stream, name: str) -> None:
    """Decode the data in blocks, counting bytes and keeping none, stopping a margin past what the header declares."""
    limit = stream.expected + INFLATE_MARGIN
    if stream.codec == "raw":
        size = path.stat().st_size - stream.offset
    else:
        size = 0
        try:
            with open(path, "rb") as raw:
                raw.seek(stream.offset)
                with gzip.GzipFile(fileobj=raw) if stream.codec == "gzip" else bz2.BZ2File(raw) as decoded:
                    while size <= limit and (block := decoded.read(min(_INFLATE_BLOCK, limit + 1 - size))):
                        size += len(block)
        except EOFError as exc:
            raise UnprocessableError(f"{name}: truncated: its compressed data ends early ({exc})") from exc
        except (OSError, zlib.error) as exc:
            raise UnprocessableError(f"{name}: its compressed data is corrupt ({exc})") from exc
    if size > limit:
        raise UnprocessableError(
            f"{name}: holds more data than its header declares ({stream.expected} bytes); refused after reading "
            f"{size} bytes, the rest was never decompressed"
        )
    if size < stream.expected:
        raise UnprocessableError(f"{name}: truncated: {size} bytes of data where its header declares {stream.expected}")


def _dicom_declared(folder: Path, name: str) -> Declared:
    """A bound on an unpacked DICOM series from its files' headers (compressed pixel data can hold a bomb too)."""
    import pydicom

    tags = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated"]
    rows = cols = slices = layers = itemsize = 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
            r, c = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            frames, samples = int(ds.get("NumberOfFrames") or 1), int(ds.get("SamplesPerPixel") or 1)
            bits = int(ds.get("BitsAllocated") or 16)
        except Exception:  # not an image file: the series reader says what is wrong with the folder
            continue
        if r and c:
            rows, cols, slices = max(rows, r), max(cols, c), slices + frames
            layers, itemsize = max(layers, samples), max(itemsize, -(-bits // 8))
    if not slices:
        raise _refuse(name, "holds no DICOM image (no file declares rows and columns)")
    return Declared((cols, rows, slices), layers, itemsize)
