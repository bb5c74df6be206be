"""Key agreement and key derivation: X25519 between every pair of sites, HKDF-SHA256 for each use, AES-GCM for the
secret shares that travel through the server, HMAC tags that confirm both ends of a pair derived the same key.

Every derived key is bound (as HKDF salt) to the *transcript*: the hash of the job id, the parameters and the whole
table of public keys. A site that received a different table than its peers (a tampered or substituted key) derives
different keys: its confirmation tags do not verify and it refuses to mask (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PUBLIC_KEY_BYTES = 32
NONCE_BYTES = 12


class KeyMaterialError(ValueError):
    """A key that is missing, malformed, or does not authenticate."""


def new_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def private_bytes(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def private_from_bytes(data: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(data)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def agree(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret with a peer (raises :class:`KeyMaterialError` for a malformed or degenerate key)."""
    if not isinstance(peer_public, bytes) or len(peer_public) != PUBLIC_KEY_BYTES:
        raise KeyMaterialError(f"a public key must be {PUBLIC_KEY_BYTES} raw bytes")
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as e:  # all-zero shared secret: a small-order point
        raise KeyMaterialError(f"degenerate public key: {e}") from None


def derive(secret: bytes, *, salt: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info.encode()).derive(secret)


def transcript_hash(job_id: str, params: Mapping[str, object], table: Mapping[str, bytes]) -> bytes:
    """sha256 over the job, the protocol parameters and every site's public key (sorted by site)."""
    doc = {"job": job_id, "params": dict(params), "keys": {s: table[s].hex() for s in sorted(table)}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).digest()


def encrypt(key: bytes, plaintext: bytes, aad: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad.encode())


def decrypt(key: bytes, ciphertext: bytes, aad: str) -> bytes:
    if not isinstance(ciphertext, bytes) or len(ciphertext) <= NONCE_BYTES:
        raise KeyMaterialError("malformed ciphertext")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad.encode())
    except InvalidTag:
        raise KeyMaterialError(f"ciphertext does not authenticate ({aad})") from None


def tag(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def tags_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
