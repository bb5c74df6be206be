"""Every bad input on every route that takes an id or a file: a clear 4xx, the server stays up, and the datastore
(files and entries) is exactly as before. Stock MONAI Label 0.8.5 answered each of these with 200 or 500."""

from __future__ import annotations

import gzip
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import requests

from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import MAX_UPLOAD_MB, MODEL, snapshot
from tests.conftest import sphere_case

pytestmark = pytest.mark.integration

TARGET = "case02"  # an unlabelled 32³ image at 2 mm (sphere_case default grid)
GRID = (32, 32, 32)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _nifti(array: np.ndarray, affine: np.ndarray = AFFINE, dtype=None) -> bytes:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=dtype) if dtype else np.asarray(array), affine)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def payloads(tmp_path_factory) -> dict[str, bytes]:
    image, _, affine = sphere_case(shape=GRID, seed=11)
    good_image = write_nifti(image, affine, tmp_path_factory.mktemp("payload") / "ok.nii.gz").read_bytes()
    label = np.zeros(GRID, np.uint8)
    label[8:20, 8:20, 8:20] = 3
    good_label = _nifti(label, dtype=np.uint8)
    shifted = AFFINE.copy()
    shifted[0, 3] += 5.0
    out_of_range = label.copy()
    out_of_range[0, 0, 0] = 9
    negative = label.astype(np.int16)
    negative[1, 1, 1] = -1
    fractional = label.astype(np.float32)
    fractional[2, 2, 2] = 0.5
    return {
        "image_ok": good_image,
        "label_ok": good_label,
        "corrupt": np.random.default_rng(0).bytes(4000),
        "truncated": good_label[: len(good_label) // 2],
        "text": b"these are my notes, not an image\n",
        "empty": b"",
        "huge": b"\0" * ((MAX_UPLOAD_MB + 1) << 20),
        "2d": _nifti(np.zeros((32, 32, 1), np.float32)),
        "4d": _nifti(np.zeros((32, 32, 32, 2), np.float32)),
        "wrong_shape": _nifti(label[:-3], dtype=np.uint8),
        "wrong_affine": _nifti(label, shifted, dtype=np.uint8),
        "values_9": _nifti(out_of_range, dtype=np.uint8),
        "negative": _nifti(negative, dtype=np.int16),
        "fractional": _nifti(fractional, dtype=np.float32),
        "zip_traversal": _zip({"../evil.dcm": b"\0" * 128 + b"DICM"}),
        "zip_absolute": _zip({"/tmp/evil.dcm": b"\0" * 128 + b"DICM"}),
        "zip_not_dicom": _zip({"notes.txt": b"hello"}),
        "zip_corrupt": b"PK\x03\x04" + b"\x00garbage" * 10,
    }


@dataclass(frozen=True)
class Bad:
    """One bad request and the status it must get."""

    id: str
    method: str
    path: str
    status: int
    params: dict[str, str] = field(default_factory=dict)
    part: str | None = None  # multipart field of the upload
    payload: str | None = None
    filename: str = "upload.nii.gz"
    data: dict[str, str] = field(default_factory=dict)
    body: Any = None  # raw body (bytes/str) or JSON-able object
    headers: dict[str, str] = field(default_factory=dict)


def _label(id_: str, payload: str | None, status: int, *, image: str = TARGET, filename: str = "fix.nii.gz", **kw):
    params = {"image": image, **kw.pop("params", {})}
    return Bad(f"label-{id_}", "PUT", "/datastore/label", status, params, "label", payload, filename, **kw)


def _upload(id_: str, payload: str | None, status: int, *, image: str = "new_case", filename: str = "scan.nii.gz"):
    return Bad(f"upload-{id_}", "PUT", "/datastore/image", status, {"image": image}, "file", payload, filename)


def _infer(id_: str, status: int, *, image: str | None = None, payload: str | None = None, **kw):
    params = {"image": image} if image is not None else {}
    params.update(kw.pop("params", {}))
    part = "file" if payload else None
    return Bad(f"infer-{id_}", "POST", kw.pop("path", f"/infer/{MODEL}"), status, params, part, payload, **kw)


CASES = [
    # saving a correction
    _label("corrupt", "corrupt", 422),
    _label("truncated", "truncated", 422),
    _label("non-image", "text", 415, filename="notes.txt"),
    _label("non-image-named-nifti", "text", 422),
    _label("empty", "empty", 400),
    _label("too-large", "huge", 413),
    _label("2d", "2d", 422),
    _label("4d", "4d", 422),
    _label("wrong-shape", "wrong_shape", 422),
    _label("wrong-affine", "wrong_affine", 422),
    _label("value-9", "values_9", 422),
    _label("negative-value", "negative", 422),
    _label("fractional-value", "fractional", 422),
    _label("unknown-image", "label_ok", 404, image="no_such_case"),
    _label("id-separator", "label_ok", 400, image="case02/../case00"),
    _label("id-dotdot", "label_ok", 400, image="../../escape"),
    _label("id-absolute", "label_ok", 400, image="/etc/passwd"),
    _label("id-backslash", "label_ok", 400, image="..\\..\\escape"),
    _label("tag-traversal", "label_ok", 400, params={"tag": "../../escape"}),
    _label("missing-file", None, 422),
    _label("bad-params-json", "label_ok", 400, data={"params": "{not json"}),
    # uploading an image
    _upload("corrupt", "corrupt", 422),
    _upload("truncated", "truncated", 422),
    _upload("non-image", "text", 415, filename="notes.txt"),
    _upload("empty", "empty", 400),
    _upload("too-large", "huge", 413),
    _upload("2d", "2d", 422),
    _upload("4d", "4d", 422),
    _upload("id-dotdot", "image_ok", 400, image="../../escape"),
    _upload("id-absolute", "image_ok", 400, image="/tmp/escape"),
    _upload("id-separator", "image_ok", 400, image="sub/escape"),
    _upload("replaces-labelled-image", "image_ok", 409, image="case00"),
    _upload("zip-traversal", "zip_traversal", 400, filename="series.zip"),
    _upload("zip-absolute", "zip_absolute", 400, filename="series.zip"),
    _upload("zip-not-dicom", "zip_not_dicom", 422, filename="series.zip"),
    _upload("zip-corrupt", "zip_corrupt", 422, filename="series.zip"),
    Bad("upload-legacy-route-dotdot", "PUT", "/datastore/", 400, {"image": "../../escape"}, "file", "image_ok"),
    # inference
    _infer("unknown-image", 404, image="no_such_case"),
    _infer("id-dotdot", 400, image="../../etc/passwd"),
    _infer("absolute-path", 400, image="/etc/passwd"),
    _infer("relative-path", 400, image="labels/final/case00.nii.gz"),
    _infer("path-in-params", 400, image=TARGET, data={"params": json.dumps({"image": "/etc/passwd"})}),
    _infer("upload-corrupt", 422, payload="corrupt"),
    _infer("upload-truncated", 422, payload="truncated"),
    _infer("upload-non-image", 415, payload="text", filename="notes.txt"),
    _infer("upload-empty", 400, payload="empty"),
    _infer("upload-too-large", 413, payload="huge"),
    _infer("upload-2d", 422, payload="2d"),
    _infer("upload-4d", 422, payload="4d"),
    _infer("upload-zip-traversal", 400, payload="zip_traversal", filename="series.zip"),
    _infer("image-and-file", 400, image=TARGET, payload="image_ok"),
    _infer("no-image", 400),
    _infer("unknown-model", 404, image=TARGET, path="/infer/no_such_model"),
    _infer("bad-overlap", 400, image=TARGET, data={"params": json.dumps({"sw_overlap": 5})}),
    _infer("bad-roi", 400, image=TARGET, data={"params": json.dumps({"roi_size": [30, 30, 30]})}),
    _infer("bad-extension", 400, image=TARGET, data={"params": json.dumps({"result_extension": ".exe"})}),
    _infer("bad-params-json", 400, image=TARGET, data={"params": "[1, 2"}),
    _infer("session", 400, image=TARGET, params={"session_id": "abc"}),
    _infer("bad-output", 400, image=TARGET, params={"output": "dicom_seg"}),
    # next sample
    Bad("next-unknown-strategy", "POST", "/activelearning/no_such_strategy", 404, body={}),
    Bad(
        "next-invalid-json",
        "POST",
        "/activelearning/random",
        422,
        body=b"{oops",
        headers={"content-type": "application/json"},
    ),
    Bad("next-not-an-object", "POST", "/activelearning/random", 422, body=[1, 2]),
    Bad("next-bad-candidates", "POST", "/activelearning/entropy", 400, body={"max_candidates": "all"}),
    Bad("next-too-large", "POST", "/activelearning/random", 413, body=b"{" + b" " * ((MAX_UPLOAD_MB + 1) << 20)),
    # other routes that take ids
    Bad("download-dotdot", "GET", "/datastore/image", 400, {"image": "../../etc/passwd"}),
    Bad("download-unknown", "GET", "/datastore/image", 404, {"image": "no_such_case"}),
    Bad("label-download-dotdot", "GET", "/datastore/label", 400, {"label": "../x", "tag": "final"}),
    Bad("delete-dotdot", "DELETE", "/datastore/image", 400, {"id": "../../studies"}),
    Bad("delete-unknown", "DELETE", "/datastore/image", 404, {"id": "no_such_case"}),
    Bad("delete-label-bad-tag", "DELETE", "/datastore/label", 400, {"id": TARGET, "tag": "../.."}),
    Bad("train-bad-param", "POST", f"/train/{MODEL}", 400, body={"max_epochs": 0}),
    Bad("train-unknown-param", "POST", f"/train/{MODEL}", 400, body={"rm": "-rf"}),
    Bad("train-unknown-model", "POST", "/train/no_such_model", 404, body={}),
    # routes this server does not offer (they read or write outside the studies folder)
    Bad("session-upload", "PUT", "/session/", 404, part="image", payload="image_ok"),
    Bad("model-upload", "PUT", f"/model/{MODEL}", 404, part="file", payload="image_ok", filename="model.pt"),
    Bad("dicomweb-proxy", "GET", "/dicom/qido/studies", 404),
    Bad("batch-infer", "POST", f"/batch/infer/{MODEL}", 404, body={}),
    Bad("foreign-host", "GET", "/info/", 403, headers={"host": "evil.example:80"}),
]


def send(server, case: Bad, payloads: dict[str, bytes]) -> requests.Response:
    kwargs: dict[str, Any] = {"params": case.params, "headers": case.headers, "timeout": 60}
    if case.part and case.payload:
        kwargs["files"] = {case.part: (case.filename, payloads[case.payload])}
        kwargs["data"] = case.data or {"params": "{}"}
    elif case.data:
        kwargs["data"] = case.data
    elif case.part is None and case.body is not None:
        if isinstance(case.body, bytes):
            kwargs["data"] = case.body
        else:
            kwargs["json"] = case.body
    elif case.id == "label-missing-file":
        kwargs["data"] = {"params": "{}"}
    return requests.request(case.method, server.url + case.path, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(server, payloads, case):
    before = snapshot(server.studies)
    response = send(server, case, payloads)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    assert body["detail"], body
    assert snapshot(server.studies) == before
    assert server.get("/info/").status_code == 200


def test_nothing_was_written_outside_the_studies_folder(server):
    escaped = [p for p in server.root.rglob("*") if "escape" in p.name or "evil" in p.name or p.name == "passwd"]
    assert escaped == []


def _chunks(head: bytes, total: int, block: int = 1 << 20):
    yield head
    sent = 0
    while sent < total:
        yield b"\0" * block
        sent += block


@pytest.mark.parametrize(
    ("method", "path", "params", "content_type"),
    [
        ("PUT", "/datastore/label", {"image": TARGET}, "multipart/form-data; boundary=xyz"),
        ("PUT", "/datastore/image/info", {"image": TARGET}, "application/x-www-form-urlencoded"),
    ],
    ids=["upload-route", "small-body-route"],
)
def test_streamed_body_without_length_is_cut_at_the_limit(server, method, path, params, content_type):
    head = b'--xyz\r\nContent-Disposition: form-data; name="label"; filename="a.nii.gz"\r\n\r\n'
    before = snapshot(server.studies)
    response = requests.request(
        method,
        server.url + path,
        params=params,
        data=_chunks(head, (MAX_UPLOAD_MB + 1) << 20),  # a generator: chunked transfer, no Content-Length
        headers={"content-type": content_type},
        timeout=120,
    )
    assert response.status_code == 413, response.text[:300]
    assert snapshot(server.studies) == before
    assert server.get("/info/").status_code == 200


def test_cors_allows_only_the_servers_own_origin(server):
    def preflight(origin: str) -> requests.Response:
        headers = {"Origin": origin, "Access-Control-Request-Method": "PUT"}
        return requests.options(f"{server.url}/datastore/label", headers=headers, timeout=30)

    foreign = preflight("http://evil.example")
    assert foreign.status_code == 400 and "access-control-allow-origin" not in foreign.headers
    own = preflight(server.url)
    assert own.status_code == 200 and own.headers["access-control-allow-origin"] == server.url
