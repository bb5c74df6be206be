"""Pseudo-random masks: a uint32 stream from NumPy's Philox counter-based generator keyed by 128 bits of HKDF output.

Philox's output for a given key is fixed by its specification (not by the platform or the NumPy version's default
generator), so a pair of sites and the server derive bit-identical streams.
"""

from __future__ import annotations

import numpy as np

from privacy.secure_aggregation.keys import derive


def stream(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values from a 16-byte ``seed``."""
    if len(seed) != 16:
        raise ValueError(f"a mask seed must be 16 bytes, got {len(seed)}")
    gen = np.random.Philox(key=int.from_bytes(seed, "little"))
    raw = gen.random_raw((length + 1) // 2)  # uint64 words
    return raw.view(np.uint32)[:length].copy()


def pair_seed(shared: bytes, *, transcript: bytes, job_id: str, rnd: int) -> bytes:
    """The 16-byte seed of the pairwise mask of one pair of sites in one round."""
    return derive(shared, salt=transcript, info=f"fetalfl-secagg|pair-mask|{job_id}|{rnd}", length=16)


def self_seed(seed: bytes, *, job_id: str, rnd: int) -> bytes:
    """The 16-byte seed of a site's self-mask in one round (from its fresh 32-byte secret)."""
    return derive(seed, salt=b"fetalfl-secagg-self", info=f"self-mask|{job_id}|{rnd}", length=16)
