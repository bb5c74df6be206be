"""CrypTen in this test process: one party (world size 1, trusted-first-party triples) for the layer tests.

With one party the shares are the fixed-point plaintext, so these tests pin the arithmetic of each encrypted layer
(fixed point, Newton, comparisons) against torch; the two-party protocol is tested between real processes in
``test_protocol.py``.
"""

from __future__ import annotations

import os

import pytest

from privacy.encrypted_inference.shims import CryptenUnavailableError, crypten_module

try:
    crypten_module()
except CryptenUnavailableError as exc:  # make install installs it; a bare venv may not have it
    pytest.skip(f"skipped: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def one_party(tmp_path_factory):
    cr = crypten_module()
    saved = {k: os.environ.get(k) for k in ("DISTRIBUTED_BACKEND", "RENDEZVOUS", "WORLD_SIZE", "RANK")}
    provider = cr.cfg.mpc.provider
    cr.cfg.mpc.provider = "TFP"
    rendezvous = tmp_path_factory.mktemp("crypten") / "rendezvous"
    os.environ.update(DISTRIBUTED_BACKEND="gloo", RENDEZVOUS=f"file://{rendezvous}", WORLD_SIZE="1", RANK="0")
    cr.init()
    try:
        yield cr
    finally:
        cr.uninit()
        cr.cfg.mpc.provider = provider
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
