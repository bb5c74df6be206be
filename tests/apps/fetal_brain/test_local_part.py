"""The served site model = shared global checkpoint + this site's local part (never sent): the store loads both
(strictly), ``/info/`` says which part is which, ``install-model --local`` installs both, and nothing hands out a
model holding a local part (``install-model`` as the served model, ``GET /model/<name>`` on the real server)."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.lib.errors import InputError
from apps.fetal_brain.lib.model_store import ModelStore
from fetalseg.bundle import save_checkpoint
from fetalseg.local_part import NEVER_SENT, save_local_part
from fetalseg.subspace import parameter_names

PRIVACY = {"epsilon": 7.5, "delta": 1e-5, "accountant": "prv", "privacy_unit": "one patient", "mechanism": "DP-SGD"}


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    bundle = AppConfig.from_conf({"variant": "tiny"}, env={}).bundle("inference")
    return ModelStore(tmp_path / "model" / "model.pt", bundle=bundle)


def _global(store: ModelStore, path: Path, seed: int = 1) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    network = store.bundle.network()
    return save_checkpoint(network, path, origin="nvflare", job_id="job-1", round=3), network


def _local(store: ModelStore, path: Path, *, value: float = 0.5, extra: dict | None = None) -> tuple[Path, dict]:
    names = parameter_names(store.bundle.network(), "norm")
    params = dict(store.bundle.network().named_parameters())
    tensors = {n: torch.full_like(params[n], value) for n in names}
    tensors.update(extra or {})
    info = dict(job_id="job-1", site="site-1", training_cases=7, fine_tune_epochs=2, shared_privacy=PRIVACY)
    return save_local_part(tensors, path, parameters="norm", **info), tensors


def test_store_serves_global_with_the_local_part_over_it(store: ModelStore, tmp_path: Path) -> None:
    _, network = _global(store, store.path)
    _, tensors = _local(store, store.local_part_path)
    served = dict(store.current().network.named_parameters())
    assert all(torch.equal(served[k].detach(), v) for k, v in tensors.items())
    other = next(k for k, _ in network.named_parameters() if k not in tensors)
    assert torch.equal(served[other].detach(), dict(network.named_parameters())[other].detach())


def test_a_local_part_that_does_not_fit_the_network_is_refused(store: ModelStore) -> None:
    _global(store, store.path)
    _local(store, store.local_part_path, extra={"not.a.parameter": torch.zeros(3)})
    with pytest.raises(InputError, match="not parameters of the network") as info:
        store.current()
    assert info.value.status == 503


def test_describe_says_which_part_is_shared_and_which_is_local(store: ModelStore) -> None:
    _global(store, store.path)
    _local(store, store.local_part_path)
    parts = store.describe()["parts"]
    assert parts["shared"]["privacy"] == PRIVACY and parts["shared"]["job_id"] == "job-1"
    local = parts["local"]
    assert local["sharing"] == NEVER_SENT and local["training_cases"] == 7 and "without DP" in local["learned"]
    assert local["weights"] == sum(p.numel() for p in _local(store, store.path.with_name("x.pt"))[1].values())


def test_without_a_local_part_only_the_shared_part_is_described(store: ModelStore) -> None:
    _global(store, store.path)
    parts = store.describe()["parts"]
    assert parts["local"] is None and parts["shared"]["privacy"]["dp"] is False


def _install(tmp_path: Path, source: Path, *extra: str) -> int:
    from fetal_fl.cli import main

    argv = ["app", "install-model", str(source), "--model-path", str(tmp_path / "served" / "model.pt")]
    return main([*argv, *extra, "--conf", "variant", "tiny"])


def test_install_model_installs_global_and_local(store: ModelStore, tmp_path: Path, capsys) -> None:
    source, _ = _global(store, tmp_path / "global.pt")
    part, tensors = _local(store, tmp_path / "local_site-1_job-1.pt")
    assert _install(tmp_path, source, "--local", str(part)) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["origin"] == "nvflare" and described["parts"]["local"]["parameters"] == "norm"
    installed = ModelStore(tmp_path / "served" / "model.pt", bundle=store.bundle)
    served = dict(installed.current().network.named_parameters())
    assert all(torch.equal(served[k].detach(), v) for k, v in tensors.items())


def test_install_model_refuses_a_local_part_as_the_served_model(store: ModelStore, tmp_path: Path, capsys) -> None:
    part, _ = _local(store, tmp_path / "local.pt")
    assert _install(tmp_path, part) == 2
    assert "local part" in capsys.readouterr().err and not (tmp_path / "served").exists()


def test_install_model_refuses_a_local_part_that_does_not_fit(store: ModelStore, tmp_path: Path, capsys) -> None:
    source, _ = _global(store, tmp_path / "global.pt")
    part, _ = _local(store, tmp_path / "local.pt", extra={"net.extra": torch.zeros(1)})
    assert _install(tmp_path, source, "--local", str(part)) == 2
    assert "not parameters" in capsys.readouterr().err and not (tmp_path / "served").exists()


# -- the real server -------------------------------------------------------------------------------------------
@pytest.fixture
def installed(server, store: ModelStore):
    """Global + local installed in the session server's model folder; the folder is restored afterwards."""
    folder = server.model_path.parent
    backup = folder.with_name("model_backup")
    if folder.exists():
        shutil.copytree(folder, backup)
    _, network = _global(store, server.model_path)
    _, tensors = _local(store, server.model_path.with_name("local_part.pt"))
    yield network, tensors
    shutil.rmtree(folder, ignore_errors=True)
    if backup.exists():
        backup.rename(folder)


def test_info_shows_the_shared_and_the_local_part(server, installed) -> None:
    parts = server.info()["models"]["fetal_brain_seg"]["model"]["parts"]
    assert parts["shared"]["privacy"]["epsilon"] == PRIVACY["epsilon"]
    assert parts["local"]["sharing"] == NEVER_SENT and parts["local"]["training_cases"] == 7


def test_get_model_hands_out_only_the_shared_part(server, installed) -> None:
    network, tensors = installed
    response = server.get("/model/fetal_brain_seg")
    assert response.status_code == 200, response.text
    state = torch.load(io.BytesIO(response.content), weights_only=True)["model"]
    assert set(state) == set(network.state_dict())
    assert all(torch.equal(state[k], network.state_dict()[k]) for k in tensors)  # global values, not local
    assert not any(torch.equal(state[k], v) for k, v in tensors.items())


def test_get_model_refuses_a_model_fine_tuned_at_this_site(server, installed, store: ModelStore) -> None:
    save_checkpoint(store.bundle.network(), server.model_path, origin="local-finetune")
    response = server.get("/model/fetal_brain_seg")
    assert response.status_code == 403 and NEVER_SENT in response.json()["detail"]
