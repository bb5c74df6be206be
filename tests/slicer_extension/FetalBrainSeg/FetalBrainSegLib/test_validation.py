"""A correction is checked against the image grid and the server's labels before it is sent, in clinical words."""

from __future__ import annotations

import numpy as np
import pytest
from FetalBrainSegLib.errors import CorrectionInvalidError
from FetalBrainSegLib.validation import correction_problems, validate_correction
from FetalBrainSegLib.volumeio import Geometry, Volume


@pytest.fixture
def grid(phantom) -> Geometry:
    return Geometry(phantom.label.shape, phantom.affine)


def test_a_good_correction_passes_and_is_cast_to_the_label_type(phantom, grid, labelset):
    as_float = Volume(phantom.label.astype(np.float32), phantom.affine + 1e-6)  # float32 header noise is fine
    out = validate_correction(as_float, grid, labelset)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, phantom.label)


def _problems(array, affine, grid, labelset):
    return correction_problems(Volume(array, affine), grid, labelset)


def test_each_problem_is_named(phantom, grid, labelset):
    label, aff = phantom.label, phantom.affine
    assert any(
        "(31, 32, 32) voxels but the image has (32, 32, 32)" in p for p in _problems(label[1:], aff, grid, labelset)
    )
    shifted = aff.copy()
    shifted[0, 3] += 2.0
    assert _problems(label, shifted, grid, labelset) == ["The segmentation is shifted by 2 mm from the image."]
    assert any("voxel size" in p for p in _problems(label, aff @ np.diag([2, 1, 1, 1]), grid, labelset))
    flipped = aff @ np.diag([-1, 1, 1, 1])
    flipped[:3, 3] = aff[:3, 3]
    assert any("oriented differently" in p for p in _problems(label, flipped, grid, labelset))
    bad = label.copy()
    bad[0, 0, 0] = labelset.max_value + 3
    assert any(
        f"values [{labelset.max_value + 3}] that are not tissues" in p for p in _problems(bad, aff, grid, labelset)
    )
    assert any("non-integer" in p for p in _problems(label + 0.5, aff, grid, labelset))
    assert _problems(np.zeros_like(label), aff, grid, labelset) == [
        "The correction is empty: every voxel is background."
    ]
    assert "3D volume" in _problems(label[..., None], aff, grid, labelset)[0]
    assert "no valid position" in " ".join(_problems(label, np.full((4, 4), np.nan), grid, labelset))


def test_validate_lists_every_problem_in_one_message(phantom, grid, labelset):
    bad = phantom.label[1:].copy()
    bad[0, 0, 0] = 200
    with pytest.raises(CorrectionInvalidError) as err:
        validate_correction(Volume(bad, phantom.affine), grid, labelset)
    assert len(err.value.problems) == 2
    assert str(err.value).startswith("The correction was not sent because it does not fit the case:\n- ")
