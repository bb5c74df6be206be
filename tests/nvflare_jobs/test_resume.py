"""A continuation of an abandoned job (nvflare_jobs.resume): what it carries, what it loads, what it refuses."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import Job, RunStatus
from nvflare.fuel.utils.zip_utils import zip_directory_to_bytes

from nvflare_jobs.config import CONFIG_FILE_NAME, ConfigError, load_config
from nvflare_jobs.deploy import ABANDONED, InterruptedJobGuard
from nvflare_jobs.fetal_brain.job import export_job
from nvflare_jobs.resume import (
    RESUME_KEY,
    RESUMED_BY_KEY,
    RESUMES_KEY,
    ROUNDS_DONE_KEY,
    ResumeError,
    accounting_job_id,
    check_resumable,
    check_resumed_accounting,
    continuation_meta,
    keep_sent_update,
    load_resumed_params,
    read_job_meta,
    resume_enabled,
    resume_record,
    sent_update,
    sent_update_path,
)
from privacy.ledger import SiteLedger

ROUNDS = 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, make_config) -> Path:
    return export_job(make_config(name="resume_me", num_rounds=ROUNDS), tmp_path_factory.mktemp("export"))


@pytest.fixture
def job(tmp_path: Path, exported: Path) -> Path:
    folder = tmp_path / exported.name
    shutil.copytree(exported, folder)
    return folder


def _model(path: Path, last_round: int, **weights: Any) -> Path:
    weights = weights or {"net.w": torch.ones(2)}
    torch.save({"model": weights, "meta_props": {"current_round": last_round}}, path)
    return path


def test_the_record_names_the_first_job_the_abandoned_one_and_the_start_round() -> None:
    first = resume_record("job-a", {"status": ABANDONED}, 2)
    assert first == {"of_job": "job-a", "abandoned_job": "job-a", "start_round": 2}
    second = resume_record("job-b", {RESUME_KEY: first}, 3)  # a continuation abandoned in its turn
    assert second == {"of_job": "job-a", "abandoned_job": "job-b", "start_round": 3}
    meta = {"job_id": "job-a", "name": "n", "deploy_map": {}, "result_location": "x", "status": ABANDONED,
            "data_storage_format": 2}  # fmt: skip
    # the store reads a job's content by its storage format: it must be copied
    assert continuation_meta(meta, "job-a", 2) == {"name": "n", "deploy_map": {}, "data_storage_format": 2,
                                                   RESUMES_KEY: "job-a", RESUME_KEY: first}  # fmt: skip


def test_a_site_charges_the_first_jobs_account(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"job_id": "job-c", RESUME_KEY: {"of_job": "job-a"}}))
    meta = read_job_meta([tmp_path / "app_site-1", tmp_path], "job-c")
    assert accounting_job_id("job-c", meta) == "job-a"
    assert read_job_meta([tmp_path], "job-other") == {}  # another job's meta is never taken
    assert accounting_job_id("job-x", {"job_id": "job-x"}) == "job-x"  # a plain job: its own id
    with pytest.raises(ResumeError, match="malformed"):
        accounting_job_id("job-c", {RESUME_KEY: {"of_job": ""}})


def test_the_server_starts_from_the_abandoned_jobs_last_model(tmp_path: Path) -> None:
    like = {"net.w": np.zeros(2, dtype=np.float32), "net.b": np.zeros(1, dtype=np.float32)}
    model = _model(tmp_path / "m.pt", 1, **{"net.w": torch.full((2,), 3.0), "net.b": torch.ones(1)})
    params = load_resumed_params(model, like, start_round=2)
    assert isinstance(params["net.w"], np.ndarray) and params["net.w"].tolist() == [3.0, 3.0]
    with pytest.raises(ResumeError, match="model of round 1, not of round 2"):
        load_resumed_params(model, like, start_round=3)
    with pytest.raises(ResumeError, match="does not hold this job's model weights"):
        load_resumed_params(_model(tmp_path / "other.pt", 1), like, start_round=2)
    with pytest.raises(ResumeError, match="is missing"):
        load_resumed_params(tmp_path / "none.pt", like, start_round=2)


def test_the_model_is_loaded_only_as_tensors(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    buffer = io.BytesIO()
    torch.save({"model": {"w": torch.ones(1)}}, buffer)
    with zipfile.ZipFile(buffer) as src, zipfile.ZipFile(tmp_path / "evil.pt", "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("data.pkl"):
                data = pickle.dumps({"model": {"w": Evil()}, "meta_props": {"current_round": 1}})
            dst.writestr(item, data)
    with pytest.raises(pickle.UnpicklingError):
        load_resumed_params(tmp_path / "evil.pt", {"w": np.zeros(1)}, start_round=2)
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        (None, "not known to the server"),
        ({"status": "RUNNING"}, "is RUNNING, not FINISHED:ABANDONED"),
        ({"status": "FINISHED:COMPLETED"}, "not FINISHED:ABANDONED"),
        ({"status": ABANDONED, RESUMED_BY_KEY: "job-b", ROUNDS_DONE_KEY: 2}, "already resumed as job job-b"),
        ({"status": ABANDONED}, "no round's global model was saved"),
        ({"status": ABANDONED, ROUNDS_DONE_KEY: 0}, "no round's global model was saved"),
    ],
)
def test_only_an_abandoned_job_not_yet_resumed_can_be_resumed(meta: dict | None, message: str) -> None:
    with pytest.raises(ResumeError, match=message):
        check_resumable("job-a", meta)
    assert check_resumable("job-a", {"status": ABANDONED, ROUNDS_DONE_KEY: 2}) == 2


def test_the_switch_defaults_to_on_and_is_checked(make_config) -> None:
    assert resume_enabled(make_config()) and not resume_enabled(make_config(server={"resume_on_restart": False}))
    load_config(make_config(server={"resume_on_restart": False}))
    with pytest.raises(ConfigError, match="resume_on_restart must be true or false"):
        load_config(make_config(server={"resume_on_restart": "no"}))


def test_a_continuation_that_lost_the_dp_state_is_refused(tmp_path: Path) -> None:
    SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=10.0, delta_budget=1e-3, site="s")
    ledger = SiteLedger(tmp_path / "ledger.jsonl")
    for rnd in range(2):
        ledger.record(job_id="job-a", dataset_id="site-1/d", epsilon=0.5 * (rnd + 1), delta=1e-5, round=rnd,
                      steps=2 * (rnd + 1))  # fmt: skip
    with pytest.raises(ResumeError, match=r"holds 4 DP step.*restored 0: keep FETALFL_SITE_STATE"):
        check_resumed_accounting(ledger, dataset_id="site-1/d", job_id="job-a", steps=0)
    check_resumed_accounting(ledger, dataset_id="site-1/d", job_id="job-a", steps=4)
    check_resumed_accounting(ledger, dataset_id="site-1/d", job_id="job-new", steps=0)  # nothing spent yet


# -- the guard submits the continuation into the job store -------------------------------------------------------
class _Store:
    """The job store part of NVFlare's job manager the guard uses, holding one stored job."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.content = {meta["job_id"]: zip_directory_to_bytes(str(folder.parent), folder.name)}
        self.meta = {meta["job_id"]: meta}

    def get_jobs_by_status(self, statuses: list[RunStatus], fl_ctx: FLContext) -> list[Job]:
        wanted = {s.value for s in statuses}
        return [Job(j, {}, {}, dict(m)) for j, m in self.meta.items() if m["status"] in wanted]

    def get_content(self, meta: dict[str, Any], fl_ctx: FLContext) -> bytes:
        return self.content[meta["job_id"]]

    def clone(self, from_jid: str, meta: dict[str, Any], fl_ctx: FLContext) -> dict[str, Any]:
        new = {**meta, "job_id": "job-b", "status": "SUBMITTED"}
        self.meta["job-b"], self.content["job-b"] = new, self.content[from_jid]
        return new

    def update_meta(self, jid: str, meta: dict[str, Any], fl_ctx: FLContext) -> None:
        self.meta[jid].update(meta)

    def set_status(self, jid: str, status: RunStatus, fl_ctx: FLContext) -> None:
        self.meta[jid]["status"] = status.value


class _Engine:
    def __init__(self, store: _Store, root: Path) -> None:
        self.store, self.root = store, root

    def get_component(self, name: str) -> Any:
        return self.store if name == SystemComponents.JOB_MANAGER else None

    def get_workspace(self) -> Any:
        root = self.root

        class Workspace:
            def get_app_dir(self, job_id: str) -> str:
                return str(root / job_id / "app_server")

        return Workspace()

    def fire_event(self, *args: Any, **kwargs: Any) -> None:
        pass


def _restart(job: Path, tmp_path: Path, *, saved: bool = True) -> _Store:
    meta = {"job_id": "job-a", "name": "resume_me", "job_folder_name": job.name, "status": "RUNNING",
            "deploy_map": {"app_server": ["server"]}, "result_location": "old", "min_clients": 2}  # fmt: skip
    app = tmp_path / "ws" / "job-a" / "app_server"
    app.mkdir(parents=True)
    if saved:
        _model(app / "FL_global_model.pt", 1)
    store = _Store(job, meta)
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, _Engine(store, tmp_path / "ws"), private=True, sticky=False)
    InterruptedJobGuard().handle_event(EventType.SYSTEM_START, fl_ctx)
    return store


def test_the_restarted_server_submits_the_continuation(job: Path, tmp_path: Path) -> None:
    store = _restart(job, tmp_path)
    old = store.meta["job-a"]
    assert old["status"] == ABANDONED and old[RESUMED_BY_KEY] == "job-b" and old[ROUNDS_DONE_KEY] == 2
    assert "Resumed as job job-b" in old["end_reason"]
    new = store.meta["job-b"]
    assert new[RESUMES_KEY] == "job-a" and new["name"] == "resume_me" and "result_location" not in new
    assert new[RESUME_KEY] == {"of_job": "job-a", "abandoned_job": "job-a", "start_round": 2}
    assert store.content["job-b"] == store.content["job-a"]  # the signed definition, unchanged


def test_no_continuation_when_switched_off_or_nothing_saved(job: Path, tmp_path: Path) -> None:
    assert RESUMED_BY_KEY not in _restart(job, tmp_path / "a", saved=False).meta["job-a"]
    for app in job.glob("app_site-*"):
        config = app / "custom" / CONFIG_FILE_NAME
        raw = json.loads(config.read_text())
        raw["server"]["resume_on_restart"] = False
        config.write_text(json.dumps(raw))
    store = _restart(job, tmp_path / "b")
    assert store.meta["job-a"]["status"] == ABANDONED and RESUMED_BY_KEY not in store.meta["job-a"]
    assert list(store.meta) == ["job-a"]


def test_a_kept_update_is_re_sent_only_for_its_round_and_global_model(tmp_path: Path) -> None:
    path = sent_update_path(tmp_path / "dpsgd_site-1_job-a.json", "site-1", "job-a")
    assert sent_update_path(None, "site-1", "job-a") is None  # no DP state: nothing kept, a lost round retrains
    trained_from = {"net.w": torch.ones(3)}
    update = {"params": {"net.w": torch.full((3,), 0.5)}, "metrics": {"val_mean_dice": 0.3}, "meta": {"steps": 2}}
    keep_sent_update(path, round=2, global_params=trained_from, update=update)
    kept = sent_update(path, round=2, global_params={"net.w": torch.ones(3)})
    assert kept is not None and torch.equal(kept["params"]["net.w"], update["params"]["net.w"])
    assert kept["metrics"] == update["metrics"] and kept["meta"] == update["meta"]
    assert sent_update(path, round=3, global_params=trained_from) is None  # another round: train
    assert sent_update(path, round=2, global_params={"net.w": torch.zeros(3)}) is None  # another model: train
