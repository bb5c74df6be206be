"""Shamir secret sharing over the prime field GF(2^521 - 1), for 32-byte secrets (mask keys and seeds).

``split(secret, n, t)`` gives ``n`` shares ``(x, y)`` with ``x = 1..n``; any ``t`` of them give the secret back
(Lagrange interpolation at 0), fewer reveal nothing about it. Pure Python integers: a share costs microseconds and
a job shares a few dozen secrets per round.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = (1 << 521) - 1  # a Mersenne prime, larger than any 32-byte secret
SECRET_BYTES = 32
SHARE_BYTES = 66  # 521 bits


class ShamirError(ValueError):
    """Shares that cannot give a secret back (too few, duplicates, out of range)."""


def split(secret: bytes, n: int, t: int) -> list[tuple[int, int]]:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= t <= n:
        raise ValueError(f"need 1 <= t <= n, got t={t}, n={n}")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Sequence[tuple[int, int]], t: int) -> bytes:
    """The secret from at least ``t`` shares (the first ``t`` distinct ones are used)."""
    unique = dict(shares)
    if len(unique) != len(shares):
        raise ShamirError("duplicate share indices")
    if len(unique) < t:
        raise ShamirError(f"{len(unique)} share(s), fewer than the threshold {t}: the secret cannot be recovered")
    points = list(unique.items())[:t]
    if any(not 1 <= x < PRIME or not 0 <= y < PRIME for x, y in points):
        raise ShamirError("a share is outside the field")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ShamirError("the shares do not belong to one 32-byte secret")
    return secret.to_bytes(SECRET_BYTES, "big")


def share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    if len(data) != SHARE_BYTES:
        raise ShamirError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}")
    return int.from_bytes(data, "big")
