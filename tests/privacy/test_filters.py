"""Plain update filters: fail-closed percentile sharing, sparse encoding that shrinks bytes, client-level DP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from privacy.accounting import epsilon
from privacy.filters import (
    NOT_DP_NOTICE,
    ClientDPAccountant,
    ClientDPConfig,
    check_update,
    clip_and_noise,
    decode_sparse,
    encode_sparse,
    l2_norm,
    payload_nbytes,
    percentile_share,
)


def unet_like_update(seed: int = 0) -> dict[str, np.ndarray]:
    """Weight differences shaped like the bundle's U-Net layers (heavy-tailed, as real updates are)."""
    rng = np.random.default_rng(seed)
    shapes = {
        "conv1.weight": (16, 1, 3, 3, 3),
        "conv1.bias": (16,),
        "down.weight": (32, 16, 3, 3, 3),
        "deep.weight": (128, 64, 3, 3, 3),
        "up.weight": (192, 32, 3, 3, 3),
        "out.weight": (8, 8, 3, 3, 3),
        "scale": (),
    }
    return {k: np.asarray(rng.standard_t(3, size=s) * 1e-3, dtype=np.float32) for k, s in shapes.items()}


# -- parameters -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("percentile", "gamma"), [(-1, None), (100.5, None), (float("nan"), None), ("90", None), (90, 0.0), (90, -0.1)]
)
def test_bad_percentile_parameters_raise_and_send_nothing(percentile, gamma):
    update = unet_like_update()
    with pytest.raises(ValueError):
        encode_sparse(update, percentile=percentile, gamma=gamma)
    with pytest.raises(ValueError):
        percentile_share(update, percentile=percentile, gamma=gamma)


@pytest.mark.parametrize(
    "update",
    [{}, {"a": np.array([1, 2, 3])}, {"a": np.array([1.0, np.nan])}, {"a": np.array([np.inf], np.float32)}],
)
def test_bad_updates_raise(update):
    with pytest.raises(ValueError):
        check_update(update)
    with pytest.raises(ValueError):
        encode_sparse(update, percentile=90)


# -- percentile sharing -----------------------------------------------------------------------------------------


def test_percentile_90_shares_about_ten_percent_and_is_labelled_not_dp():
    update = unet_like_update()
    _, report = percentile_share(update, percentile=90)
    assert report.fraction_kept == pytest.approx(0.10, abs=0.005)
    assert report.details["dp"] is False and report.details["notice"] == NOT_DP_NOTICE
    assert "NOT differential privacy" in NOT_DP_NOTICE


def test_sparse_encoding_is_at_most_a_quarter_of_the_bytes_at_ten_percent():
    update = unet_like_update()
    payload, report = encode_sparse(update, percentile=90)
    dense_bytes = sum(a.nbytes for a in update.values())
    assert report.bytes_before == dense_bytes
    assert report.bytes_after == payload_nbytes(payload)
    assert report.bytes_after <= 0.25 * dense_bytes
    # and the bytes shrink with the shared fraction
    _, half = encode_sparse(update, percentile=50)
    assert half.bytes_after > report.bytes_after


def test_decoded_update_equals_dense_percentile_sharing():
    update = unet_like_update()
    dense, _ = percentile_share(update, percentile=80, gamma=2e-3, num_steps=2)
    payload, _ = encode_sparse(update, percentile=80, gamma=2e-3, num_steps=2)
    decoded = decode_sparse(payload)
    assert decoded.keys() == update.keys()
    for name in update:
        assert decoded[name].dtype == update[name].dtype and decoded[name].shape == update[name].shape
        np.testing.assert_array_equal(decoded[name], dense[name])
    # gamma clipped |Δw / steps| to 2e-3
    assert max(float(np.abs(v).max()) for v in decoded.values() if v.ndim) <= 2 * 2e-3 + 1e-9


def test_kept_values_are_the_largest():
    update = unet_like_update()
    dense, report = percentile_share(update, percentile=90)
    kept = np.concatenate([np.abs(v[v != 0]) for k, v in dense.items() if v.ndim])
    dropped = np.concatenate([np.abs(update[k][dense[k] == 0]) for k, v in dense.items() if v.ndim])
    assert kept.min() >= dropped.max()
    assert report.norm_after < report.norm_before


def test_both_position_encodings_are_used():
    update = {"sparse": np.zeros(10_000, np.float32), "dense": np.ones(64, np.float32)}
    update["sparse"][[3, 500, 9000]] = 1.0
    payload, _ = encode_sparse(update, percentile=99.9)  # cutoff 1.0: the 3 + 64 ones are shared
    assert payload["tensors"]["sparse"]["encoding"] == "index"
    assert payload["tensors"]["dense"]["encoding"] == "mask"
    assert np.array_equal(decode_sparse(payload)["sparse"], update["sparse"])


@settings(max_examples=30, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(
            np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=9), elements=st.floats(-1, 1, width=32)
        ),
        min_size=1,
        max_size=4,
    ),
    percentile=st.floats(0, 100),
)
def test_sparse_roundtrip_property(arrays, percentile):
    update = {f"t{i}": a for i, a in enumerate(arrays)}
    payload, _ = encode_sparse(update, percentile=percentile)
    dense, _ = percentile_share(update, percentile=percentile)
    decoded = decode_sparse(payload)
    for k in update:
        np.testing.assert_array_equal(decoded[k], dense[k])


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.update(format="other"),
        lambda p: p["tensors"]["a"].update(values=p["tensors"]["a"]["values"][:-1]),
        lambda p: p["tensors"]["a"].update(encoding="rle"),
        lambda p: p["tensors"]["b"].update(positions=np.array([1, 99], np.uint16)),
        lambda p: p["tensors"]["b"].update(positions=np.array([5, 2], np.uint16)),
        lambda p: p["tensors"]["a"].update(positions=p["tensors"]["a"]["positions"][:1]),
        lambda p: p.update(tensors={}),
    ],
)
def test_malformed_payloads_never_decode(corrupt):
    a = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    b = np.zeros(50, np.float32)
    b[[1, 7]] = 1.0
    payload, _ = encode_sparse({"a": a, "b": b}, percentile=50)
    assert payload["tensors"]["b"]["encoding"] == "index"
    corrupt(payload)
    with pytest.raises(ValueError):
        decode_sparse(payload)


# -- client-level DP --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"clip_norm": 0.0},
        {"clip_norm": -1.0},
        {"noise_multiplier": 0.0},
        {"noise_multiplier": -0.5},
        {"noise_multiplier": math.nan},
        {"delta": 0.0},
        {"delta": 1.0},
        {"adjacency": "swap"},
        {"accountant": "moments"},
    ],
)
def test_client_dp_config_rejects_nonsense(kwargs):
    with pytest.raises(ValueError):
        ClientDPConfig(**({"clip_norm": 1.0, "noise_multiplier": 1.0} | kwargs))


def test_clip_and_noise_clips_then_adds_calibrated_noise():
    update = {"w": np.full((200, 500), 0.01, np.float32)}  # norm 3.16
    cfg = ClientDPConfig(clip_norm=1.0, noise_multiplier=0.5)
    out, report = clip_and_noise(update, config=cfg, rng=np.random.default_rng(0))
    assert out["w"].dtype == np.float32
    assert report.norm_before == pytest.approx(l2_norm(update))
    assert report.details["clipped"] and report.details["norm_clipped"] == pytest.approx(1.0)
    residual = out["w"] - update["w"] * (1.0 / report.norm_before)
    assert residual.std() == pytest.approx(0.5, rel=0.02)  # std = noise_multiplier × clip_norm
    assert abs(residual.mean()) < 0.01


def test_small_updates_are_not_scaled_up():
    update = {"w": np.full(100, 1e-3, np.float32)}
    out, report = clip_and_noise(update, config=ClientDPConfig(clip_norm=1.0, noise_multiplier=1e-9))
    assert not report.details["clipped"]
    np.testing.assert_allclose(out["w"], update["w"], atol=1e-6)


def test_client_dp_epsilon_uses_the_sensitivity_of_the_adjacency():
    replace = ClientDPConfig(clip_norm=2.0, noise_multiplier=4.0, delta=1e-5, adjacency="replace")
    add_remove = ClientDPConfig(clip_norm=2.0, noise_multiplier=4.0, delta=1e-5, adjacency="add_remove")
    assert replace.effective_noise_multiplier == 2.0 and add_remove.effective_noise_multiplier == 4.0
    assert replace.epsilon(10) == pytest.approx(epsilon(noise_multiplier=2.0, sample_rate=1.0, steps=10, delta=1e-5))
    assert add_remove.epsilon(10) < replace.epsilon(10)


def test_client_dp_accountant_composes_and_persists(tmp_path):
    cfg = ClientDPConfig(clip_norm=1.0, noise_multiplier=3.0)
    acc = ClientDPAccountant(config=cfg, state_path=tmp_path / "cdp.json")
    assert acc.epsilon == 0.0
    for _ in range(3):
        acc.step()
    assert acc.report()["rounds"] == 3 and acc.report()["scope"].startswith("client-level DP")
    again = ClientDPAccountant(config=cfg, state_path=tmp_path / "cdp.json")
    assert again.rounds == 3 and again.epsilon == pytest.approx(cfg.epsilon(3))
    with pytest.raises(ValueError, match="another configuration"):
        ClientDPAccountant(config=ClientDPConfig(clip_norm=1.0, noise_multiplier=1.0), state_path=tmp_path / "cdp.json")
    (tmp_path / "cdp.json").write_text("garbage")
    with pytest.raises(RuntimeError, match="not resetting"):
        ClientDPAccountant(config=cfg, state_path=tmp_path / "cdp.json")
