"""Property-based fuzzing of the privacy filters' inputs (bounded examples): every input either gives a finite,
same-shaped, clipped update, or the intended ``ValueError`` (fail closed) — never another exception, never NaN."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from privacy.filters import ClientDPConfig, clip_and_noise, decode_sparse, encode_sparse, percentile_share

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

any_floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int32, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
    elements=None,
)
float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=5),
    elements=st.floats(-1e6, 1e6, width=32),
)
updates = st.dictionaries(st.text(min_size=1, max_size=8), arrays, max_size=4)
good_updates = st.dictionaries(st.text(min_size=1, max_size=8), float_arrays, min_size=1, max_size=4)


@SETTINGS
@given(update=updates, percentile=st.floats(allow_nan=True), gamma=st.one_of(st.none(), any_floats))
def test_percentile_share_fails_closed_on_any_input(update, percentile, gamma):
    try:
        out, report = percentile_share(update, percentile=percentile, gamma=gamma)
    except ValueError:
        return  # the intended refusal: nothing is sent
    assert set(out) == {str(k) for k in update}
    for name, a in out.items():
        assert a.shape == np.asarray(update[name]).shape and np.all(np.isfinite(a))
        if gamma is not None:
            assert np.all(np.abs(a) <= gamma + 1e-6)
    assert report.details["dp"] is False


@SETTINGS
@given(update=updates, clip=st.floats(allow_nan=True, allow_infinity=True), sigma=st.floats(allow_nan=True))
def test_client_dp_fails_closed_on_any_input(update, clip, sigma):
    try:
        config = ClientDPConfig(clip_norm=clip, noise_multiplier=sigma)
        out, report = clip_and_noise(update, config=config, rng=np.random.default_rng(0))
    except ValueError:
        return
    assert set(out) == {str(k) for k in update}
    assert all(np.all(np.isfinite(a)) for a in out.values())
    assert report.details["norm_clipped"] <= clip * (1 + 1e-6)


@SETTINGS
@given(update=good_updates, percentile=st.floats(0, 100), data=st.data())
def test_sparse_payload_mutations_never_decode_to_garbage(update, percentile, data):
    payload, _ = encode_sparse(update, percentile=percentile)
    key = data.draw(st.sampled_from(sorted(payload)))
    mutated = dict(payload)
    mutated[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=5), arrays))
    try:
        decoded = decode_sparse(mutated)
    except (ValueError, TypeError, KeyError):
        return
    assert all(np.all(np.isfinite(a)) for a in decoded.values())
