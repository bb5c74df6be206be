"""The federated model is exactly the bundle's network, and its checkpoints load where the bundle's do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fetalseg.bundle import Bundle, load_checkpoint
from nvflare_jobs.fetal_brain.model import PREFIX, FetalBrainNet, save_bundle_checkpoint

OVERRIDES = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}


def test_wraps_the_bundle_network_without_retyping_it() -> None:
    model = FetalBrainNet(OVERRIDES)
    reference = Bundle("common", overrides=OVERRIDES).network()
    assert type(model.net) is type(reference)
    assert list(model.state_dict()) == [PREFIX + k for k in reference.state_dict()]
    assert all(a.shape == b.shape for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    out = model(torch.zeros(1, 1, 32, 32, 32))
    assert out.shape == (1, Bundle("common").num_classes, 32, 32, 32)


def test_initialisation_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = FetalBrainNet(OVERRIDES, init_seed=7)
    assert torch.equal(torch.rand(1), before)  # fork_rng: the caller's random stream is untouched
    b = FetalBrainNet(OVERRIDES, init_seed=7)
    c = FetalBrainNet(OVERRIDES, init_seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_bundle_checkpoint_loads_into_the_bundles_own_network(tmp_path: Path) -> None:
    model = FetalBrainNet(OVERRIDES, init_seed=3)
    params = {k: v.numpy() for k, v in model.state_dict().items()}  # what NVFlare's server holds
    path = save_bundle_checkpoint(params, tmp_path / "best.pt", bundle_overrides=OVERRIDES, origin="nvflare", round=4)
    net = Bundle("common", overrides=OVERRIDES).network()
    info = load_checkpoint(net, path)
    assert info["origin"] == "nvflare" and info["round"] == 4 and info["bundle_overrides"] == OVERRIDES
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), model.net.state_dict().values()))


def test_bundle_checkpoint_refuses_weights_of_another_network(tmp_path: Path) -> None:
    params = dict(FetalBrainNet(OVERRIDES).state_dict())
    params.pop(next(iter(params)))
    with pytest.raises(RuntimeError):
        save_bundle_checkpoint(params, tmp_path / "x.pt", bundle_overrides=OVERRIDES)
    assert not (tmp_path / "x.pt").exists()
