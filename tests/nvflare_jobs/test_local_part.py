"""The site-local part (``local`` in the job config): validated before training, kept by the site across rounds,
never in a site's update, written to the site's state folder with only its own tensors; and the federated job's
exits (``fetal-fl fl`` with an initial checkpoint) refuse a model that holds a local part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fetalseg.local_part import NEVER_SENT, read_local_part, save_local_part
from fetalseg.subspace import parameter_names
from nvflare_jobs.config import ConfigError, JobConfig
from nvflare_jobs.fetal_brain.client import SiteTrainer
from nvflare_jobs.fetal_brain.model import FetalBrainNet


def _config(make_config, local=None, **changes) -> JobConfig:
    return JobConfig.from_dict(make_config(**({"local": local} if local is not None else {}), **changes))


def test_no_local_section_keeps_every_weight_shared(make_config) -> None:
    config = _config(make_config)
    assert (config.local_parameters, config.local_fine_tune_epochs) == ("none", 0)


def test_local_section_is_parsed(make_config) -> None:
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 2})
    assert (config.local_parameters, config.local_fine_tune_epochs) == ("norm", 2)


@pytest.mark.parametrize(
    "local",
    [
        {"parameters": "nrom"},
        {"parameters": "all"},
        {"parameters": "norm", "fine_tune_epochs": -1},
        {"parameters": "none", "fine_tune_epochs": 1},
        {"parameters": "norm", "epochs": 1},
        "norm",
    ],
)
def test_bad_local_section_stops_the_job_before_training(make_config, local) -> None:
    with pytest.raises(ConfigError, match="local"):
        _config(make_config, local)


def test_local_group_that_is_also_sent_is_refused(make_config) -> None:
    with pytest.raises(ConfigError, match=r"overlaps training\.trained_parameters"):
        _config(make_config, {"parameters": "norm"}, training={"trained_parameters": "norm+head"})


def _global_params(config: JobConfig, seed: int) -> dict:
    return {k: v.numpy() for k, v in FetalBrainNet(config.bundle_overrides, init_seed=seed).state_dict().items()}


def test_update_never_holds_local_keys_and_the_site_keeps_its_local_part(make_config, site_env: Path) -> None:
    config = _config(make_config, {"parameters": "norm"})
    trainer = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    local = [f"net.{n}" for n in parameter_names(trainer.model.net, "norm")]
    state = trainer.load_global(_global_params(config, 0))
    trainer.train_round()
    diff = trainer.weight_diff(state)
    assert diff and not set(diff) & set(local) and set(diff) | set(local) == set(state)
    trained = {k: v.clone() for k, v in trainer.model.state_dict().items() if k in local}
    assert any(not torch.equal(trained[k], state[k]) for k in local)  # the local part learned something
    trainer.load_global(_global_params(config, 1))  # round 2: the server's values for local keys are ignored
    now = trainer.model.state_dict()
    assert all(torch.equal(now[k], trained[k]) for k in local)
    other = next(k for k in now if k not in local)
    assert torch.equal(now[other], torch.as_tensor(_global_params(config, 1)[other]))


def test_local_part_file_holds_only_the_local_tensors_and_its_provenance(make_config, site_env: Path) -> None:
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 1})
    trainer = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    final = trainer.load_global(_global_params(config, 0))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    path = trainer.finish_local(3, final)  # fine-tune without DP on the final global model, then the final file
    assert path == site_env / "state" / "local_site-2_j.pt" and trainer.finish_local(3, final) is None
    after = trainer.model.state_dict()  # the model keeps its weights: nothing still sent depends on the fine-tune
    assert all(torch.equal(after[k], before[k]) for k in before)
    tensors, info = read_local_part(path)
    assert set(tensors) == set(parameter_names(trainer.model.net, "norm"))
    learned = any(not torch.equal(v, before[f"net.{k}"]) for k, v in tensors.items())
    assert learned == (info["fine_tune_selection"]["epoch_selected"] > 0)  # the epoch the site's validation chose
    assert info["sharing"] == NEVER_SENT and info["job_id"] == "j" and info["round"] == 3
    assert len(info["global_model_sha256"]) == 64 and info["fine_tune_epochs"] == 1 and info["final"] is True
    assert info["training_cases"] == len(trainer.train_cases) and info["shared_privacy"] is None


def test_without_a_local_part_nothing_is_written(make_config, site_env: Path) -> None:
    trainer = SiteTrainer(_config(make_config), "site-2", job_id="j", device="cpu")
    trainer.load_global(_global_params(trainer.config, 0))
    assert trainer.save_local_part(0) is None and not (site_env / "state").exists()


def test_fl_commands_refuse_an_initial_checkpoint_with_a_local_part(
    make_config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fetal_fl.cli import main

    part = save_local_part({"w": torch.zeros(2)}, tmp_path / "local.pt", parameters="norm", job_id="x")
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps(make_config(initial_checkpoint=str(part))))
    for argv in (["fl", "check", str(cfg)], ["fl", "export", "--config", str(cfg), "--out", str(tmp_path / "o")]):
        assert main(argv) == 2
        assert "never sent" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_with_dp_sgd_the_local_part_records_the_shared_parts_privacy(make_config, site_env: Path) -> None:
    dp = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5, "grad_sample_mode": "hooks", "seed": 0}
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 1}, privacy={"dp_sgd": dp})
    trainer = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    state = trainer.load_global(_global_params(config, 0))
    trainer.train_round()
    assert not set(trainer.weight_diff(state)) & set(trainer.local_keys)
    _, info = read_local_part(trainer.finish_local(0, state))
    privacy = info["shared_privacy"]
    assert privacy["epsilon"] > 0 and privacy["delta"] == 1e-5 and privacy["privacy_unit"] == "one patient"
    assert info["fine_tune_epochs"] == 1
