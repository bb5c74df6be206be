"""fetalseg.data.gzip_codec: nibabel reads and writes .nii.gz through ISA-L, and the files are ordinary gzip."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.openers import ImageOpener

from fetalseg.data import gzip_codec
from fetalseg.data.io import read_volume, write_nifti


def test_importing_the_io_module_installs_the_isal_opener() -> None:
    assert gzip_codec.active()
    assert gzip_codec.install() is True  # idempotent
    assert ImageOpener.compress_ext_map[".gz"][0] is gzip_codec.isal_gzip_open


def test_a_written_nifti_is_plain_gzip_and_reads_back_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    array = rng.normal(size=(17, 12, 9)).astype(np.float32)
    affine = np.diag([0.5, 0.6, 0.7, 1.0])
    path = write_nifti(array, affine, tmp_path / "img.nii.gz")
    raw = gzip.decompress(path.read_bytes())  # the stdlib (zlib) reads what ISA-L wrote
    assert np.array_equal(nib.Nifti1Image.from_bytes(raw).get_fdata(dtype=np.float32), array)
    volume = read_volume(path)
    assert np.array_equal(volume.array, array) and np.allclose(volume.affine, affine)


def test_zlib_written_files_are_read_through_isal(tmp_path: Path) -> None:
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(array, np.eye(4))
    path = tmp_path / "zlib.nii.gz"
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=9))
    assert np.array_equal(np.asanyarray(nib.load(path).dataobj), array)


def test_the_same_image_gives_the_same_bytes(tmp_path: Path) -> None:
    """mtime 0 as in nibabel: files written twice hash the same (the audit trail compares hashes)."""
    label = (np.arange(10 * 10 * 10) % 8).astype(np.uint8).reshape(10, 10, 10)
    a = write_nifti(label, np.eye(4), tmp_path / "a.nii.gz").read_bytes()
    b = write_nifti(label, np.eye(4), tmp_path / "b.nii.gz").read_bytes()
    assert a == b


@pytest.mark.parametrize("level", [0, 1, 3, 9])
def test_any_nibabel_compression_level_is_accepted(tmp_path: Path, level: int) -> None:
    path = tmp_path / f"l{level}.gz"
    with gzip_codec.isal_gzip_open(str(path), "wb", compresslevel=level) as f:
        f.write(b"fetal" * 1000)
    assert gzip.decompress(path.read_bytes()) == b"fetal" * 1000
