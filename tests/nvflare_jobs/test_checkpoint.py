"""Choosing which global model becomes the bundle checkpoint."""

from __future__ import annotations

import math

import pytest

from nvflare_jobs.checkpoint import BundleCheckpointWriter, cross_site_score


def test_cross_site_score_is_case_weighted_and_skips_missing_values() -> None:
    results = {
        "site-1": {"val_mean_dice": 0.8, "val_cases": 3.0},
        "site-2": {"val_mean_dice": 0.4, "val_cases": 1.0},
        "site-3": {"val_mean_dice": float("nan"), "val_cases": 2.0},
        "site-4": {"val_cases": 5.0},
    }
    assert cross_site_score(results) == pytest.approx((0.8 * 3 + 0.4) / 4)
    assert cross_site_score({"a": {"val_mean_dice": 0.5}}) == 0.5  # no case count: weight 1
    assert math.isnan(cross_site_score({}))


@pytest.mark.parametrize("name", ["", "../x.pt", "sub/x.pt", "model.pth"])
def test_checkpoint_file_name_must_be_a_plain_pt_name(name: str) -> None:
    with pytest.raises(ValueError):
        BundleCheckpointWriter(file_name=name)
