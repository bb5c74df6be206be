"""Pseudo-random masks: a uint32 stream from AES-128 in counter mode (the keystream, little-endian words) keyed by
128 bits of HKDF output.

AES-CTR is a standard cryptographic PRG (NumPy's Philox, also counter-based and as fast here, is a statistical
generator, not a vetted cryptographic one), and its output is fixed by the standard, so a pair of sites and the
server derive bit-identical streams on any platform. Each key is used for one stream only (one pair or one
self-mask, one round), so the all-zero counter block as the starting point is safe.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from privacy.secure_aggregation.keys import derive


def stream(seed: bytes, length: int) -> np.ndarray:
    """``length`` uint32 values from a 16-byte ``seed``."""
    if len(seed) != 16:
        raise ValueError(f"a mask seed must be 16 bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    keystream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(keystream, dtype="<u4").astype(np.uint32)


def pair_seed(shared: bytes, *, transcript: bytes, job_id: str, rnd: int) -> bytes:
    """The 16-byte seed of the pairwise mask of one pair of sites in one round."""
    return derive(shared, salt=transcript, info=f"fetalfl-secagg|pair-mask|{job_id}|{rnd}", length=16)


def self_seed(seed: bytes, *, job_id: str, rnd: int) -> bytes:
    """The 16-byte seed of a site's self-mask in one round (from its fresh 32-byte secret)."""
    return derive(seed, salt=b"fetalfl-secagg-self", info=f"self-mask|{job_id}|{rnd}", length=16)
