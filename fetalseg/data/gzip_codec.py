"""Faster gzip for ``.nii.gz`` reading and writing through nibabel, with Intel ISA-L (the ``isal`` package).

Why: at the app's 2 mm model grid, ``/infer`` on a FeTA-size volume (256³ at 0.5 mm, a 64 MB float32 array)
spends more time inflating the ``.nii.gz`` than running the network (``bench/results/infer.md``). ISA-L inflates
about 2× and deflates about 3× faster than zlib on this machine, and writes standard gzip that any reader opens.
It is plugged in through nibabel's own extension point, ``nibabel.openers.ImageOpener.compress_ext_map``, so
every ``nib.load`` / ``nib.save`` of the project (and MONAI's ``NibabelReader`` inside the bundle's ``LoadImaged``)
uses it; nothing else changes. Without ``isal`` installed, nibabel's zlib path stays and :func:`install` says so.
"""

from __future__ import annotations

import logging
from typing import IO, Any

from nibabel.openers import ImageOpener

log = logging.getLogger(__name__)

GZ = ".gz"
_KEYWORDS = ("mode", "compresslevel", "mtime", "keep_open")  # what nibabel passes to a ".gz" opener


def isal_gzip_open(
    filename: str, mode: str = "rb", compresslevel: int = 1, mtime: int = 0, keep_open: bool = False
) -> IO[bytes]:
    """nibabel's ``gzip_open`` contract with ISA-L underneath.

    Deterministic like nibabel's writer: ``mtime`` 0 and no file name in the gzip header (the same image gives
    the same bytes whatever the file is called, so audit hashes are stable). ``compresslevel`` is clamped to
    ISA-L's 0..3 (nibabel's default, 1, is ISA-L's fast level too); ``keep_open`` only matters to nibabel's
    ``indexed_gzip`` reader and is ignored.
    """
    from isal import igzip

    level = min(max(int(compresslevel), 0), igzip._COMPRESS_LEVEL_BEST)
    raw = open(filename, mode if "b" in mode else mode + "b")  # noqa: SIM115 -- closed with the gzip file below
    try:
        gz = igzip.IGzipFile("", mode, compresslevel=level, fileobj=raw, mtime=mtime)
    except BaseException:
        raw.close()
        raise
    gz.myfileobj = raw  # GzipFile closes the file it opened itself: hand ours over the same way
    return gz


def install() -> bool:
    """Make nibabel read and write ``.gz`` with ISA-L; True if it now does (idempotent)."""
    try:
        import isal.igzip  # noqa: F401
    except ImportError:
        log.info("isal is not installed: .nii.gz files are read and written with zlib (slower)")
        return False
    ImageOpener.compress_ext_map[GZ] = (isal_gzip_open, _KEYWORDS)
    return True


def active() -> bool:
    """Whether nibabel's ``.gz`` opener is this module's ISA-L one."""
    entry: Any = ImageOpener.compress_ext_map.get(GZ)
    return bool(entry) and entry[0] is isal_gzip_open
