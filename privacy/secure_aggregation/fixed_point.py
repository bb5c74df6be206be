"""Fixed-point encoding of float updates into uint32 modulo 2^32, with an overflow check that raises.

A value ``v`` becomes ``round(v * 2^f) mod 2^32`` (``f`` = ``frac_bits``). Summing the encodings of ``n`` sites
modulo 2^32 and reading the result as a signed 32-bit integer gives the sum of the rounded values exactly, as long
as that sum stays within ``[-2^31, 2^31)``. :func:`encode` guarantees it by refusing any value with
``|v| >= 2^(31 - f) / n`` (``n``: the number of sites that may be summed): range ±32768/n at the default ``f = 16``,
precision 2^-17 ≈ 7.6e-6 per value and site (round-to-nearest). A value out of range raises
:class:`FixedPointOverflowError` (a wrapped value would silently corrupt the global model).
"""

from __future__ import annotations

import numpy as np

DEFAULT_FRAC_BITS = 16
MODULUS_BITS = 32


class FixedPointOverflowError(ValueError):
    """A value that cannot be encoded without the sum wrapping around modulo 2^32 (or a NaN/Inf)."""


def check_frac_bits(frac_bits: int) -> int:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 1 <= frac_bits <= 30:
        raise ValueError(f"frac_bits must be an integer in [1, 30], got {frac_bits!r}")
    return frac_bits


def bound(frac_bits: int, n_summands: int) -> float:
    """Largest magnitude (exclusive) one site may encode so that ``n_summands`` encodings never overflow."""
    check_frac_bits(frac_bits)
    if n_summands < 1:
        raise ValueError(f"n_summands must be >= 1, got {n_summands}")
    return 2.0 ** (MODULUS_BITS - 1 - frac_bits) / n_summands


def encode(values: np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS, n_summands: int = 1) -> np.ndarray:
    """``values`` (any float array) as uint32 fixed point; raises :class:`FixedPointOverflowError` when out of range."""
    arr = np.asarray(values, dtype=np.float64)
    limit = bound(frac_bits, n_summands)
    if arr.size:
        if not np.all(np.isfinite(arr)):
            raise FixedPointOverflowError(f"{int(np.sum(~np.isfinite(arr)))} non-finite value(s) cannot be encoded")
        peak = float(np.max(np.abs(arr)))
        if peak >= limit:
            raise FixedPointOverflowError(
                f"a value of magnitude {peak:.6g} is outside the fixed-point range ±{limit:.6g} "
                f"({frac_bits} fractional bits, {n_summands} summands): it would wrap around modulo 2^32"
            )
    scaled = np.rint(arr * (1 << frac_bits)).astype(np.int64)
    return (scaled & 0xFFFFFFFF).astype(np.uint32)


def decode_sum(total: np.ndarray, *, frac_bits: int = DEFAULT_FRAC_BITS) -> np.ndarray:
    """A sum of encodings (uint32, modulo 2^32) back to float64."""
    check_frac_bits(frac_bits)
    signed = np.asarray(total, dtype=np.uint32).view(np.int32).astype(np.float64)
    return signed / float(1 << frac_bits)
