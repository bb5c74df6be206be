"""Attack metrics: AUC, advantage, SSIM and PSNR against brute force and an independent implementation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.attacks.metrics import advantage, dp_advantage_bound, psnr, roc_auc, ssim


def brute_force_auc(pos, neg):
    pairs = list(itertools.product(pos, neg))
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs)


def test_auc_extremes_and_ties():
    assert roc_auc([3, 4, 5], [0, 1, 2]) == 1.0
    assert roc_auc([0, 1, 2], [3, 4, 5]) == 0.0
    assert roc_auc([1, 1], [1, 1, 1]) == 0.5
    assert roc_auc([2, 0], [1]) == 0.5


@settings(max_examples=50, deadline=None)
@given(
    pos=st.lists(st.integers(-5, 5), min_size=1, max_size=12),
    neg=st.lists(st.integers(-5, 5), min_size=1, max_size=12),
)
def test_auc_equals_pairwise_probability(pos, neg):
    assert roc_auc(pos, neg) == pytest.approx(brute_force_auc(pos, neg))


@pytest.mark.parametrize("bad", [[], [float("nan")], [math.inf]])
def test_auc_rejects_bad_scores(bad):
    with pytest.raises(ValueError):
        roc_auc(bad, [1.0])


def test_advantage_is_best_tpr_minus_fpr():
    assert advantage([5, 6, 7], [1, 2, 3]) == 1.0
    assert advantage([1, 2], [1, 2]) == 0.0
    assert advantage([3, 1], [2, 0]) == pytest.approx(0.5)


def test_dp_bound_on_advantage():
    assert dp_advantage_bound(0.0, 0.0) == 0.0
    assert dp_advantage_bound(1.0, 0.0) == pytest.approx((math.e - 1) / (math.e + 1))
    assert dp_advantage_bound(8.0, 1e-5) > dp_advantage_bound(2.0, 1e-5)
    assert dp_advantage_bound(50.0, 0.0) == pytest.approx(1.0)


def test_ssim_basic_properties():
    rng = np.random.default_rng(0)
    a = rng.random((16, 16, 16))
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, rng.random(a.shape)) < 0.1
    assert ssim(a, a + 0.05 * rng.standard_normal(a.shape)) > ssim(a, a + 0.3 * rng.standard_normal(a.shape))
    with pytest.raises(ValueError):
        ssim(a, a[:8])
    with pytest.raises(ValueError):
        ssim(np.zeros((8, 8, 8)), np.zeros((8, 8, 8)))


@pytest.mark.parametrize("shape", [(32, 32), (12, 14, 16)])
def test_ssim_matches_scikit_image(shape):
    skm = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(1)
    a = rng.random(shape)
    b = np.clip(a + 0.2 * rng.standard_normal(shape), 0, 1)
    assert ssim(a, b, data_range=1.0) == pytest.approx(skm.structural_similarity(a, b, data_range=1.0), rel=1e-6)


def test_psnr():
    a = np.zeros((4, 4))
    a[0, 0] = 1.0
    b = a.copy()
    assert psnr(a, b) == math.inf
    b[1, 1] = 0.5  # mse = 0.25 / 16
    assert psnr(a, b) == pytest.approx(10 * math.log10(1 / (0.25 / 16)))
