"""The uncertainty score behind the ``entropy`` next-sample strategy."""

import numpy as np

from apps.fetal_brain.lib.strategies import EntropyStrategy, RandomStrategy, foreground_entropy, recency_weights


def _probabilities(background: float, shape=(4, 4, 4), classes: int = 8) -> np.ndarray:
    p = np.full((classes, *shape), (1.0 - background) / (classes - 1))
    p[0] = background
    return p


def test_certain_brain_scores_low_and_uncertain_brain_high():
    certain = np.zeros((8, 4, 4, 4))
    certain[3] = 1.0  # every voxel white matter, no doubt
    unsure = np.full((8, 4, 4, 4), 1 / 8)
    unsure[2] += 1e-6  # argmax is grey matter, barely
    unsure /= unsure.sum(axis=0)
    assert foreground_entropy(certain) < 1e-3
    assert foreground_entropy(unsure) > 0.99


def test_background_voxels_do_not_dilute_the_score():
    p = _probabilities(background=0.999)  # confident background everywhere...
    p[:, 0, 0, 0] = 1 / 8  # ...and one voxel of brain the model is unsure about
    p[3, 0, 0, 0] += 1e-3  # tip the argmax to a tissue
    p[:, 0, 0, 0] /= p[:, 0, 0, 0].sum()
    assert foreground_entropy(p) > 0.99


def test_no_brain_at_all_is_worth_a_look():
    assert foreground_entropy(_probabilities(background=0.9)) == 1.0


def test_recency_weights_are_never_zero_and_favour_cases_not_served_lately():
    now = 1_000_000.0
    weights = recency_weights([0.0, now - 3600, now, now + 5], now)  # never, an hour ago, this second, clock skew
    assert weights[0] > weights[1] > weights[2] == weights[3] == 1.0
    assert all(w >= 1.0 for w in weights)


def test_only_strategies_that_run_the_network_go_to_the_inference_pool() -> None:
    """The route sends ``uses_model`` strategies to the bounded inference pool; random must not wait behind it."""
    assert RandomStrategy.uses_model is False
    assert EntropyStrategy.uses_model is True
