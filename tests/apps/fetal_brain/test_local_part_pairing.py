"""A local part is served only on the global model it was learned with (issue 24): the store, ``/info/`` and
``install-model --local`` check keys, shapes, job id and the hash of the global model's shared weights; a mismatch
serves nothing (503) or installs nothing, with an error that says what to install."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.lib.errors import InputError
from apps.fetal_brain.lib.model_store import HISTORY_DIR, ModelStore
from fetalseg.bundle import save_checkpoint
from fetalseg.local_part import save_local_part, shared_part_hash
from fetalseg.subspace import parameter_names


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    bundle = AppConfig.from_conf({"variant": "tiny"}, env={}).bundle("inference")
    return ModelStore(tmp_path / "model" / "model.pt", bundle=bundle)


def _network(store: ModelStore, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return store.bundle.network()


def _global(store: ModelStore, path: Path, *, seed: int = 1, job: str = "job-1", rnd: int = 3) -> torch.nn.Module:
    network = _network(store, seed)
    save_checkpoint(network, path, origin="nvflare", job_id=job, round=rnd)
    return network


def _local(store: ModelStore, path: Path, learned_with: torch.nn.Module | None, **info) -> dict[str, torch.Tensor]:
    """A local part as the NVFlare client writes it; ``learned_with``: the global model whose hash it records."""
    names = parameter_names(store.bundle.network(), "norm")
    params = dict(store.bundle.network().named_parameters())
    tensors = {n: torch.full_like(params[n], 0.25) for n in names}
    if learned_with is not None:
        info.setdefault("global_model_sha256", shared_part_hash(learned_with.state_dict(), tensors))
    info = {"job_id": "job-1", "site": "site-1", "global_round": 3, **info}
    save_local_part(tensors, path, parameters="norm", **info)
    return tensors


def _served(store: ModelStore) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in store.current().network.named_parameters()}


def test_the_pair_it_was_learned_with_is_served(store: ModelStore) -> None:
    network = _global(store, store.path)
    tensors = _local(store, store.local_part_path, network)
    served = _served(store)
    assert all(torch.equal(served[k], v) for k, v in tensors.items())
    local = store.describe()["parts"]["local"]
    assert local["matches_global"] is True and local["global_round"] == 3


def test_a_local_part_learned_on_another_global_model_is_not_served(store: ModelStore) -> None:
    _global(store, store.path, seed=1)
    _local(store, store.local_part_path, _network(store, 2))  # e.g. the round N-1 or the best, not the final model
    with pytest.raises(InputError) as err:
        store.current()
    assert err.value.status == 503
    message = str(err.value)
    assert "shared weights sha256" in message and "install-model" in message and "job 'job-1'" in message
    described = store.describe()["parts"]["local"]
    assert "error" in described and "matches_global" not in described


@pytest.mark.parametrize(
    ("global_facts", "local_facts", "match"),
    [
        ({"job": "job-2"}, {}, r"learned with job 'job-1'.*global model is from job 'job-2'"),
        ({"rnd": 2}, {}, r"after 3 round\(s\).*round 2"),
        ({}, {"job_id": None}, "records no global model"),
    ],
)
def test_without_a_hash_job_and_round_must_match(store, global_facts, local_facts, match) -> None:
    _global(store, store.path, **global_facts)
    _local(store, store.local_part_path, None, **local_facts)
    with pytest.raises(InputError, match=match):
        store.current()


def test_a_hash_match_does_not_excuse_another_job(store: ModelStore) -> None:
    network = _global(store, store.path, job="job-2")
    _local(store, store.local_part_path, network)
    with pytest.raises(InputError, match="job 'job-2'"):
        store.current()


def test_a_local_part_without_a_global_model_is_not_served(store: ModelStore) -> None:
    _local(store, store.local_part_path, _network(store, 1))
    with pytest.raises(InputError, match="no global model") as err:
        store.current()
    assert err.value.status == 503


def _install(tmp_path: Path, source: Path, *extra: str) -> int:
    from fetal_fl.cli import main

    argv = ["app", "install-model", str(source), "--model-path", str(tmp_path / "served" / "model.pt")]
    return main([*argv, *extra, "--conf", "variant", "tiny"])


def test_install_model_installs_a_matching_pair(store: ModelStore, tmp_path: Path, capsys) -> None:
    network = _global(store, tmp_path / "global.pt")
    tensors = _local(store, tmp_path / "local_site-1_job-1.pt", network)
    assert _install(tmp_path, tmp_path / "global.pt", "--local", str(tmp_path / "local_site-1_job-1.pt")) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["parts"]["local"]["matches_global"] is True
    installed = ModelStore(tmp_path / "served" / "model.pt", bundle=store.bundle)
    served = _served(installed)
    assert all(torch.equal(served[k], v) for k, v in tensors.items())


def test_install_model_installs_nothing_for_a_mismatched_pair(store: ModelStore, tmp_path: Path, capsys) -> None:
    _global(store, tmp_path / "old.pt", seed=5)
    assert _install(tmp_path, tmp_path / "old.pt") == 0  # what the site served until now
    capsys.readouterr()
    before = (tmp_path / "served" / "model.pt").read_bytes()
    _global(store, tmp_path / "global.pt", seed=1)
    _local(store, tmp_path / "local.pt", _network(store, 2))
    assert _install(tmp_path, tmp_path / "global.pt", "--local", str(tmp_path / "local.pt")) == 2
    err = capsys.readouterr().err
    assert "nothing installed" in err and "shared weights sha256" in err
    assert (tmp_path / "served" / "model.pt").read_bytes() == before  # the old model is still the served one
    assert not (tmp_path / "served" / "local_part.pt").exists()


def test_a_new_global_model_retires_the_local_part_of_the_old_one(store: ModelStore, tmp_path: Path, capsys) -> None:
    old = _global(store, tmp_path / "old.pt", seed=5)
    _local(store, tmp_path / "local.pt", old)
    assert _install(tmp_path, tmp_path / "old.pt", "--local", str(tmp_path / "local.pt")) == 0
    _global(store, tmp_path / "new.pt", seed=6)
    assert _install(tmp_path, tmp_path / "new.pt") == 0  # a new global model alone
    capsys.readouterr()
    served = tmp_path / "served"
    assert not (served / "local_part.pt").exists() and list((served / HISTORY_DIR).glob("local_part-*.pt"))
    ModelStore(served / "model.pt", bundle=store.bundle).current()  # the new global model is served
