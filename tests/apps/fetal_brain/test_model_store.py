"""The served checkpoint: reload on change, one whole model at a time, origin kept, foreign files checked."""

import pickle

import pytest
import torch

from apps.fetal_brain.lib.config import AppConfig
from apps.fetal_brain.lib.errors import InputError, NotFoundError, UnprocessableError
from apps.fetal_brain.lib.exchange import find_checkpoint, install_model
from apps.fetal_brain.lib.model_store import ModelStore, read_checkpoint
from fetalseg.bundle import save_checkpoint


@pytest.fixture
def store(tmp_path) -> ModelStore:
    config = AppConfig.from_conf({"variant": "tiny"}, env={})
    bundle = config.bundle("inference")
    return ModelStore(tmp_path / "model" / "model.pt", bundle=bundle)


def _params(network: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in network.parameters()])


def test_untrained_store_is_deterministic_and_says_so(store):
    first = store.current()
    assert first.stamp is None and first.info == {}
    other = ModelStore(store.path, bundle=store.bundle)
    assert torch.equal(_params(first.network), _params(other.current().network))
    described = store.describe()
    assert described["trained"] is False and described["origin"] == "untrained"


def test_publish_replaces_the_model_and_readers_reload(store):
    old = store.current()
    trained = store.bundle.network()
    described = store.publish(trained, origin="local-finetune", val_mean_dice=0.5)
    assert described["trained"] is True and described["origin"] == "local-finetune"
    assert described["val_mean_dice"] == 0.5 and len(described["sha256"]) == 64
    new = store.current()
    assert new.stamp != old.stamp
    assert torch.equal(_params(new.network), _params(trained))
    assert store.current() is new  # cached while the file is unchanged
    store.publish(store.bundle.network(), origin="second")
    assert len(list((store.path.parent / "history").glob("model-*.pt"))) == 1
    assert not list(store.path.parent.glob(".*.tmp"))  # no temp file left behind


def test_a_broken_served_model_is_a_503_not_a_client_error(store):
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError) as info:
        store.current()
    assert info.value.status == 503
    assert store.describe()["origin"] == "unreadable"


def test_read_checkpoint_strips_wrapper_prefixes(tmp_path, store):
    network = store.bundle.network()
    wrapped = {f"_module.{k}": v for k, v in network.state_dict().items()}
    torch.save({"model": wrapped, "round": 3}, tmp_path / "opacus.pt")
    state, info = read_checkpoint(tmp_path / "opacus.pt")
    assert set(state) == set(network.state_dict()) and info == {"round": 3}
    torch.save(network.state_dict(), tmp_path / "bare.pt")
    assert set(read_checkpoint(tmp_path / "bare.pt")[0]) == set(network.state_dict())


class Payload:
    """Stands for arbitrary pickled code in a checkpoint from elsewhere."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_objects_are_not_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": {"w": Payload()}}, fh)
    with pytest.raises(UnprocessableError, match="trust-pickle"):
        read_checkpoint(path)
    assert "must never run" not in capsys.readouterr().out


def test_install_keeps_origin_and_refuses_models_that_do_not_fit(tmp_path, store):
    good = tmp_path / "job" / "app_server" / "FL_global_model.pt"
    good.parent.mkdir(parents=True)
    save_checkpoint(store.bundle.network(), good, origin="nvflare", job_id="j1", round=4)
    described = install_model(tmp_path / "job", store=store)
    assert (described["origin"], described["job_id"], described["round"]) == ("nvflare", "j1", 4)
    assert described["source_sha256"] and described["installed_from"] == str(good.resolve())
    overridden = install_model(good, store=store, origin="fedavg", job_id="j2", fl_round=9)
    assert (overridden["origin"], overridden["job_id"], overridden["round"]) == ("fedavg", "j2", 9)

    served = store.path.read_bytes()
    bigger = AppConfig.from_conf({"bundle_overrides": '{"num_classes": 5}'}, env={}).bundle("inference").network()
    save_checkpoint(bigger, tmp_path / "other.pt")
    with pytest.raises(UnprocessableError, match="does not fit"):
        install_model(tmp_path / "other.pt", store=store)
    broken = store.bundle.network()
    with torch.no_grad():
        next(broken.parameters()).fill_(float("nan"))
    save_checkpoint(broken, tmp_path / "nan.pt")
    with pytest.raises(UnprocessableError, match="NaN"):
        install_model(tmp_path / "nan.pt", store=store)
    assert store.path.read_bytes() == served  # nothing replaced by a refused model


def test_find_checkpoint_needs_one_candidate(tmp_path):
    with pytest.raises(NotFoundError):
        find_checkpoint(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "FL_global_model.pt").write_bytes(b"x")
    (tmp_path / "b" / "FL_global_model.pt").write_bytes(b"x")
    with pytest.raises(InputError, match="name the one"):
        find_checkpoint(tmp_path)
    assert find_checkpoint(tmp_path / "a") == tmp_path / "a" / "FL_global_model.pt"


def test_nvflare_persistor_file_installs_with_its_round(tmp_path, store):
    """NVFlare's own FL_global_model.pt: wrapper-prefixed keys (``net.``) and the round in ``meta_props``."""
    network = store.bundle.network()
    state = {f"net.{k}": v for k, v in network.state_dict().items()}
    path = tmp_path / "ws" / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model": state, "meta_props": {"current_round": 5}, "train_conf": {"train": {"model": "X"}}}, path)
    described = install_model(tmp_path / "ws", store=store, job_id="sim-1")
    assert (described["origin"], described["job_id"], described["round"]) == ("federated", "sim-1", 5)
    assert "train_conf" not in described
    assert torch.equal(_params(store.current().network), _params(network))


def test_model_trained_on_another_grid_is_refused_unless_allowed(tmp_path, store):
    path = tmp_path / "coarse.pt"
    save_checkpoint(store.bundle.network(), path, origin="nvflare", bundle_overrides={"pixdim": [2, 2, 2]})
    with pytest.raises(UnprocessableError, match="pixdim"):
        install_model(path, store=store)
    assert not store.path.exists()
    assert install_model(path, store=store, allow_grid_mismatch=True)["origin"] == "nvflare"
