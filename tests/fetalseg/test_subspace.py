"""Trained-parameter specs on the bundle network: what each selects, that adapters start at the identity, that
training a view changes only what it should, and that merge-back gives the bundle's own keys."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fetalseg import subspace
from fetalseg.bundle import Bundle

X_SHAPE = (1, 1, 16, 16, 16)


@pytest.fixture
def network() -> nn.Module:
    torch.manual_seed(0)
    return Bundle("common").network().cpu()


def _convs(net: nn.Module) -> list[nn.modules.conv._ConvNd]:
    return [m for m in net.modules() if isinstance(m, nn.modules.conv._ConvNd)]


def _random_basis(net: nn.Module, k: int, *, seed: int = 0) -> dict:
    d = sum(p.numel() for p in net.parameters())
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return {
        "basis": q,
        "names": [n for n, _ in net.named_parameters()],
        "shapes": [list(p.shape) for p in net.parameters()],
        "provenance": {"test": True},
    }


def _step(view: subspace.TrainableView, x: torch.Tensor, lr: float = 1e-2) -> None:
    opt = torch.optim.SGD(view.parameters(), lr=lr)
    opt.zero_grad()
    view.module(x).square().mean().backward()
    opt.step()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("norm", 688), ("bias", 248), ("head", 8648), ("norm+bias", 936), ("norm+bias+head", 9576), ("all", 606496)],
)
def test_group_specs_train_exactly_their_weights(network: nn.Module, spec: str, expected: int) -> None:
    view = subspace.trainable_view(network, spec)
    assert view.module is network and view.n_trained == expected
    assert subspace.count(network, view.names) == expected
    assert {n for n, p in network.named_parameters() if p.requires_grad} == set(view.names)


@pytest.mark.parametrize("rank", [4, 8])
def test_lora_trains_rank_times_rows_plus_columns_per_convolution(network: nn.Module, rank: int) -> None:
    expected = sum(rank * (c.weight.shape[0] + c.weight[0].numel()) for c in _convs(network))
    view = subspace.trainable_view(network, f"lora:{rank}")
    assert view.n_trained == expected
    assert len(view.names) == len(_convs(network)) and all(n.endswith(".weight") for n in view.names)
    assert not any(p.requires_grad for p in network.parameters())  # the network itself is frozen


@pytest.mark.parametrize(
    "spec",
    ["", "nrom", "norm+", "norm:3", "lora", "lora:", "lora:0", "lora:x", "lora:-2", "pgrad:1.5", "lora:4+norm",
     "all+norm", "lorax:4"],
)  # fmt: skip
def test_unknown_or_malformed_specs_raise(network: nn.Module, spec: str) -> None:
    with pytest.raises(ValueError):
        subspace.validate_spec(spec)
    with pytest.raises(ValueError):
        subspace.trainable_view(network, spec)


def test_pgrad_without_a_basis_or_with_too_few_directions_raises(network: nn.Module) -> None:
    with pytest.raises(ValueError, match="basis"):
        subspace.trainable_view(network, "pgrad:4")
    with pytest.raises(ValueError, match="only 2 directions"):
        subspace.trainable_view(network, "pgrad:4", basis=_random_basis(network, 2))


def test_pgrad_basis_of_another_network_is_refused(network: nn.Module) -> None:
    basis = _random_basis(network, 2)
    basis["shapes"][0] = [1, 2, 3]
    with pytest.raises(ValueError, match="does not describe"):
        subspace.trainable_view(network, "pgrad:2", basis=basis)


@pytest.mark.parametrize("spec", ["lora:4", "pgrad:8"])
def test_adapters_leave_the_model_unchanged_at_start(network: nn.Module, spec: str) -> None:
    network = network.double()
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    with torch.no_grad():
        before = network(x)
    view = subspace.trainable_view(network, spec, basis=_random_basis(network, 8))
    with torch.no_grad():
        after = view.module(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-12)


def test_training_lora_changes_only_convolution_weights_after_merge_back(network: nn.Module) -> None:
    network = network.double()
    start = {k: v.clone() for k, v in network.state_dict().items()}
    view = subspace.trainable_view(network, "lora:4")
    x = torch.rand(X_SHAPE, dtype=torch.float64)
    _step(view, x)
    _step(view, x)  # the second step moves A too (B is no longer zero)
    with torch.no_grad():
        trained_out = view.module(x)
    merged = view.merge_back()
    assert sorted(merged) == sorted(view.names) and set(merged) <= set(network.state_dict())
    now = network.state_dict()
    changed = {k for k in start if not torch.equal(start[k], now[k])}
    assert changed and changed <= set(view.names)
    assert all(torch.count_nonzero(b) == 0 for b in view.module.b)  # reset: the adapter is the identity again
    with torch.no_grad():  # the merged network alone is the trained model
        torch.testing.assert_close(network(x), trained_out, rtol=0, atol=1e-10)


def test_training_pgrad_moves_the_weights_only_inside_the_basis_span(network: nn.Module) -> None:
    network = network.double()
    basis = _random_basis(network, 8)
    start = torch.cat([p.detach().reshape(-1).clone() for p in network.parameters()])
    view = subspace.trainable_view(network, "pgrad:8", basis=basis)
    assert view.n_trained == 8 and view.names == [n for n, _ in network.named_parameters()]
    _step(view, torch.rand(X_SHAPE, dtype=torch.float64), lr=1.0)
    view.merge_back()
    delta = torch.cat([p.detach().reshape(-1) for p in network.parameters()]) - start
    u = basis["basis"]
    assert delta.norm() > 1e-6
    assert (delta - u @ (u.T @ delta)).norm() <= 1e-9 * max(1.0, float(delta.norm()))
    assert torch.count_nonzero(view.module.coefficients) == 0


def test_training_a_group_view_changes_only_its_group(network: nn.Module) -> None:
    start = {k: v.clone() for k, v in network.state_dict().items()}
    view = subspace.trainable_view(network, "norm+bias")
    _step(view, torch.rand(X_SHAPE))
    merged = view.merge_back()
    now = network.state_dict()
    changed = {k for k in start if not torch.equal(start[k], now[k])}
    assert changed and changed <= set(view.names) == set(merged)


class _Wrapped(nn.Module):
    """Like the NVFlare job's network: the bundle's under ``net.``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_a_basis_of_the_bundle_network_fits_the_job_network_under_its_prefix(network: nn.Module) -> None:
    basis = _random_basis(network, 4)
    view = subspace.trainable_view(_Wrapped(network), "pgrad:4", basis=basis)
    assert view.names[0].startswith("net.") and len(view.names) == len(basis["names"])


def test_gradient_basis_is_orthonormal_with_provenance_and_round_trips(network: nn.Module, tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    out_shape = (1, network(torch.zeros(X_SHAPE)).shape[1], *X_SHAPE[2:])
    samples = [(torch.rand(X_SHAPE, generator=gen), torch.rand(out_shape, generator=gen)) for _ in range(6)]
    record = subspace.gradient_basis(network, nn.functional.mse_loss, samples, 3, provenance={"data": "public"})
    u = record["basis"]
    d = sum(p.numel() for p in network.parameters())
    assert u.shape == (d, 3) and record["provenance"]["data"] == "public" and record["provenance"]["samples"] == 6
    u64 = u.double()  # a float32 product over ~0.6 M rows is itself off by ~1e-3
    torch.testing.assert_close(u64.T @ u64, torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    loaded = subspace.load_basis(subspace.save_basis(record, tmp_path / "public.pgrad.pt"))
    assert torch.equal(loaded["basis"], u) and loaded["names"] == record["names"]
    with pytest.raises(ValueError, match="at least 8"):
        subspace.gradient_basis(network, nn.functional.mse_loss, samples, 8)
