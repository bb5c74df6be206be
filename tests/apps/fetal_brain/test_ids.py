"""Ids become file names inside the studies folder, so nothing path-like may pass."""

import pytest

from apps.fetal_brain.lib.errors import BadRequestError
from apps.fetal_brain.lib.ids import MAX_ID_LENGTH, check_id, check_tag, id_problem


@pytest.mark.parametrize("good", ["case00", "sub-001_rec-mial_T2w", "a.b", "A+1", "7"])
def test_plain_ids_pass(good):
    assert id_problem(good) is None
    assert check_id(good) == good


BAD_IDS = ["", "../x", "..", "a/b", "/etc/passwd", "C:\\x", "a\\b", ".hidden", "x..y", "a b", "a\nb", "é", None, 3]


@pytest.mark.parametrize("bad", [*BAD_IDS, "x" * 129])
def test_path_like_or_odd_ids_are_refused(bad):
    assert id_problem(bad)
    with pytest.raises(BadRequestError) as info:
        check_id(bad)
    assert info.value.status == 400


def test_length_limit_is_inclusive():
    assert id_problem("x" * MAX_ID_LENGTH) is None


@pytest.mark.parametrize("good", ["final", "original", "v2_reviewed", "a-b"])
def test_tags(good):
    assert check_tag(good) == good


@pytest.mark.parametrize("bad", ["", "../final", "final/x", ".x", "x" * 65, None])
def test_bad_tags(bad):
    with pytest.raises(BadRequestError):
        check_tag(bad)
