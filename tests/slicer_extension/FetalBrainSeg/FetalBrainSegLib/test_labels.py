"""Tissue names/values/colours come from /info/ in each shape MONAI Label apps use; arrays <-> named masks."""

from __future__ import annotations

import numpy as np
import pytest
from FetalBrainSegLib.errors import CorrectionInvalidError, ProtocolError
from FetalBrainSegLib.labels import LabelSet

from fetalseg.labels import foreground_labels


def test_labels_names_and_colours_are_the_servers(labelset):
    expected = foreground_labels()
    assert labelset.values == tuple(lab.value for lab in expected)
    assert labelset.names == tuple(lab.name for lab in expected)
    assert [lab.display_name for lab in labelset.labels] == [lab.display_name for lab in expected]
    assert [lab.color for lab in labelset.labels] == [lab.color for lab in expected]
    assert all(lab.color_from_server for lab in labelset.labels)


def test_other_info_shapes():
    as_list = LabelSet.from_info(
        {
            "labels": [
                {"name": "b", "value": 5, "color": "#ff8000", "display_name": "Bee"},
                {"id": "a", "value": 2, "color": [0.5, 0.25, 0.125]},
            ]
        }
    )
    assert as_list.values == (2, 5)
    assert as_list.by_value(5).color == (255, 128, 0)
    assert as_list.by_value(5).display_name == "Bee"
    assert as_list.by_value(2).color == (128, 64, 32)  # 0..1 floats scaled
    assert as_list.by_value(2).display_name == "A"

    names = LabelSet.from_info({"labels": ["background", "x_y", "z"], "label_colors": {"1": [1, 2, 3], "z": [4, 5, 6]}})
    assert [(lab.value, lab.name, lab.display_name, lab.color) for lab in names.labels] == [
        (1, "x_y", "X y", (1, 2, 3)),
        (2, "z", "Z", (4, 5, 6)),
    ]
    assert LabelSet.from_info({"labels": ["p", "q"]}).values == (1, 2)  # no background first: values start at 1


def test_model_labels_win_over_app_labels_and_missing_colours_are_flagged(caplog):
    info = {"labels": {"wrong": 9}, "models": {"m": {"labels": {"background": 0, "t": 3}}}}
    ls = LabelSet.from_info(info, "m")
    assert ls.names == ("t",)
    assert not ls.labels[0].color_from_server
    assert "no colour" in caplog.text


@pytest.mark.parametrize(
    ("info", "message"),
    [
        ({"labels": {}}, "lists no labels"),
        ({"labels": {"a": 1, "b": 1}}, "duplicate"),
        ({"labels": {"a": "one"}}, "non-integer"),
        ({"labels": {"a": 1.5}}, "non-integer"),
        ({"labels": {"background": 0}}, "no tissue labels"),
        ({"labels": [{"value": 1}]}, "lacks a name"),
        ({"labels": {"a": 1}, "label_colors": {"a": [300, 0, 0]}}, "unreadable colour"),
        ({"labels": {"a": 1}, "label_colors": {"a": "red"}}, "unreadable colour"),
        ({"labels": "a,b"}, "Cannot read"),
    ],
)
def test_unusable_info_is_refused_with_a_reason(info, message):
    with pytest.raises(ProtocolError, match=message):
        LabelSet.from_info(info)


def test_unknown_model_is_named():
    with pytest.raises(ProtocolError, match=r"no model named 'x'.*has: m"):
        LabelSet.from_info({"models": {"m": {"labels": {"a": 1}}}}, "x")


def test_split_and_compose_round_trip(labelset, phantom):
    masks = labelset.split(phantom.label)
    assert set(masks) == set(labelset.names)
    np.testing.assert_array_equal(labelset.compose(masks), phantom.label)
    by_display = {labelset.find(name).display_name: m for name, m in masks.items()}  # Slicer segment names
    np.testing.assert_array_equal(labelset.compose(by_display), phantom.label)


def test_compose_refuses_overlaps_unknown_names_and_duplicates(labelset):
    a = np.zeros((4, 4, 4), bool)
    a[:2] = True
    b = np.zeros_like(a)
    b[1:3] = True
    first, second = labelset.labels[0], labelset.labels[1]
    with pytest.raises(CorrectionInvalidError) as err:
        labelset.compose({first.name: a, second.display_name: b, "Tumour": a})
    text = str(err.value)
    assert f"'{second.display_name}' overlaps {first.display_name} in 16 voxels" in text
    assert "Segment 'Tumour' is not one of the server's tissues" in text
    with pytest.raises(CorrectionInvalidError, match="Two segments are both"):
        labelset.compose({first.name: a, first.display_name: np.zeros_like(a)})
