"""The leak audit must be able to fail: it flags a plaintext (or its fixed-point encoding) and passes random shares."""

from __future__ import annotations

import numpy as np
import torch

from privacy.encrypted_inference.audit import FIXED_POINT_SCALE, ReceivedAudit


def _secret() -> np.ndarray:
    return np.random.default_rng(0).random(40_000).astype(np.float32)


def test_random_shares_pass():
    a = ReceivedAudit(_secret())
    a.observe(torch.randint(-(2**62), 2**62, (300_000,), dtype=torch.int64))
    s = a.summary()
    assert s["hits"] == 0 and s["max_abs_correlation"] < 0.05 and s["received_bytes"] == 300_000 * 8


def test_encoded_plaintext_is_flagged():
    secret = _secret()
    a = ReceivedAudit(secret)
    a.observe(torch.from_numpy(np.round(secret.astype(np.float64) * FIXED_POINT_SCALE).astype(np.int64)))
    s = a.summary()
    assert s["hits"] > 30_000 and s["max_abs_correlation"] > 0.99


def test_masked_but_correlated_data_is_flagged():
    secret = _secret()
    a = ReceivedAudit(secret)
    noise = np.random.default_rng(1).normal(0, 0.1, secret.size)
    a.observe(torch.from_numpy(np.round((secret + noise) * FIXED_POINT_SCALE).astype(np.int64)))
    assert a.summary()["max_abs_correlation"] > 0.5
