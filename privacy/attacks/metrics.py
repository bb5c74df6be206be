"""Scores of attack success: ROC AUC and advantage of a membership test, SSIM / PSNR of a reconstruction.

Written here (numpy/scipy only) so the numbers do not depend on an optional package; the tests compare SSIM with
scikit-image's implementation when it is installed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P(score of a random member > score of a random non-member), ties counting ½ (Mann–Whitney U / (m·n)).

    0.5 is chance; an attack guessing "member" for higher scores succeeds when the AUC is above 0.5.
    """
    pos = _scores(member_scores, "member_scores")
    neg = _scores(nonmember_scores, "nonmember_scores")
    ranks = _average_ranks(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < values.size:
        j = i
        while j + 1 < values.size and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return ranks


def advantage(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Best threshold's TPR − FPR (membership advantage; ε-DP bounds it by (e^ε − 1 + 2δ) / (e^ε + 1))."""
    pos = _scores(member_scores, "member_scores")
    neg = _scores(nonmember_scores, "nonmember_scores")
    best = 0.0
    for t in np.unique(np.concatenate([pos, neg])):
        best = max(best, float((pos >= t).mean() - (neg >= t).mean()))
    return best


def dp_advantage_bound(epsilon: float, delta: float) -> float:
    """Upper bound on any membership test's TPR − FPR under (ε, δ)-DP (Yeom et al. 2018 / Humphries et al.)."""
    if epsilon < 0 or not 0 <= delta < 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta < 1, got {epsilon}, {delta}")
    return min(1.0, (math.exp(epsilon) - 1 + 2 * delta) / (math.exp(epsilon) + 1))


def ssim(
    reference: np.ndarray,
    test: np.ndarray,
    *,
    data_range: float | None = None,
    win_size: int = 7,
) -> float:
    """Mean structural similarity (Wang et al. 2004) of two 2D/3D images, uniform window, sample covariance.

    Same conventions as ``skimage.metrics.structural_similarity`` with its defaults (K1 = 0.01, K2 = 0.03, border
    of ``win_size // 2`` excluded). ``data_range`` defaults to the reference's max − min.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(test, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if min(x.shape) < win_size:
        raise ValueError(f"images of shape {x.shape} are smaller than the {win_size}-voxel window")
    if data_range is None:
        data_range = float(x.max() - x.min())
    if not data_range > 0:
        raise ValueError("data_range must be > 0 (a constant reference has no structure to compare)")
    n = win_size**x.ndim
    cov_norm = n / (n - 1.0)
    ux = ndimage.uniform_filter(x, size=win_size)
    uy = ndimage.uniform_filter(y, size=win_size)
    uxx = ndimage.uniform_filter(x * x, size=win_size)
    uyy = ndimage.uniform_filter(y * y, size=win_size)
    uxy = ndimage.uniform_filter(x * y, size=win_size)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return float(s[tuple(slice(pad, dim - pad) for dim in s.shape)].mean())


def psnr(reference: np.ndarray, test: np.ndarray, *, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(test, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {y.shape}")
    data_range = float(x.max() - x.min()) if data_range is None else float(data_range)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
