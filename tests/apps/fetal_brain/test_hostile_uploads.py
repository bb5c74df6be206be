"""Hostile uploads cost nothing: what a file's header declares is checked before a voxel is read, decompression
never goes past what the header declares, and no request leaves a temporary file behind.

A 2.1 MB label that inflated to 2.2 GB once held a server worker for over a minute. The unit tests below hand
:func:`check_upload` tiny crafted files; the server tests send a real compression bomb (built by streaming zeros
through gzip, never held in memory) to a server of their own whose ``TMPDIR`` they can list. No test times
anything: the server tests show from the answer that the voxels were never read.
"""

from __future__ import annotations

import gzip
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk
import slicerio

from apps.fetal_brain.launcher import LocalServer, start
from apps.fetal_brain.lib.errors import UnprocessableError
from apps.fetal_brain.lib.uploads import INFLATE_MARGIN, MAX_VOXELS, check_upload
from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import MAX_UPLOAD_MB, MODEL, snapshot, write_dicom_series
from tests.conftest import sphere_case

GRID = (32, 32, 32)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
FROM_HEADER = "refused from its header, no voxel data read"


def nifti_header(shape: tuple[int, ...], dtype: type = np.uint8) -> bytes:
    """A valid single-file NIfTI-1 header (and empty extension flag) declaring ``shape`` and ``dtype``."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(AFFINE, code=1)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4


def write_bomb(path: Path, header: bytes, inflated: int, *, block: int = 1 << 20) -> Path:
    """``header`` then ``inflated`` zero bytes, gzipped as a stream (zeros compress ~1000:1; memory stays small)."""
    zeros = bytes(block)
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(header)
        while inflated > 0:
            out.write(zeros[: min(block, inflated)])
            inflated -= block
    return path


def refused(path: Path, match: str, **kw) -> str:
    with pytest.raises(UnprocessableError, match=match) as info:
        check_upload(path, **kw)
    return str(info.value)


# -- the validator, on tiny crafted files -------------------------------------------------------------------------
def test_label_declaring_a_huge_volume_is_refused_from_its_header(tmp_path):
    """2000³ uint8 = 8 GB declared in a file of a few hundred bytes: only the header is ever read."""
    bomb = tmp_path / "fix.nii.gz"
    bomb.write_bytes(gzip.compress(nifti_header((2000, 2000, 2000))))  # no voxel data at all
    text = refused(
        bomb, r"\(2000, 2000, 2000\), not equal to its image's shape \(32, 32, 32\)", role="label", grid=GRID
    )
    assert text.startswith("label fix.nii.gz: ") and FROM_HEADER in text
    text = refused(bomb, "8000000000 voxels", role="image")  # as an image: over the size limits
    assert f"at most {MAX_VOXELS} voxels" in text and FROM_HEADER in text


@pytest.mark.parametrize(
    ("shape", "dtype", "match"),
    [
        ((32, 32, 32, 2, 2), np.uint8, r"5D array of shape \(32, 32, 32, 2, 2\); expected a 3D volume"),
        ((32, 32, 32, 3), np.uint8, r"3 values per voxel; expected a 3D volume"),
        ((32, 32), np.uint8, r"2D array of shape \(32, 32\); expected a 3D volume"),
        ((32, 0, 32), np.uint8, "empty axis"),
        ((4000, 8, 8), np.uint8, "at most 2048 voxels per axis"),
        ((32, 32, 32), np.complex64, "voxel type complex64; expected integers or floats"),
    ],
    ids=["5d", "4d", "2d", "empty-axis", "long-axis", "complex"],
)
def test_what_the_header_declares_is_checked(tmp_path, shape, dtype, match):
    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(nifti_header(shape, dtype)))
    assert FROM_HEADER in refused(path, match, role="image")


def test_header_that_lies_about_its_size_is_not_decompressed_past_it(tmp_path):
    """8³ declared, 20 MB of zeros behind it: decoding stops a margin past the declared size."""
    expected = 352 + 8**3
    bomb = write_bomb(tmp_path / "small.nii.gz", nifti_header((8, 8, 8)), 20 << 20)
    text = refused(bomb, r"holds more data than its header declares \(864 bytes\)", role="image")
    read = int(text.split("after reading ")[1].split(" bytes")[0])
    assert expected < read <= expected + INFLATE_MARGIN + 1


def test_truncated_streams_are_refused(tmp_path):
    label = np.zeros(GRID, np.uint8)
    good = write_nifti(label, AFFINE, tmp_path / "good.nii.gz", dtype=np.uint8)
    check_upload(good, role="label", grid=GRID)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[:-20])  # the header is intact, the stream ends early
    refused(cut, "truncated", role="label", grid=GRID)
    raw = tmp_path / "raw.nii"
    raw.write_bytes(nifti_header(GRID) + bytes(1000))  # uncompressed, 32³ declared, 1000 bytes there
    refused(raw, r"truncated: 1352 bytes of data where its header declares 33120", role="image")


def test_files_that_are_not_nifti_are_refused(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_bytes(gzip.compress(b"these are my notes, not an image\n" * 20))
    refused(path, "has no NIfTI header", role="image")
    pair = tmp_path / "pair.nii"
    header = bytearray(nifti_header(GRID))
    header[344:348] = b"ni1\0"  # a .hdr/.img pair's header
    pair.write_bytes(bytes(header) + bytes(32**3))
    refused(pair, "not a single-file NIfTI", role="image")


def _nrrd(path: Path, fields: str, data: bytes = b"") -> Path:
    path.write_bytes(b"NRRD0004\n" + fields.encode() + b"\n" + data)
    return path


def test_nrrd_headers_are_checked_before_reading(tmp_path):
    huge = _nrrd(tmp_path / "fix.nrrd", "type: uint8\ndimension: 3\nsizes: 2000 2000 2000\nencoding: gzip\n")
    refused(huge, r"\(2000, 2000, 2000\), not equal to its image's shape", role="label", grid=GRID)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(bytes(24))
    detached = _nrrd(
        tmp_path / "d.nrrd", f"type: uint8\ndimension: 3\nsizes: 2 3 4\nencoding: raw\ndata file: {secret}\n"
    )
    refused(detached, "names a separate data file", role="image")  # a reader would open that server path
    lying = tmp_path / "lie.nrrd"
    _nrrd(lying, "type: uint8\ndimension: 3\nsizes: 8 8 8\nencoding: gzip\n")
    write_bomb(tmp_path / "stream.gz", b"", 5 << 20)
    lying.write_bytes(lying.read_bytes() + (tmp_path / "stream.gz").read_bytes())
    refused(lying, r"holds more data than its header declares \(512 bytes\)", role="image")


def test_valid_uploads_pass(tmp_path):
    image, label, affine = sphere_case(shape=GRID, seed=1)
    check_upload(write_nifti(image, affine, tmp_path / "a.nii.gz"), role="image")
    check_upload(write_nifti(label, affine, tmp_path / "l.nii.gz", dtype=np.uint8), role="label", grid=(*GRID, 1))
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "raw.nii")
    check_upload(tmp_path / "raw.nii", role="image")
    sitk.WriteImage(sitk.GetImageFromArray(image.astype(np.float32)), str(tmp_path / "a.nrrd"), True)
    check_upload(tmp_path / "a.nrrd", role="image")
    check_upload(write_dicom_series(image * 10, affine, tmp_path / "series"), role="image")


def test_slicer_segmentations_may_be_cropped_but_not_larger(tmp_path):
    def seg(shape: tuple[int, int, int]) -> Path:
        mask = np.zeros(shape, bool)
        mask[1:3, 1:3, 1:3] = True
        segmentation = slicerio.create_segmentation(shape, np.eye(4))
        slicerio.add_segment(segmentation, mask, {"id": "wm", "name": "White matter"})
        path = tmp_path / f"{'x'.join(map(str, shape))}.seg.nrrd"
        slicerio.write_segmentation(str(path), segmentation)
        return path

    check_upload(seg((10, 20, 8)), role="label", grid=GRID)
    refused(seg((10, 40, 8)), r"not inside its image's shape \(32, 32, 32\)", role="label", grid=GRID)


def test_dicom_series_declaring_huge_slices_is_refused(tmp_path):
    image, _, affine = sphere_case(shape=(8, 8, 6))
    folder = write_dicom_series(image, affine, tmp_path / "series")
    first = sorted(folder.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.Rows = ds.Columns = 60000  # the pixel data stays small: only the header lies
    ds.save_as(first)
    refused(folder, "at most 2048 voxels per axis", role="image", name="series.zip")


# -- the real server: a bomb, and nothing left in its TMPDIR -------------------------------------------------------
@dataclass
class OwnServer:
    """A server with its own ``TMPDIR``, so a test can list what requests leave there."""

    url: str
    studies: Path
    tmpdir: Path
    running: LocalServer

    def temp_files(self) -> set[str]:
        return {str(p.relative_to(self.tmpdir)) for p in self.tmpdir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def own_server(tmp_path_factory) -> Iterator[OwnServer]:
    root = tmp_path_factory.mktemp("hostile_server")
    studies, tmpdir = root / "studies", root / "tmp"
    tmpdir.mkdir()
    image, _, affine = sphere_case(shape=GRID, seed=11)
    write_nifti(image, affine, studies / "target.nii.gz")
    conf = [
        ("variant", "tiny"),
        ("model_path", str(root / "model" / "model.pt")),
        ("max_upload_mb", str(MAX_UPLOAD_MB)),
    ]
    running = start(studies, workdir=root, conf=conf, env={"TMPDIR": str(tmpdir)})
    yield OwnServer(running.url, studies, tmpdir, running)
    running.stop()


@pytest.fixture(scope="module")
def label_bomb(tmp_path_factory) -> bytes:
    """A label for the 32³ image whose header declares 600³ uint8, with all 216 MB there: ~0.2 MB gzipped."""
    path = write_bomb(tmp_path_factory.mktemp("bomb") / "fix.nii.gz", nifti_header((600, 600, 600)), 600**3)
    assert path.stat().st_size < 1 << 20
    return path.read_bytes()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_label_bomb_is_refused_from_its_header_and_leaves_nothing(own_server, label_bomb):
    before, temp = snapshot(own_server.studies), own_server.temp_files()
    response = requests.put(
        f"{own_server.url}/datastore/label",
        params={"image": "target"},
        files={"label": ("fix.nii.gz", label_bomb)},
        data={"params": "{}"},
        timeout=120,
    )
    assert response.status_code == 422, response.text[:500]
    detail = response.json()["detail"]
    assert "declares shape (600, 600, 600), not equal to its image's shape (32, 32, 32)" in detail
    assert FROM_HEADER in detail  # rejected before any voxel was decompressed
    assert snapshot(own_server.studies) == before
    assert own_server.temp_files() - temp == set()


@pytest.mark.integration
@pytest.mark.timeout(300)
@pytest.mark.parametrize("route", ["/datastore/image", f"/infer/{MODEL}"])
def test_image_bomb_is_refused_and_its_upload_removed(own_server, route):
    """The /infer upload on an error path used to stay in TMPDIR: its removal was a background task, and
    background tasks never run when the route raises."""
    bomb = gzip.compress(nifti_header((2000, 2000, 2000), np.float32))
    method = "PUT" if route.startswith("/datastore") else "POST"
    params = {"image": "bomb"} if method == "PUT" else {}
    before, temp = snapshot(own_server.studies), own_server.temp_files()
    response = requests.request(
        method, own_server.url + route, params=params, files={"file": ("bomb.nii.gz", bomb)}, timeout=120
    )
    assert response.status_code == 422, response.text[:500]
    assert FROM_HEADER in response.json()["detail"]
    assert snapshot(own_server.studies) == before
    assert own_server.temp_files() - temp == set()


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_no_upload_is_left_behind_on_any_path(own_server):
    """A label refused after reading (value 9), a saved label, an inference refused after the upload was taken
    (a 2D image), a successful one, and a client that hangs up mid-upload: no new file in the server's TMPDIR."""
    temp = own_server.temp_files()
    label = np.zeros(GRID, np.uint8)
    label[4:9, 4:9, 4:9] = 3
    good = gzip.compress(nib.Nifti1Image(label, AFFINE).to_bytes())
    label[0, 0, 0] = 9
    bad = gzip.compress(nib.Nifti1Image(label, AFFINE).to_bytes())
    for body, status in ((bad, 422), (good, 200)):
        answer = requests.put(
            f"{own_server.url}/datastore/label",
            params={"image": "target"},
            files={"label": ("l.nii.gz", body)},
            timeout=120,
        )
        assert answer.status_code == status, answer.text[:500]
    image, _, affine = sphere_case(shape=GRID, seed=2)
    flat = gzip.compress(nib.Nifti1Image(image[:, :, :1], affine).to_bytes())
    scan = gzip.compress(nib.Nifti1Image(image, affine).to_bytes())
    for body, status in ((flat, 422), (scan, 200)):
        answer = requests.post(
            f"{own_server.url}/infer/{MODEL}",
            params={"output": "image"},
            files={"file": ("s.nii.gz", body)},
            timeout=120,
        )
        assert answer.status_code == status, answer.text[:500]
    _hang_up_mid_upload(own_server.url, good)
    deadline = time.monotonic() + 60  # not a timing check: a result file is removed just after it is sent
    while own_server.temp_files() - temp and time.monotonic() < deadline:
        time.sleep(0.2)
    assert own_server.temp_files() - temp == set()
    assert requests.get(f"{own_server.url}/info/", timeout=60).status_code == 200


def _hang_up_mid_upload(url: str, payload: bytes) -> None:
    """Send half of a multipart label upload, then close the connection."""
    address = urlparse(url)
    head = b'--xyz\r\nContent-Disposition: form-data; name="label"; filename="l.nii.gz"\r\n\r\n'
    body = head + payload + b"\r\n--xyz--\r\n"
    request = (
        f"PUT /datastore/label?image=target HTTP/1.1\r\nHost: {address.hostname}:{address.port}\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(request + body[: len(body) // 2])
