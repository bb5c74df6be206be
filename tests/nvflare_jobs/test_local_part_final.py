"""The site-local part's life at a site, without NVFlare (issue 24): the non-DP fine-tune starts from the job's
FINAL global model (not the one received in the last round) and the file records that model; a client process
restarted mid-job takes back the local part it saved instead of starting it over; a saved part of another
configuration stops the site; a fine-tune without a final evaluation is refused before training."""

from __future__ import annotations

import pytest
import torch

from fetalseg.local_part import LocalPartError, read_local_part, shared_part_hash
from nvflare_jobs.config import JobConfig
from nvflare_jobs.fetal_brain import client as client_module
from nvflare_jobs.fetal_brain.client import SiteTrainer
from nvflare_jobs.fetal_brain.model import PREFIX, FetalBrainNet


def _config(make_config, local: dict, **changes) -> JobConfig:
    return JobConfig.from_dict(make_config(local=local, **changes))


def _global(config: JobConfig, seed: int) -> dict[str, torch.Tensor]:
    return FetalBrainNet(config.bundle_overrides, init_seed=seed).state_dict()


def _local_of(trainer: SiteTrainer) -> dict[str, torch.Tensor]:
    state = trainer.model.state_dict()
    return {k: state[k].clone() for k in trainer.local_keys}


def test_the_fine_tune_starts_from_the_final_global_model(make_config, site_env, monkeypatch) -> None:
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 1}, num_rounds=2)
    trainer = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    seen: list[str] = []
    real = client_module.train_epoch

    def spy(model, *args, **kwargs):  # the real training step; records which shared weights it trains on
        seen.append(shared_part_hash(model.state_dict(), trainer.local_keys, prefix=PREFIX))
        return real(model, *args, **kwargs)

    last_received = None
    for rnd in range(config.num_rounds):  # the rounds, as main() runs them
        last_received = trainer.load_global(_global(config, rnd))
        trainer.train_round()
        trainer.save_local_part(rnd)
    final = trainer.load_global(_global(config, 7))  # the final evaluation sends the job's final global model
    monkeypatch.setattr(client_module, "train_epoch", spy)
    path = trainer.finish_local(config.num_rounds - 1, final)
    final_hash = shared_part_hash(final, trainer.local_keys, prefix=PREFIX)
    assert seen and set(seen) == {final_hash}  # every fine-tune step trained on the FINAL model's shared weights
    assert final_hash != shared_part_hash(last_received, trainer.local_keys, prefix=PREFIX)
    _, info = read_local_part(path)
    assert info["global_model_sha256"] == final_hash and info["global_round"] == config.num_rounds
    assert info["final"] is True and info["fine_tune_epochs"] == 1 and info["job_id"] == "j"
    assert info["fine_tuned_on"] == "the job's final global model"
    assert trainer.finish_local(config.num_rounds - 1, final) is None  # once


def test_only_the_final_global_model_is_recognised_as_final(make_config, site_env) -> None:
    trainer = SiteTrainer(_config(make_config, {"parameters": "norm"}, num_rounds=3), "site-2", job_id="j")
    assert trainer.is_final_global({"current_round": 2, "nr_aggregated": 3})  # NVFlare's FL_global_model.pt
    for meta in ({"current_round": 1}, {}, None, {"current_round": "2"}, {"current_round": True}):
        assert not trainer.is_final_global(meta), meta


def test_a_restarted_client_takes_back_its_saved_local_part(make_config, site_env) -> None:
    config = _config(make_config, {"parameters": "norm"}, num_rounds=3)
    first = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    first.load_global(_global(config, 0))
    first.train_round()
    learned = _local_of(first)
    first.save_local_part(0)
    del first  # NVFlare restarts the site's process

    again = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    round_1 = _global(config, 1)
    again.load_global(round_1)  # the server's values for the local keys are not taken
    now = again.model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in learned.items())
    assert not all(torch.equal(round_1[k], v) for k, v in learned.items())
    other = next(k for k in now if k not in learned)
    assert torch.equal(now[other], round_1[other])  # the shared part is the received global model's
    again.train_round()  # and it keeps learning from there
    again.load_global(_global(config, 2))
    assert not all(torch.equal(again.model.state_dict()[k], v) for k, v in learned.items())


def test_another_jobs_saved_part_is_not_taken(make_config, site_env) -> None:
    config = _config(make_config, {"parameters": "norm"})
    first = SiteTrainer(config, "site-2", job_id="job-a", device="cpu")
    first.load_global(_global(config, 0))
    first.train_round()
    first.save_local_part(0)
    other = SiteTrainer(config, "site-2", job_id="job-b", device="cpu")  # its own file name: a fresh start
    received = _global(config, 1)
    other.load_global(received)
    assert all(torch.equal(other.model.state_dict()[k], received[k]) for k in other.local_keys)


def test_a_saved_part_of_another_configuration_stops_the_site(make_config, site_env) -> None:
    config = _config(make_config, {"parameters": "norm"}, training={"trained_parameters": "bias+head"})
    first = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    first.load_global(_global(config, 0))
    first.save_local_part(0)
    changed = _config(make_config, {"parameters": "head"}, training={"trained_parameters": "norm"})
    with pytest.raises(LocalPartError, match=r"local\.parameters='norm', this job 'head'.*move it away"):
        SiteTrainer(changed, "site-2", job_id="j", device="cpu")


def test_a_restart_after_the_final_fine_tune_keeps_it_out_of_what_is_still_sent(make_config, site_env) -> None:
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 1}, num_rounds=1)
    first = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    final = first.load_global(_global(config, 0))
    first.train_round()
    first.save_local_part(0)
    path = first.finish_local(0, final)
    written = path.read_bytes()
    again = SiteTrainer(config, "site-2", job_id="j", device="cpu")  # restarted during the final evaluation
    assert again.local_finished
    received = _global(config, 3)
    again.load_global(received)  # what it evaluates (and sends metrics of) holds no part learned without DP
    now = again.model.state_dict()
    assert all(torch.equal(now[k], received[k]) for k in again.local_keys)
    assert again.finish_local(0, received) is None and path.read_bytes() == written  # not redone, not overwritten


def test_a_fine_tune_without_a_final_evaluation_is_refused_before_training(make_config, site_env) -> None:
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 2}, cross_site_eval=False)
    with pytest.raises(ValueError, match=r"local\.fine_tune_epochs=2 .*set cross_site_eval to true"):
        SiteTrainer(config, "site-2", job_id="j", device="cpu")


def test_without_a_final_evaluation_the_final_part_records_the_jobs_last_global_round(make_config, site_env) -> None:
    config = _config(make_config, {"parameters": "norm"}, cross_site_eval=False, num_rounds=2)
    trainer = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    trainer.load_global(_global(config, 0))
    _, info = read_local_part(trainer.finish_local(1))
    assert info["final"] is True and info["global_round"] == 2 and info["global_model_sha256"] is None
    assert info["fine_tune_epochs"] == 0 and info["job_id"] == "j"


@pytest.mark.parametrize(("val_dice", "selected"), [([0.5, 0.3, 0.4], 0), ([0.5, 0.6, 0.55], 1), ([0.5, 0.5, 0.7], 2)])
def test_the_site_keeps_the_fine_tune_epoch_its_own_validation_cases_score_best(
    make_config, site_env, monkeypatch, val_dice: list[float], selected: int
) -> None:
    """A fine-tune epoch that scores worse on the site's validation cases than the part as trained in the rounds is
    not what the site ends up serving (epoch 0 = that part); the scores never leave the site."""
    config = _config(make_config, {"parameters": "norm", "fine_tune_epochs": 2}, num_rounds=1)
    trainer = SiteTrainer(config, "site-2", job_id="j", device="cpu")
    final = trainer.load_global(_global(config, 0))
    trainer.train_round()
    snapshots = [{k.removeprefix(PREFIX): v for k, v in _local_of(trainer).items()}]  # epoch 0: round-trained
    real = client_module.train_epoch

    def epoch_then_snapshot(model, *args, **kwargs):
        stats = real(model, *args, **kwargs)
        snapshots.append({k.removeprefix(PREFIX): v.detach().clone() for k, v in model.state_dict().items()
                          if k in trainer.local_keys})  # fmt: skip
        return stats

    scores = iter(val_dice)  # the site's own validation Dice before the fine-tune and after each epoch
    monkeypatch.setattr(client_module, "train_epoch", epoch_then_snapshot)
    monkeypatch.setattr(trainer, "_site_val_dice", lambda: next(scores))
    tensors, info = read_local_part(trainer.finish_local(0, final))
    assert info["fine_tune_selection"]["epoch_selected"] == selected and len(snapshots) == 3
    assert all(torch.equal(tensors[k], v) for k, v in snapshots[selected].items())
    assert info["fine_tune_selection"]["val_dice_selected"] == max(val_dice[: selected + 1])
