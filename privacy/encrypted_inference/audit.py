"""What a party received, checked against the other party's secret: the test and benchmark evidence that neither
the scan nor the weights travel in the clear.

:class:`ReceivedAudit` wraps the CrypTen communicator of one party and, for every tensor that party receives or
learns from a collective (openings, the dealer's corrections, revealed outputs), counts its bytes and compares it with
a secret it is given (the OTHER party's input, known only to a test harness): how many received ring elements equal
a fixed-point encoding of a secret value, and the largest |Pearson correlation| between a received tensor and the
secret. Shares and Beaver openings are uniform on 2**64, so both stay near zero; a leak of the plaintext gives
hits and correlation 1 (``test_audit.py`` checks that the audit does flag one). The revealed result (the data
owner's logits, via ``reduce`` to itself) is what the protocol is meant to deliver: its bytes are counted apart and
it is not compared (logits of the weights' scale would "match" weight values by chance).

Enabled only through the environment (``FETAL_FL_PRIVATE_INFER_AUDIT`` = output JSON,
``FETAL_FL_PRIVATE_INFER_AUDIT_SECRET`` = a ``.npy`` of the other party's secret values); off in normal use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fetalseg.plumbing import atomic_write_json
from fetalseg.settings import PrivateInferAuditSettings, env_names
from privacy.encrypted_inference.shims import PRECISION_BITS

ENV_OUT = env_names(PrivateInferAuditSettings, "private_infer_audit")[0]
ENV_SECRET = env_names(PrivateInferAuditSettings, "private_infer_audit_secret")[0]
FIXED_POINT_SCALE = 2**PRECISION_BITS  # the encoder shims.crypten_module() configures
SAMPLE = 200_000  # elements compared per received tensor (hits); all of them are counted in bytes
MIN_CORRELATION_SIZE = 4_000  # below this, chance correlations of random data are too large to read
MIN_DISTINCTIVE = 2**8  # encodings this small (|v| < 2**-12) are not compared: opened random BITS are 0 or 1


def encode(values: np.ndarray) -> np.ndarray:
    """CrypTen's fixed-point encoding (round(v·2**PRECISION_BITS) as int64) of the secret ``values``, without the
    tiny ones: comparisons open masked random bits (0 or 1), which would "match" a weight of 1e-7."""
    v = np.round(np.asarray(values, dtype=np.float64).ravel() * FIXED_POINT_SCALE).astype(np.int64)
    return np.unique(v[np.abs(v) >= MIN_DISTINCTIVE])


class ReceivedAudit:
    """Accumulates what one party received; :meth:`summary` is JSON-ready."""

    def __init__(self, secret: np.ndarray) -> None:
        self.secret = np.asarray(secret, dtype=np.float64).ravel()
        self.encoded = encode(self.secret)
        self.bytes = 0
        self.tensors = 0
        self.elements_checked = 0
        self.hits = 0
        self.max_abs_correlation = 0.0
        self.hit_examples: list[list[Any]] = []
        self.revealed_bytes = 0

    def observe(self, tensor: Any, source: str = "", *, compare: bool = True) -> None:
        """Count ``tensor``'s bytes and, if ``compare``, check it against the secret."""
        if isinstance(tensor, (list, tuple)):
            for t in tensor:
                self.observe(t, source, compare=compare)
            return
        if not torch.is_tensor(tensor):
            return
        flat = tensor.detach().reshape(-1).cpu()
        self.bytes += flat.numel() * flat.element_size()
        self.tensors += 1
        if not compare:
            self.revealed_bytes += flat.numel() * flat.element_size()
            return
        if flat.dtype != torch.int64 or flat.numel() == 0:
            return
        values = flat.numpy()
        sample = values[:SAMPLE]
        self.elements_checked += sample.size
        hit = np.isin(sample, self.encoded)
        if hit.any() and len(self.hit_examples) < 8:
            self.hit_examples.append([source, list(tensor.shape), int(sample[hit][0]), int(hit.sum())])
        self.hits += int(hit.sum())
        k = min(values.size, self.secret.size)
        if k >= MIN_CORRELATION_SIZE:
            a, b = values[:k].astype(np.float64), self.secret[:k]
            if a.std() > 0 and b.std() > 0:
                self.max_abs_correlation = max(self.max_abs_correlation, abs(float(np.corrcoef(a, b)[0, 1])))

    def summary(self) -> dict[str, Any]:
        return {
            "received_bytes": self.bytes,
            "received_tensors": self.tensors,
            "elements_checked": self.elements_checked,
            "secret_values": int(self.encoded.size),
            "hits": self.hits,
            "max_abs_correlation": self.max_abs_correlation,
            "hit_examples": self.hit_examples,
            "revealed_result_bytes": self.revealed_bytes,
        }


_RECEIVING = ("recv", "all_reduce", "reduce", "all_gather", "gather", "scatter")


def install(comm: Any, audit: ReceivedAudit) -> None:
    """Wrap ``comm``'s receiving methods (on this instance only) so that ``audit`` sees what arrives."""
    rank = comm.get_rank()
    for name in _RECEIVING:
        original = getattr(comm, name)

        def wrapper(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            result = _original(*args, **kwargs)
            if _name == "reduce":  # only get_plain_text(dst=me): the result this party is meant to learn
                audit.observe(result, _name, compare=False)
            elif _name in ("all_gather", "gather") and isinstance(result, list):
                audit.observe([t for i, t in enumerate(result) if i != rank and t is not None], _name)
            else:
                audit.observe(result, _name)
            return result

        setattr(comm, name, wrapper)
    original_broadcast = comm.broadcast

    def broadcast(input: Any, src: int, *args: Any, **kwargs: Any) -> Any:
        result = original_broadcast(input, src, *args, **kwargs)
        if src != rank:
            audit.observe(result, f"broadcast from {src}")
        return result

    comm.broadcast = broadcast


def from_environment() -> tuple[ReceivedAudit, Path] | None:
    """The audit the environment asks for, or None (normal use)."""
    settings = PrivateInferAuditSettings.load()
    out, secret = settings.private_infer_audit, settings.private_infer_audit_secret
    if not out or not secret:
        return None
    return ReceivedAudit(np.load(secret)), Path(out)


def write(audit: ReceivedAudit, path: Path, **extra: Any) -> None:
    atomic_write_json(path, {**audit.summary(), **extra})
