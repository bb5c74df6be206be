"""Secure aggregation maths without NVFlare: fixed point, Shamir, the full protocol with and without dropouts, and
every way it must fail closed (too few survivors, tampered or missing keys, reused rounds)."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from privacy.secure_aggregation import shamir
from privacy.secure_aggregation.fixed_point import FixedPointOverflowError, bound, decode_sum, encode
from privacy.secure_aggregation.protocol import (
    WEIGHT_KEY,
    Params,
    ProtocolError,
    ServerSession,
    SiteSession,
    ThresholdError,
    check_params,
)

SITES = ["site-1", "site-2", "site-3", "site-4", "site-5"]
TOL = 2.0**-16  # fixed-point rounding (2^-17 per value and site) after division by the total weight >= 1


def updates(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"conv.weight": rng.normal(0, 0.05, (4, 3, 3)).astype(np.float32), "conv.bias": rng.normal(0, 0.1, 4)}
        for _ in range(n)
    ]


def setup(sites: list[str], threshold: int, job: str = "job-1") -> tuple[ServerSession, dict[str, SiteSession]]:
    params = Params(job, tuple(sites), threshold)
    server = ServerSession(params)
    clients = {s: SiteSession(s, params) for s in sites}
    for s, c in clients.items():
        server.add_public_key(c.advertise(), authenticated_site=s)
    table = server.key_table()
    for s, c in clients.items():
        server.add_setup(c.setup(table), authenticated_site=s)
    conf = server.confirmation()
    for s, c in clients.items():
        c.confirm(conf["transcript"], conf["tags"].get(s, {}))
    return server, clients


def run_round(server, clients, data, weights, rnd=0, drop=(), drop_at_unmask=()):
    parts = server.participants()
    server.start_round(rnd, parts)
    sent = {}
    for s in parts:
        msg = clients[s].mask(rnd, data[s], weights[s], parts)
        sent[s] = msg
        if s not in drop:  # a dropped site masked (its peers masked with it) but its input never arrived
            server.add_masked(s, msg)
    requests = server.unmask_requests()
    responses = {
        v: clients[v].unmask(rnd, q["survivors"], q["dropped"], q["self_shares"], q["key_shares"])
        for v, q in requests.items()
        if v not in drop_at_unmask
    }
    return server.finish(responses), sent


def weighted_mean(data, weights, sites):
    total = sum(weights[s] for s in sites)
    return {k: sum(weights[s] * data[s][k].astype(np.float64) for s in sites) / total for k in data[sites[0]]}


# --------------------------------------------------------------------------------------------- fixed point
def test_fixed_point_sum_is_exact_within_rounding_and_overflow_raises() -> None:
    rng = np.random.default_rng(1)
    values = [rng.uniform(-100, 100, 1000) for _ in range(3)]
    total = sum(encode(v, n_summands=3) for v in values)  # uint32 wraps modulo 2^32
    np.testing.assert_allclose(decode_sum(total), sum(values), atol=3 * 2.0**-17)
    assert bound(16, 3) == pytest.approx(32768 / 3)
    with pytest.raises(FixedPointOverflowError, match="outside the fixed-point range"):
        encode(np.array([0.0, 32768 / 3]), n_summands=3)
    with pytest.raises(FixedPointOverflowError, match="non-finite"):
        encode(np.array([np.nan]))


def test_shamir_any_t_shares_recover_fewer_do_not() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, 5, 3)
    assert shamir.combine(shares[2:], 3) == secret
    assert shamir.combine([shares[4], shares[0], shares[2]], 3) == secret
    with pytest.raises(shamir.ShamirError, match="fewer than the threshold"):
        shamir.combine(shares[:2], 3)
    # two shares plus a wrong third give something else (or an error), never the secret
    bad = [shares[0], shares[1], (shares[2][0], (shares[2][1] + 1) % shamir.PRIME)]
    with contextlib.suppress(shamir.ShamirError):
        assert shamir.combine(bad, 3) != secret


# --------------------------------------------------------------------------------------------- protocol
def test_unmasked_sum_equals_the_plain_weighted_mean() -> None:
    server, clients = setup(SITES, 3)
    data = dict(zip(SITES, updates(5)))
    weights = {s: float(i + 1) for i, s in enumerate(SITES)}
    (agg, total), sent = run_round(server, clients, data, weights)
    assert total == pytest.approx(sum(weights.values()))
    expected = weighted_mean(data, weights, SITES)
    for k in expected:
        np.testing.assert_allclose(agg[k], expected[k], rtol=0, atol=TOL)
    assert set(sent["site-1"]["masked"]) == {"conv.weight", "conv.bias", WEIGHT_KEY}
    assert sent["site-1"]["masked"]["conv.weight"].dtype == np.uint32


def test_a_masked_update_is_unrelated_to_the_true_one() -> None:
    """Over repeated rounds, the masked payload read as fixed point has ~0 correlation with the true update (and
    the same update masked twice looks different), while the plain encoding correlates perfectly."""
    server, clients = setup(SITES[:3], 2)
    rng = np.random.default_rng(3)
    true = {"w": rng.normal(0, 1, 20000)}
    corrs = []
    for rnd in range(5):
        data = {s: true if s == "site-1" else {"w": rng.normal(0, 1, 20000)} for s in SITES[:3]}
        (_agg, _), sent = run_round(server, clients, data, dict.fromkeys(SITES[:3], 1.0), rnd=rnd)
        seen = decode_sum(sent["site-1"]["masked"]["w"])
        corrs.append(np.corrcoef(seen, true["w"])[0, 1])
        if rnd == 1:
            assert not np.array_equal(seen, previous)  # noqa: F821 - fresh masks every round
        previous = seen  # noqa: F841
    assert max(abs(c) for c in corrs) < 0.05  # |r| for 20,000 independent values: ~0.007 typical
    assert np.corrcoef(decode_sum(encode(true["w"], n_summands=3)), true["w"])[0, 1] > 0.999


def test_a_site_that_drops_after_masking_is_recovered_and_excluded_afterwards() -> None:
    server, clients = setup(SITES, 3)
    data = dict(zip(SITES, updates(5, seed=2)))
    weights = dict.fromkeys(SITES, 2.0)
    (agg, total), _ = run_round(server, clients, data, weights, drop={"site-2", "site-4"})
    survivors = ["site-1", "site-3", "site-5"]
    assert total == pytest.approx(6.0)
    expected = weighted_mean(data, weights, survivors)
    for k in expected:
        np.testing.assert_allclose(agg[k], expected[k], rtol=0, atol=TOL)
    # their keys are now known to the server: they take no further part, and the next round works without them
    assert server.participants() == survivors
    (agg2, _), _ = run_round(server, clients, data, weights, rnd=1)
    for k in expected:
        np.testing.assert_allclose(agg2[k], expected[k], rtol=0, atol=TOL)
    with pytest.raises(ProtocolError, match="private key reconstructed"):
        clients["site-1"].mask(2, data["site-1"], 1.0, SITES)


def test_fewer_survivors_than_the_threshold_is_a_clear_error() -> None:
    server, clients = setup(SITES, 3)
    data = dict(zip(SITES, updates(5)))
    with pytest.raises(
        ThresholdError, match=r"only 2 masked input\(s\) arrived .* below the secure-aggregation threshold 3"
    ):
        run_round(server, clients, data, dict.fromkeys(SITES, 1.0), drop={"site-1", "site-2", "site-3"})
    server, clients = setup(SITES, 3)
    with pytest.raises(ThresholdError, match="returned their shares"):  # enough inputs, too few answer the unmask
        run_round(
            server, clients, data, dict.fromkeys(SITES, 1.0), drop={"site-1"}, drop_at_unmask={"site-2", "site-3"}
        )


def test_bad_parameters_fail_closed() -> None:
    with pytest.raises(ValueError, match="above the 3 sites"):
        check_params(["a", "b", "c"], 4)
    with pytest.raises(ValueError, match="strict majority"):
        check_params(["a", "b", "c", "d"], 2)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        check_params(["a"], 1)
    with pytest.raises(ValueError, match="frac_bits"):
        check_params(["a", "b"], 2, 0)


def test_a_tampered_public_key_fails_closed() -> None:
    params = Params("job", tuple(SITES[:3]), 2)
    server = ServerSession(params)
    clients = {s: SiteSession(s, params) for s in SITES[:3]}
    for s, c in clients.items():
        server.add_public_key(c.advertise(), authenticated_site=s)
    table = server.key_table()
    # a key claimed for another site than the authenticated sender is refused at once
    with pytest.raises(ProtocolError, match="came from"):
        ServerSession(params).add_public_key(clients["site-1"].advertise(), authenticated_site="site-2")
    # the table shown to site-1 has site-3's key replaced by an attacker's
    forged = dict(table, **{"site-3": SiteSession("site-3", params).public_key.hex()})
    m1 = clients["site-1"].setup(forged)
    m2 = clients["site-2"].setup(table)
    m3 = clients["site-3"].setup(table)
    assert m1["transcript"] != m2["transcript"]
    server.add_setup(m2, authenticated_site="site-2")
    server.add_setup(m3, authenticated_site="site-3")
    with pytest.raises(ProtocolError, match="different key table"):
        server.add_setup(m1, authenticated_site="site-1")
    # even if the server hid that: site-3 cannot verify site-1's tag, site-1 sees another transcript
    tags = {"site-1": m1["tags"]["site-3"], "site-2": m2["tags"]["site-3"]}
    with pytest.raises(ProtocolError, match="does not verify"):
        clients["site-3"].confirm(m3["transcript"], tags)
    with pytest.raises(ProtocolError, match="transcript hashes differ"):
        clients["site-1"].confirm(m2["transcript"], {"site-2": m2["tags"]["site-1"], "site-3": m3["tags"]["site-1"]})
    # a table carrying a different key for the site itself
    with pytest.raises(ProtocolError, match="different public key for this site"):
        SiteSession("site-2", params).setup(table)
    # no masking before confirmation
    with pytest.raises(ProtocolError, match="before the key table was confirmed"):
        clients["site-2"].mask(0, {"w": np.zeros(3)}, 1.0, SITES[:3])


def test_missing_keys_fail_closed() -> None:
    params = Params("job", tuple(SITES[:3]), 2)
    server = ServerSession(params)
    clients = {s: SiteSession(s, params) for s in SITES[:3]}
    server.add_public_key(clients["site-1"].advertise(), authenticated_site="site-1")
    with pytest.raises(ThresholdError, match="below the threshold 2"):
        server.key_table()
    server.add_public_key(clients["site-2"].advertise(), authenticated_site="site-2")
    table = server.key_table()  # site-3 never sent a key: it is not in the table
    with pytest.raises(ProtocolError, match="no key for this site"):
        clients["site-3"].setup(table)
    m1 = clients["site-1"].setup(table)
    with pytest.raises(ProtocolError, match="no key confirmation from"):
        clients["site-1"].confirm(m1["transcript"], {})
    m2 = clients["site-2"].setup(table)
    clients["site-1"].confirm(m1["transcript"], {"site-2": m2["tags"]["site-1"]})
    with pytest.raises(ProtocolError, match="have no key in the agreed table"):
        clients["site-1"].mask(0, {"w": np.zeros(3)}, 1.0, SITES[:3])


def test_one_input_per_round_and_one_answer_per_round() -> None:
    server, clients = setup(SITES[:3], 2)
    data = dict(zip(SITES[:3], updates(3)))
    parts = server.participants()
    server.start_round(0, parts)
    msgs = {s: clients[s].mask(0, data[s], 1.0, parts) for s in parts}
    with pytest.raises(ProtocolError, match="already masked"):
        clients["site-1"].mask(0, data["site-1"], 1.0, parts)
    for s in ("site-1", "site-2"):
        server.add_masked(s, msgs[s])
    with pytest.raises(ProtocolError, match="second masked input"):
        server.add_masked("site-1", msgs["site-1"])
    q = server.unmask_requests()["site-1"]
    clients["site-1"].unmask(0, q["survivors"], q["dropped"], q["self_shares"], q["key_shares"])
    # asked again claiming site-2 dropped too (to get its key AND its self-mask): refused
    with pytest.raises(ProtocolError):
        clients["site-1"].unmask(0, ["site-1"], ["site-2", "site-3"], {}, q["key_shares"])
