"""Each CrypTen shim pinned to the torch / CrypTen behaviour it works around: when an upgrade removes the reason,
the matching test fails and says which shim to drop."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

from privacy.encrypted_inference import shims


def test_torch_moved_the_onnx_registration_module_crypten_imports():
    import sys

    saved = sys.modules.pop(shims._OLD_REGISTRATION, None)
    try:
        with pytest.raises(ModuleNotFoundError):  # torch 2.13: still moved (else drop alias_onnx_registration)
            importlib.import_module(shims._OLD_REGISTRATION)
        assert shims.alias_onnx_registration() is True
        assert importlib.import_module(shims._OLD_REGISTRATION).__name__ == shims._NEW_REGISTRATION
        assert shims.alias_onnx_registration() is False  # idempotent
    finally:
        if saved is not None:
            sys.modules[shims._OLD_REGISTRATION] = saved


def test_crypten_starts_gloo_without_a_timeout_so_init_party_passes_one(monkeypatch):
    from crypten.communicator.distributed_communicator import DistributedCommunicator

    source = inspect.getsource(DistributedCommunicator.__init__)
    assert "init_process_group(" in source and "timeout" not in source  # else drop _init_process_group_timeout
    seen = {}
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: seen.update(k))
    with shims._init_process_group_timeout(7.0):
        torch.distributed.init_process_group(backend="gloo")
    assert seen["timeout"].total_seconds() == 7.0
    with shims._init_process_group_timeout(7.0):
        torch.distributed.init_process_group(backend="gloo", timeout=3)
    assert seen["timeout"] == 3  # an explicit timeout wins
    assert torch.distributed.init_process_group is not None and "with_timeout" not in repr(
        torch.distributed.init_process_group
    )


def test_settings_applied():
    cr = shims.crypten_module()
    assert cr.cfg.functions.sqrt_nr_iters == shims.SQRT_NEWTON_ITERATIONS
    assert cr.cfg.mpc.provider in ("TTP", "TFP")  # TFP only while the one-party fixture runs


@pytest.mark.parametrize("value", [0.01, 1.0, 150.0])
def test_newton_inverse_sqrt_needs_more_than_crypten_default_iterations(one_party, value):
    cr = one_party
    x = cr.cryptensor(torch.tensor([value]))
    true = value**-0.5
    cr.cfg.functions.sqrt_nr_iters = 3  # CrypTen's default
    try:
        default = float(x.inv_sqrt().get_plain_text())
    finally:
        cr.cfg.functions.sqrt_nr_iters = shims.SQRT_NEWTON_ITERATIONS
    ours = float(x.inv_sqrt().get_plain_text())
    assert abs(ours - true) / true < 0.01
    if value == 0.01:  # far from the Newton start: 3 iterations are far off, which is why the shim sets 10
        assert abs(default - true) / true > 0.1


def test_local_applies_a_linear_function_to_the_shares(one_party):
    cr = one_party
    t = torch.arange(24.0).reshape(2, 3, 4) / 7
    x = cr.cryptensor(t)
    y = shims.local(x, lambda s: torch.nn.functional.pad(s.permute(2, 0, 1), (1, 1)))
    assert torch.allclose(y.get_plain_text(), torch.nn.functional.pad(t.permute(2, 0, 1), (1, 1)), atol=1e-4)
    assert torch.allclose(x.get_plain_text(), t, atol=1e-4)  # the input is untouched
