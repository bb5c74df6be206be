"""Everything CrypTen 0.4.1 needs to run here, in one place: the import alias, the settings, a bounded start-up.

CrypTen 0.4.1 predates torch 2.13. Each shim below names the torch (or CrypTen) behaviour it works around and is
pinned by a test in ``tests/privacy/encrypted_inference/test_shims.py``, so a torch or CrypTen upgrade that makes a
shim unnecessary (or wrong) fails there first:

* ``torch.onnx._internal.registration`` moved to ``torch.onnx._internal.torchscript_exporter.registration``;
  CrypTen's ONNX converter imports the old name at ``import crypten``. We alias the module (CrypTen's ONNX path is
  never used: the network is walked directly, see :mod:`privacy.encrypted_inference.layers`).
* Fractional bits: see :data:`PRECISION_BITS` (more bits = finer values but more frequent two-party truncation
  failures; CrypTen's 16 is kept unless ``FETAL_FL_CRYPTEN_PRECISION_BITS`` says otherwise).
* CrypTen's Newton inverse square root runs 3 iterations from a start that is accurate only for inputs ~0.1-200;
  instance norm needs more (10) and calibrated inputs (see ``layers.calibrate_instance_norm``).
* ``crypten.init`` calls ``torch.distributed.init_process_group`` without a timeout (gloo's default is 30 min):
  a peer that never comes would hang a party for half an hour. :func:`init_party` passes ours.
* CrypTen has no 3D convolution: :func:`local` applies a linear, share-wise torch function (slicing, padding,
  zero insertion, permutes) to each party's share without communication, which the layers build on.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from fetalseg.settings import CryptenSettings

CRYPTEN_VERSION = "0.4.1"
# Fractional bits of the fixed point. 20 took the tiny network's agreement (one party) from 99.83 % to 99.997 %, but
# two-party local truncation fails with probability ~|v|·2**(2·bits)/2**63 per product (a huge wrong value that the
# next instance norm spreads over its window): at 20 bits a whole 64³ volume (8 windows of 48³) agreed on only 63 %.
# 16 (CrypTen's default) makes such failures 256x rarer. Both parties must use the same (it is in the fingerprint).
PRECISION_BITS = CryptenSettings.load().crypten_precision_bits  # $FETAL_FL_CRYPTEN_PRECISION_BITS, default 16
SQRT_NEWTON_ITERATIONS = 10  # CrypTen default 3; instance norm needs 10 (measured: 12 % -> 99.97 % agreement)
_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


class CryptenUnavailableError(RuntimeError):
    """CrypTen is not installed (``make install`` installs it; see docs/encrypted_inference.md)."""


def alias_onnx_registration() -> bool:
    """Make the torch-internal module CrypTen imports by its old name importable; True if an alias was needed."""
    try:
        importlib.import_module(_OLD_REGISTRATION)
        return False
    except ModuleNotFoundError:
        sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)
        return True


@functools.cache
def crypten_module() -> Any:
    """``import crypten`` with the shims applied and the project's settings; raises :class:`CryptenUnavailableError`."""
    alias_onnx_registration()
    try:
        import crypten
    except ImportError as exc:
        raise CryptenUnavailableError(
            f"CrypTen {CRYPTEN_VERSION} is not importable ({exc}); install it with "
            f"`pip install --no-deps crypten=={CRYPTEN_VERSION} onnx omegaconf` (the Makefile does)"
        ) from exc
    crypten.cfg.functions.sqrt_nr_iters = SQRT_NEWTON_ITERATIONS
    crypten.cfg.encoder.precision_bits = PRECISION_BITS
    crypten.cfg.mpc.provider = "TTP"  # a separate dealer process makes the Beaver triples
    crypten.cfg.communicator.verbose = True  # count bytes (CrypTen's own accounting)
    return crypten


@contextlib.contextmanager
def _init_process_group_timeout(timeout_s: float) -> Iterator[None]:
    """While CrypTen starts, ``torch.distributed.init_process_group`` gets ``timeout`` unless given one."""
    dist = torch.distributed
    original = dist.init_process_group

    @functools.wraps(original)
    def with_timeout(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", datetime.timedelta(seconds=timeout_s))
        return original(*args, **kwargs)

    dist.init_process_group = with_timeout
    try:
        yield
    finally:
        dist.init_process_group = original


def init_party(*, rank: int, rendezvous: str, timeout_s: float, world_size: int = 2) -> Any:
    """Join a CrypTen session: ranks 0 (model owner) and 1 (data owner); rank ``world_size`` is the dealer.

    Gloo on the rendezvous address (``tcp://127.0.0.1:PORT``, hosted by rank 0); every collective then fails after
    ``timeout_s`` instead of gloo's 30 minutes. Returns the ``crypten`` module.
    """
    crypten = crypten_module()
    os.environ.update(
        DISTRIBUTED_BACKEND="gloo", RENDEZVOUS=rendezvous, WORLD_SIZE=str(world_size), RANK=str(int(rank))
    )
    if rendezvous.startswith(("tcp://127.", "tcp://localhost:")):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo would otherwise pick the first interface
    with _init_process_group_timeout(timeout_s):
        if rank == world_size:  # the dealer: CrypTen's TTP server runs its request loop inside its constructor
            from crypten.mpc.provider.ttp_provider import TTPServer

            TTPServer()
        else:
            crypten.init()
    return crypten


def communication_stats() -> dict[str, float]:
    """CrypTen's count for this party: rounds and bytes sent plus received (8 bytes per ring element)."""
    comm = crypten_module().communicator.get()
    stats = comm.get_communication_stats()
    return {"rounds": int(stats["rounds"]), "bytes": float(stats["bytes"])}


def local(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to each party's share of the encrypted tensor ``x``, with no communication.

    Correct only for ``fn`` linear and zero-preserving (slices, permutes, reshapes, zero padding, zero insertion,
    sums of slices): then the shares of ``fn(x)`` add up to ``fn`` of the secret. The fixed-point scale is kept.
    """
    out = x.shallow_copy()
    out._tensor = x._tensor.shallow_copy()
    out._tensor.share = fn(x._tensor.share)
    return out
