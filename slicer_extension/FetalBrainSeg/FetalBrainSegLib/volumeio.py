"""Reading and writing NIfTI-1 and NRRD volumes with the standard library and numpy only.

Why not nibabel/SimpleITK: this package must run in 3D Slicer's bundled Python, which has numpy but not nibabel, and
the tests must run without Slicer. The subset here is what MONAI Label exchanges (NIfTI-1 ``.nii``/``.nii.gz``, NRRD
with ``raw``/``gzip``/``bzip2``/``ascii`` encodings and an attached header) and what Slicer writes for segmentations.

Conventions (the same as nibabel's): arrays are indexed ``(i, j, k)`` (first index fastest on disk), and the affine
maps ``(i, j, k, 1)`` to RAS millimetres. Slicer's ``arrayFromVolume`` is ``(k, j, i)``: transpose at that boundary.
"""

from __future__ import annotations

import bz2
import gzip
import os
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import write_bytes_atomic
from .errors import FileFormatError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".seg.nrrd", ".nrrd")


@dataclass(frozen=True)
class Geometry:
    """Where a voxel grid lies in space: its shape and voxel-to-RAS affine."""

    shape: tuple[int, ...]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass
class Volume:
    """A voxel array indexed (i, j, k) and its voxel-to-RAS affine (4x4)."""

    array: np.ndarray
    affine: np.ndarray

    @property
    def geometry(self) -> Geometry:
        return Geometry(tuple(int(s) for s in self.array.shape), np.asarray(self.affine, dtype=float))


def suffix_of(path: str | os.PathLike[str]) -> str:
    """The volume suffix of ``path`` (``.nii.gz``, ``.nii``, ``.seg.nrrd``, ``.nrrd``) or ``''``."""
    name = Path(path).name.lower()
    return next((s for s in (*NIFTI_SUFFIXES, *NRRD_SUFFIXES) if name.endswith(s)), "")


def read_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI-1 or NRRD file (chosen by content, not only by name)."""
    data = read_file_bytes(path)
    if _looks_like_nrrd(data):
        array, affine, _ = parse_nrrd(data, name=Path(path).name)
        return Volume(array, affine)
    geometry, array = _parse_nifti(data, name=Path(path).name, header_only=False)
    return Volume(array, geometry.affine)  # type: ignore[arg-type]


def read_geometry(path: str | os.PathLike[str]) -> Geometry:
    """Shape and affine of a NIfTI-1 or NRRD file."""
    data = read_file_bytes(path)
    if _looks_like_nrrd(data):
        array, affine, _ = parse_nrrd(data, name=Path(path).name)
        return Geometry(tuple(int(s) for s in array.shape), affine)
    return _parse_nifti(data, name=Path(path).name, header_only=True)[0]


def read_file_bytes(path: str | os.PathLike[str]) -> bytes:
    """The file's bytes, gunzipped when the whole file is gzip (.nii.gz); errors as FileFormatError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise FileFormatError(f"Cannot read {path.name}: {e.strerror or e}") from e
    if raw[:2] == b"\x1f\x8b":  # a gzipped file (.nii.gz); NRRD compresses only its data part
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise FileFormatError(f"{path.name} is a damaged or truncated gzip file ({e}).") from e
    return raw


def _looks_like_nrrd(data: bytes) -> bool:
    return data[:4] == b"NRRD"


# ---------------------------------------------------------------------------------------------------------------
# NIfTI-1
# ---------------------------------------------------------------------------------------------------------------

_NIFTI_DTYPES: dict[int, str] = {
    2: "u1",
    4: "i2",
    8: "i4",
    16: "f4",
    64: "f8",
    256: "i1",
    512: "u2",
    768: "u4",
    1024: "i8",
    1280: "u8",
}
_NIFTI_CODES = {np.dtype(v).str[1:]: k for k, v in _NIFTI_DTYPES.items()}


def _parse_nifti(data: bytes, *, name: str, header_only: bool) -> tuple[Geometry, np.ndarray | None]:
    if len(data) < 348:
        raise FileFormatError(f"{name} is not a NIfTI file (too short: {len(data)} bytes).")
    endian = "<"
    (sizeof_hdr,) = struct.unpack_from("<i", data, 0)
    if sizeof_hdr != 348:
        (sizeof_hdr,) = struct.unpack_from(">i", data, 0)
        endian = ">"
    if sizeof_hdr == 540:
        raise FileFormatError(f"{name} is a NIfTI-2 file; only NIfTI-1 is supported.")
    if sizeof_hdr != 348:
        raise FileFormatError(f"{name} is neither a NIfTI-1 nor a NRRD file.")
    magic = data[344:348]
    if magic not in (b"n+1\x00", b"ni1\x00"):
        raise FileFormatError(f"{name} has no NIfTI-1 magic string; it is not a NIfTI-1 file.")
    if magic == b"ni1\x00":
        raise FileFormatError(f"{name} is a two-file (.hdr/.img) NIfTI; only single-file .nii/.nii.gz is supported.")

    dim = struct.unpack_from(endian + "8h", data, 40)
    datatype, _bitpix = struct.unpack_from(endian + "2h", data, 70)
    pixdim = struct.unpack_from(endian + "8f", data, 76)
    vox_offset, scl_slope, scl_inter = struct.unpack_from(endian + "3f", data, 108)
    qform_code, sform_code = struct.unpack_from(endian + "2h", data, 252)
    quatern = struct.unpack_from(endian + "6f", data, 256)
    srow = np.array(struct.unpack_from(endian + "12f", data, 280), dtype=float).reshape(3, 4)

    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1 : ndim + 1]):
        raise FileFormatError(f"{name} has an invalid NIfTI dimension field {list(dim)}.")
    shape = [int(d) for d in dim[1 : ndim + 1]]
    while len(shape) > 3 and shape[-1] == 1:  # (x, y, z, 1) is a 3D volume written by some tools
        shape.pop()
    zooms = [float(abs(p)) or 1.0 for p in pixdim[1:4]]

    if sform_code > 0:
        affine = np.vstack([srow, [0.0, 0.0, 0.0, 1.0]])
    elif qform_code > 0:
        affine = _quatern_affine(quatern, zooms, qfac=-1.0 if pixdim[0] < 0 else 1.0)
    else:  # ANALYZE-style: what nibabel reports for such files
        affine = np.diag([-zooms[0], zooms[1], zooms[2], 1.0])
        n = np.array([*shape, 1, 1, 1][:3], dtype=float)
        affine[:3, 3] = -((n - 1) / 2.0) * np.array([-zooms[0], zooms[1], zooms[2]])

    geometry = Geometry(tuple(shape), affine)
    if header_only:
        return geometry, None

    if datatype not in _NIFTI_DTYPES:
        raise FileFormatError(f"{name} uses NIfTI datatype {datatype}, which is not supported.")
    dtype = np.dtype(endian + _NIFTI_DTYPES[datatype])
    offset = int(vox_offset) if vox_offset >= 352 else 352
    count = int(np.prod(shape))
    if len(data) < offset + count * dtype.itemsize:
        raise FileFormatError(
            f"{name} is truncated: expected {count * dtype.itemsize} bytes of voxels, found {len(data) - offset}."
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F")
    array = array.astype(dtype.newbyteorder("="), copy=True)
    scaled = scl_slope not in (0.0, 1.0) or scl_inter != 0.0
    if scaled and np.isfinite(scl_slope) and np.isfinite(scl_inter):
        array = array * np.float32(scl_slope) + np.float32(scl_inter)
    return geometry, array


def _quatern_affine(q: Sequence[float], zooms: Sequence[float], qfac: float) -> np.ndarray:
    b, c, d, qx, qy, qz = (float(v) for v in q)
    a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    rot = np.array(
        [
            [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
            [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
            [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c],
        ]
    )
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([zooms[0], zooms[1], zooms[2] * qfac])
    affine[:3, 3] = [qx, qy, qz]
    return affine


def _affine_to_quatern(affine: np.ndarray) -> tuple[tuple[float, ...], float, tuple[float, float, float]]:
    """Quaternion (b, c, d, qx, qy, qz), qfac and zooms of an affine, as nifti1_io's mat44_to_quatern does."""
    m = np.asarray(affine, dtype=float)[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    zooms[zooms == 0] = 1.0
    rot = m / zooms
    qfac = 1.0
    if np.linalg.det(rot) < 0:
        qfac = -1.0
        rot[:, 2] *= -1
    u, _, vt = np.linalg.svd(rot)  # nearest proper rotation (removes float32 noise / small shears)
    rot = u @ vt
    trace = np.trace(rot)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        a, b, c, d = 0.25 * s, (rot[2, 1] - rot[1, 2]) / s, (rot[0, 2] - rot[2, 0]) / s, (rot[1, 0] - rot[0, 1]) / s
    elif rot[0, 0] > rot[1, 1] and rot[0, 0] > rot[2, 2]:
        s = 2.0 * np.sqrt(1.0 + rot[0, 0] - rot[1, 1] - rot[2, 2])
        a, b, c, d = (rot[2, 1] - rot[1, 2]) / s, 0.25 * s, (rot[0, 1] + rot[1, 0]) / s, (rot[0, 2] + rot[2, 0]) / s
    elif rot[1, 1] > rot[2, 2]:
        s = 2.0 * np.sqrt(1.0 + rot[1, 1] - rot[0, 0] - rot[2, 2])
        a, b, c, d = (rot[0, 2] - rot[2, 0]) / s, (rot[0, 1] + rot[1, 0]) / s, 0.25 * s, (rot[1, 2] + rot[2, 1]) / s
    else:
        s = 2.0 * np.sqrt(1.0 + rot[2, 2] - rot[0, 0] - rot[1, 1])
        a, b, c, d = (rot[1, 0] - rot[0, 1]) / s, (rot[0, 2] + rot[2, 0]) / s, (rot[1, 2] + rot[2, 1]) / s, 0.25 * s
    if a < 0:
        b, c, d = -b, -c, -d
    t = np.asarray(affine, dtype=float)[:3, 3]
    return (b, c, d, t[0], t[1], t[2]), qfac, (float(zooms[0]), float(zooms[1]), float(zooms[2]))


def nifti_bytes(array: np.ndarray, affine: np.ndarray, *, compress: bool = True) -> bytes:
    """Encode a 3D array and RAS affine as a NIfTI-1 file (sform and qform both set, code 1 = scanner)."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    key = array.dtype.str[1:]
    if key not in _NIFTI_CODES:
        raise ValueError(f"cannot write voxels of type {array.dtype} to NIfTI")
    affine = np.asarray(affine, dtype=float)
    quatern, qfac, zooms = _affine_to_quatern(affine)
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    dims = [array.ndim, *array.shape] + [1] * (7 - array.ndim)
    struct.pack_into("<8h", hdr, 40, *dims)
    struct.pack_into("<2h", hdr, 70, _NIFTI_CODES[key], array.dtype.itemsize * 8)
    struct.pack_into("<8f", hdr, 76, qfac, *zooms, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<3f", hdr, 108, 352.0, 1.0, 0.0)
    struct.pack_into("<B", hdr, 123, 10)  # xyzt_units: mm and seconds
    struct.pack_into("<2h", hdr, 252, 1, 1)
    struct.pack_into("<6f", hdr, 256, *quatern)
    struct.pack_into("<12f", hdr, 280, *affine[:3, :].ravel())
    hdr[344:348] = b"n+1\x00"
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    payload = bytes(hdr) + little.tobytes(order="F")
    return gzip.compress(payload, compresslevel=6, mtime=0) if compress else payload


def write_nifti(path: str | os.PathLike[str], array: np.ndarray, affine: np.ndarray) -> Path:
    """Atomically write a NIfTI-1 file; gzipped when the name ends in ``.gz``."""
    return write_bytes_atomic(path, nifti_bytes(array, affine, compress=str(path).endswith(".gz")))


# ---------------------------------------------------------------------------------------------------------------
# NRRD
# ---------------------------------------------------------------------------------------------------------------

_NRRD_TYPES: dict[str, str] = {}
for _names, _code in (
    (("signed char", "int8", "int8_t"), "i1"),
    (("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    (("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"),
    (("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"),
    (("int", "signed int", "int32", "int32_t"), "i4"),
    (("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    (("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"), "i8"),
    (("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"),
    (("float",), "f4"),
    (("double",), "f8"),
):
    for _n in _names:
        _NRRD_TYPES[_n] = _code
_NRRD_TYPE_NAMES = {"i1": "int8", "u1": "unsigned char", "i2": "short", "u2": "unsigned short", "i4": "int"}
_NRRD_TYPE_NAMES.update({"u4": "unsigned int", "i8": "long long", "u8": "unsigned long long"})
_NRRD_TYPE_NAMES.update({"f4": "float", "f8": "double"})
_VECTOR = re.compile(r"\(([^)]*)\)|none")


def parse_nrrd(data: bytes, *, name: str = "file") -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Decode an attached-header NRRD: ``(array (i, j, k[...]) or (list, i, j, k), affine RAS, header fields)``.

    For 4D data whose first axis is a ``list`` (Slicer's multi-layer segmentations), the array keeps that axis first.
    """
    end = data.find(b"\n\n")
    if end < 0:
        raise FileFormatError(f"{name}: NRRD header has no end (truncated file?).")
    lines = data[:end].decode("latin-1").split("\n")
    if not lines[0].startswith("NRRD"):
        raise FileFormatError(f"{name} is not a NRRD file.")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        line = line.rstrip("\r")
        if not line or line.startswith("#"):
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
        elif ": " in line:
            key, value = line.split(": ", 1)
        else:
            raise FileFormatError(f"{name}: cannot read NRRD header line {line!r}.")
        fields[key.strip()] = value.strip()
    body = data[end + 2 :]

    missing = [k for k in ("type", "dimension", "sizes") if k not in fields]
    if missing:
        raise FileFormatError(f"{name}: NRRD header lacks the {', '.join(missing)} field(s).")
    dtype_code = _NRRD_TYPES.get(fields["type"].strip().lower())
    if dtype_code is None:
        raise FileFormatError(f"{name}: NRRD voxel type {fields['type']!r} is not supported.")
    try:
        ndim = int(fields["dimension"])
        sizes = [int(s) for s in fields["sizes"].split()]
    except ValueError as e:
        raise FileFormatError(f"{name}: NRRD header has a malformed size field ({e}).") from e
    if len(sizes) != ndim or any(s < 1 for s in sizes):
        raise FileFormatError(f"{name}: NRRD sizes {sizes} do not match dimension {ndim}.")
    kinds = fields.get("kinds", "").split()
    multi_layer = ndim == 4 and bool(kinds) and kinds[0] not in ("domain", "space")
    if ndim != 3 and not multi_layer:
        raise FileFormatError(f"{name} is a {ndim}D NRRD; a 3D volume (or a multi-layer segmentation) is expected.")
    if "data file" in fields or "datafile" in fields:
        raise FileFormatError(f"{name} is a detached-header NRRD (.nhdr); save it as a single .nrrd file.")
    endian = ">" if fields.get("endian", "little") == "big" else "<"
    dtype = np.dtype(endian + dtype_code)
    encoding = fields.get("encoding", "raw").lower()
    try:
        if encoding in ("gzip", "gz"):
            body = zlib.decompress(body, 15 + 32)  # gzip or zlib stream
        elif encoding in ("bzip2", "bz2"):
            body = bz2.decompress(body)
        elif encoding in ("ascii", "text", "txt"):
            body = np.array(body.split(), dtype=float).astype(dtype).tobytes()
        elif encoding != "raw":
            raise FileFormatError(f"{name}: NRRD encoding {encoding!r} is not supported.")
    except (zlib.error, OSError, EOFError, ValueError) as e:
        raise FileFormatError(f"{name}: the NRRD voxel data is damaged or truncated ({e}).") from e
    count = int(np.prod(sizes))
    if len(body) < count * dtype.itemsize:
        raise FileFormatError(f"{name} is truncated: expected {count * dtype.itemsize} bytes, found {len(body)}.")
    array = np.frombuffer(body, dtype=dtype, count=count).reshape(sizes, order="F")
    array = array.astype(dtype.newbyteorder("="), copy=True)

    space = fields.get("space", "").lower()
    if space in ("left-posterior-superior", "lps", "3d-left-handed"):
        to_ras = LPS_TO_RAS
    elif space in ("right-anterior-superior", "ras", "3d-right-handed"):
        to_ras = np.eye(4)
    elif not space and "spacings" in fields:
        to_ras = None
    else:
        raise FileFormatError(f"{name}: NRRD space {space or '(none)'!r} is not supported (use LPS or RAS).")
    ijk_to_space = np.eye(4)
    if to_ras is None:
        spacings = [float(s) for s in fields["spacings"].split() if s.lower() != "nan"]
        ijk_to_space[:3, :3] = np.diag(spacings[-3:])
        to_ras = np.eye(4)
    else:
        vectors = [m.group(1) for m in _VECTOR.finditer(fields.get("space directions", ""))]
        spatial = [v for v in vectors if v is not None]
        if len(spatial) != 3:
            raise FileFormatError(f"{name}: NRRD 'space directions' must give 3 spatial axes.")
        try:
            ijk_to_space[:3, :3] = np.array([[float(x) for x in v.split(",")] for v in spatial]).T
            origin = _VECTOR.search(fields.get("space origin", "(0,0,0)"))
            if origin and origin.group(1):
                ijk_to_space[:3, 3] = [float(x) for x in origin.group(1).split(",")]
        except ValueError as e:
            raise FileFormatError(f"{name}: NRRD space directions/origin are malformed ({e}).") from e
    return array, to_ras @ ijk_to_space, fields


def nrrd_bytes(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    extra_fields: Mapping[str, str] | None = None,
    kinds: Sequence[str] = ("domain", "domain", "domain"),
    compresslevel: int = 6,
) -> bytes:
    """Encode a volume (``(i, j, k)``, RAS affine) as a gzip NRRD in LPS space, as Slicer writes it.

    ``extra_fields`` become ``key:=value`` lines (Slicer's segment metadata); values must not contain newlines.
    """
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    code = array.dtype.str[1:]
    if code not in _NRRD_TYPE_NAMES:
        raise ValueError(f"cannot write voxels of type {array.dtype} to NRRD")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)  # the same matrix flips RAS<->LPS
    dirs = " ".join("(" + ",".join(_fmt(x) for x in lps[:3, c]) + ")" for c in range(3))
    if len(kinds) == 4:
        dirs = "none " + dirs
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPE_NAMES[code]}",
        f"dimension: {array.ndim}",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(s) for s in array.shape),
        f"space directions: {dirs}",
        "kinds: " + " ".join(kinds),
        "endian: little",
        "encoding: gzip",
        "space origin: (" + ",".join(_fmt(x) for x in lps[:3, 3]) + ")",
    ]
    for key, value in (extra_fields or {}).items():
        if "\n" in key or "\n" in str(value) or ":=" in key:
            raise ValueError(f"NRRD field {key!r} contains a newline or ':='")
        lines.append(f"{key}:={value}")
    header = ("\n".join(lines) + "\n\n").encode("latin-1", errors="replace")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return header + gzip.compress(little.tobytes(order="F"), compresslevel=compresslevel, mtime=0)


def _fmt(x: float) -> str:
    """Shortest text that reads back as the same float64 (so geometry survives a round trip exactly)."""
    return repr(float(x))
