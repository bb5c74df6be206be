"""Property-based fuzzing (bounded) of the upload parsers against the real server: image upload and label save.

Inputs are valid NIfTI files with flipped bytes, truncations, garbage, re-compressed mutations and odd file names.
Every answer must be 200 or an intended 4xx with a ``detail`` sentence (never a 5xx), a refused upload must leave
the datastore exactly as it was, and the server must keep answering.
"""

from __future__ import annotations

import gzip
import io
import json

import numpy as np
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetalseg.data.io import write_nifti
from tests.apps.fetal_brain.conftest import snapshot
from tests.conftest import sphere_case

pytestmark = pytest.mark.integration

INTENDED = {200, 400, 404, 413, 415, 422}
SETTINGS = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,  # the same examples every run: a failure is reproducible, the time is bounded
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
SUFFIXES = [".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".zip", ".txt", "", ".nii.gz.exe"]
NAMES = ["x", "../../etc/x", "a b", "ñ", "x" * 200, ".hidden"]


def _nifti(tmp_path_factory, array, dtype=None) -> bytes:
    folder = tmp_path_factory.mktemp("fuzz_src")
    path = write_nifti(array, np.diag([2.0, 2.0, 2.0, 1.0]), folder / "v.nii.gz", **({"dtype": dtype} if dtype else {}))
    return open(path, "rb").read()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    image, label, _ = sphere_case(shape=(32, 32, 32), seed=3)  # case03's grid in write_studies
    return {"image": _nifti(tmp_path_factory, image), "label": _nifti(tmp_path_factory, label, np.uint8)}


@st.composite
def mutated(draw, kind: str):
    """A mutation of the seed file (drawn lazily: the seed bytes are bound in the test)."""
    how = draw(st.sampled_from(["flip", "truncate", "garbage", "raw-flip", "empty-ish", "intact"]))
    n_flips = draw(st.integers(1, 16))
    positions = draw(st.lists(st.integers(0, 10**6), min_size=n_flips, max_size=n_flips))
    cut = draw(st.integers(0, 10**6))
    garbage = draw(st.binary(min_size=1, max_size=512))
    suffix = draw(st.sampled_from(SUFFIXES))
    name = draw(st.sampled_from(NAMES))
    params = draw(st.sampled_from(["{}", "", "[]", "{bad", json.dumps({"x": 1}), "null"]))
    return kind, how, positions, cut, garbage, name + suffix, params


def _apply(seed: bytes, how: str, positions: list[int], cut: int, garbage: bytes) -> bytes:
    data = bytearray(seed)
    if how == "flip":
        for p in positions:
            data[p % len(data)] ^= 0xFF
    elif how == "truncate":
        data = data[: cut % len(data)]
    elif how == "garbage":
        data = bytearray(garbage)
    elif how == "raw-flip":  # valid gzip around a corrupted NIfTI: reaches the header/array parser
        raw = bytearray(gzip.decompress(seed))
        for p in positions:
            raw[p % 352 if p % 2 else p % len(raw)] ^= 0xFF  # half the flips land in the 352-byte header
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
            gz.write(bytes(raw))
        data = bytearray(buf.getvalue())
    elif how == "empty-ish":
        data = bytearray(b"\x00")
    return bytes(data)


def _check(server, response: requests.Response, before: dict) -> None:
    assert response.status_code in INTENDED, response.text[:300]
    if response.status_code != 200:
        assert response.json()["detail"]
        assert snapshot(server.studies) == before
    assert server.get("/info/").status_code == 200


@SETTINGS
@given(case=mutated("label"))
def test_label_save_parser(server, seeds, case):
    _, how, positions, cut, garbage, filename, params = case
    body = _apply(seeds["label"], how, positions, cut, garbage)
    before = snapshot(server.studies)
    response = requests.put(
        f"{server.url}/datastore/label",
        params={"image": "case03", "tag": "fuzz"},
        files={"label": (filename, body)},
        data={"params": params},
        timeout=120,
    )
    _check(server, response, before)


@SETTINGS
@given(case=mutated("image"))
def test_image_upload_parser(server, seeds, case):
    _, how, positions, cut, garbage, filename, params = case
    body = _apply(seeds["image"], how, positions, cut, garbage)
    before = snapshot(server.studies)
    response = requests.put(
        f"{server.url}/datastore/image",
        params={"image": "fuzzimg"},
        files={"file": (filename, body)},
        data={"params": params},
        timeout=120,
    )
    _check(server, response, before)
