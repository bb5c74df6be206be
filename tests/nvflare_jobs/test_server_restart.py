"""The federation server killed mid-job and started again (issue 19 item 2).

NVFlare 2.9 cannot resume a job in place after a server restart (see :mod:`nvflare_jobs.deploy`: no job
snapshots, no restore of running jobs). The restarted server marks the interrupted job ``FINISHED:ABANDONED`` with
the reason and the rounds completed in its meta, the sites stop their part, and (``server.resume_on_restart``,
default on) a continuation job is submitted from the last saved round (:mod:`nvflare_jobs.resume`): it finishes the
planned rounds, each site's ledger charges the rounds under the first job's id (one accountant: no round twice,
no second reservation; a round lost with the server is re-sent, not retrained), so each site's ε equals an
uninterrupted run's of the same config.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, SystemComponents
from nvflare.apis.fl_context import FLContext
from nvflare.apis.job_def import Job, RunStatus

from nvflare_jobs.checkpoint import BEST_CHECKPOINT_NAME
from nvflare_jobs.config import ENV_PRIVACY_LEDGER, ENV_SITE_STATE
from nvflare_jobs.deploy import (
    ABANDONED,
    END_REASON_KEY,
    RESTART_GUARD_ID,
    InterruptedJobGuard,
    PocFederation,
    ProvisionedFederation,
    install_restart_guard,
    interrupted_job_reason,
    is_allowed,
    running,
    saved_round,
)
from nvflare_jobs.fetal_brain.job import export_job
from nvflare_jobs.resume import (
    RESUMED_BY_KEY,
    RESUMES_KEY,
    ROUNDS_DONE_KEY,
    ResumeError,
    admin_runner,
    resume_by_admin,
)

SITES = ["site-1", "site-2", "site-3"]
DP = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
ROUNDS = 4
STEPS_PER_ROUND = 2  # tiny_config: one local epoch of max_steps_per_epoch=2


# -- the guard on its own (fast) ------------------------------------------------------------------------------
def _server_app(tmp_path: Path, *, last_round: int | None, num_rounds: int = ROUNDS) -> Path:
    app = tmp_path / "job-1" / "app_server"
    (app / "config").mkdir(parents=True)
    workflow = {"id": "controller", "path": "nvflare_jobs.controllers.FetalFedAvg", "args": {"num_rounds": num_rounds}}
    (app / "config" / "config_fed_server.json").write_text(json.dumps({"workflows": [workflow]}))
    if last_round is not None:
        torch.save({"model": {}, "meta_props": {"current_round": last_round}}, app / "FL_global_model.pt")
    return app


def test_the_reason_says_why_and_how_far_the_job_got(tmp_path: Path) -> None:
    app = _server_app(tmp_path, last_round=1)
    reason = interrupted_job_reason("job-1", {"name": "fetal", "status": "RUNNING"}, app)
    assert "job job-1 (fetal) was RUNNING when the server process stopped" in reason
    assert "cannot resume" in reason and ABANDONED in reason
    assert f"2 round(s) of {ROUNDS} planned had completed (0..1)" in reason
    assert str(app / "FL_global_model.pt") in reason and "continuation job starts from the last saved" in reason
    early = interrupted_job_reason("job-1", {"name": "fetal"}, _server_app(tmp_path / "early", last_round=None))
    assert "No round had completed" in early


def test_the_saved_round_is_read_without_running_anything_in_the_file(tmp_path: Path) -> None:
    import os
    import zipfile

    torch.save({"model": {"w": torch.ones(2)}, "meta_props": {"current_round": 3}}, tmp_path / "m.pt")
    assert saved_round(tmp_path / "m.pt") == 3

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {tmp_path / 'ran'}",))

    with zipfile.ZipFile(tmp_path / "evil.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"meta_props": {"current_round": Evil()}}))
    assert saved_round(tmp_path / "evil.pt") is None and not (tmp_path / "ran").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert saved_round(tmp_path / "junk.pt") is None and saved_round(tmp_path / "missing.pt") is None


def test_the_guard_is_installed_once_in_the_server_kit(tmp_path: Path) -> None:
    local = tmp_path / "local"
    local.mkdir()
    (local / "resources.json").write_text(json.dumps({"components": [{"id": "job_manager", "path": "x.Y"}]}))
    install_restart_guard(tmp_path)
    install_restart_guard(tmp_path)
    components = json.loads((local / "resources.json").read_text())["components"]
    assert [c["id"] for c in components] == ["job_manager", RESTART_GUARD_ID]
    assert components[1]["path"] == "nvflare_jobs.deploy.InterruptedJobGuard"


@pytest.mark.integration
@pytest.mark.parametrize("kind", [PocFederation, ProvisionedFederation])
def test_poc_and_provisioned_servers_get_the_guard(kind: type, tmp_path: Path, fl_env: dict) -> None:
    fed = kind(tmp_path / "ws", sites=SITES, env=fl_env)
    fed.prepare()  # nvflare poc prepare / nvflare provision; nothing is started
    resources = json.loads((fed.kit(fed.server_name) / "local" / "resources.json").read_text())
    (guard,) = [c for c in resources["components"] if c["id"] == RESTART_GUARD_ID]
    assert is_allowed(guard["path"], resources["class_allow_list"])  # NVFlare 2.9 builds only allowed classes
    for site in SITES:
        site_resources = json.loads((fed.kit(site) / "local" / "resources.json").read_text())
        assert RESTART_GUARD_ID not in [c.get("id") for c in site_resources.get("components", [])]


class _JobManager:
    def __init__(self, jobs: dict[str, str]) -> None:
        self.meta = {jid: {"job_id": jid, "name": "fetal", "status": status} for jid, status in jobs.items()}

    def get_jobs_by_status(self, statuses: list[RunStatus], fl_ctx: FLContext) -> list[Job]:
        wanted = {s.value for s in statuses}
        return [Job(jid, {}, m["name"], {}, m) for jid, m in self.meta.items() if m["status"] in wanted]

    def update_meta(self, jid: str, meta: dict[str, Any], fl_ctx: FLContext) -> None:
        self.meta[jid].update(meta)

    def set_status(self, jid: str, status: RunStatus, fl_ctx: FLContext) -> None:
        self.meta[jid]["status"] = status.value


class _Workspace:
    def __init__(self, root: Path) -> None:
        self.root = root

    def get_app_dir(self, job_id: str) -> str:
        return str(self.root / job_id / "app_server")


class _Engine:
    def __init__(self, job_manager: _JobManager, root: Path) -> None:
        self.job_manager, self.workspace = job_manager, _Workspace(root)

    def get_component(self, name: str) -> Any:
        return self.job_manager if name == SystemComponents.JOB_MANAGER else None

    def get_workspace(self) -> _Workspace:
        return self.workspace

    def fire_event(self, *args: Any, **kwargs: Any) -> None:
        pass


def test_the_guard_ends_only_jobs_left_running_at_start_up(tmp_path: Path) -> None:
    _server_app(tmp_path, last_round=1)
    jobs = _JobManager({"job-1": "RUNNING", "job-2": "DISPATCHED", "job-3": "SUBMITTED", "job-4": "FINISHED:COMPLETED"})
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.ENGINE, _Engine(jobs, tmp_path), private=True, sticky=False)
    guard = InterruptedJobGuard()
    guard.handle_event(EventType.SYSTEM_START, fl_ctx)
    status = {jid: m["status"] for jid, m in jobs.meta.items()}
    assert status == {"job-1": ABANDONED, "job-2": ABANDONED, "job-3": "SUBMITTED", "job-4": "FINISHED:COMPLETED"}
    assert "2 round(s) of 4 planned" in jobs.meta["job-1"][END_REASON_KEY]
    assert "No round had completed" in jobs.meta["job-2"][END_REASON_KEY]
    assert END_REASON_KEY not in jobs.meta["job-3"]
    guard.handle_event(EventType.SYSTEM_START, fl_ctx)  # nothing left to end
    assert guard.end_interrupted_jobs(fl_ctx) == []


# -- POC for real: kill the server after round 1, start it again, the job resumes ----------------------------------
@dataclass
class Restart:
    fed: PocFederation
    job_id: str
    status: str
    site_job_pids: list[int]  # the sites' processes of the job just before the server was killed
    ledger: Path
    continuation: str  # the job the restarted server submitted from the last saved round
    continuation_status: str
    uninterrupted: str  # the same config run without a restart, for comparison
    uninterrupted_status: str


def _wait_for_text(path: Path, text: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout}s")


def _job_processes(fed: PocFederation, job_id: str) -> list[int]:
    import psutil

    pids = []
    for proc in fed.processes():
        with contextlib.suppress(psutil.Error):
            if job_id in " ".join(proc.cmdline()) or job_id in proc.cwd():
                pids.append(proc.pid)
    return pids


def _config(make_config, name: str) -> dict:
    return make_config(name=name, num_rounds=ROUNDS, privacy={"dp_sgd": DP, "filters": []})


@pytest.fixture(scope="module")
def restart(tmp_path_factory: pytest.TempPathFactory, federation: Path, fl_env: dict, make_config) -> Iterator[Restart]:
    from privacy.ledger import SiteLedger

    workspace = tmp_path_factory.mktemp("restart")
    ledger = workspace / "privacy_ledger.jsonl"  # one ledger file; each site's dataset has its own account in it
    SiteLedger.init(ledger, epsilon_budget=100.0, delta_budget=1e-3, site="poc")
    env = {
        **fl_env,
        "FETALFL_DATA_ROOT": str(federation),
        ENV_PRIVACY_LEDGER: str(ledger),
        ENV_SITE_STATE: str(workspace / "site_state"),  # a site's DP accountant state outlives a job's folder
    }
    fed = PocFederation(workspace, sites=SITES, env=env)
    with running(fed) as started:
        job_id = started.submit(export_job(_config(make_config, "poc_restart"), workspace / "jobs"))
        # the workflow logs the next round's start after round 1 was aggregated and its global model saved
        _wait_for_text(started.server_job_dir(job_id) / "log.txt", "Round 2 started", timeout=400)
        site_job_pids = [p for p in _job_processes(started, job_id) if p not in _server_pids(started)]
        assert started.kill_server(), "no server process to kill"
        assert started.server_processes() == []
        started.start_server()
        status = started.wait(job_id, timeout=120)
        continuation = str(started.job_meta(job_id).get(RESUMED_BY_KEY, ""))
        continuation_status = started.wait(continuation, timeout=600) if continuation else "not submitted"
        uninterrupted = started.submit(export_job(_config(make_config, "poc_uninterrupted"), workspace / "jobs2"))
        uninterrupted_status = started.wait(uninterrupted, timeout=600)
        for done in (continuation, uninterrupted):  # a finished job's server folder goes to the job store
            if done:
                started.download(done, workspace / "download" / done)
        yield Restart(
            started,
            job_id,
            status,
            site_job_pids,
            ledger,
            continuation,
            continuation_status,
            uninterrupted,
            uninterrupted_status,
        )
    assert fed.processes() == [], "processes of the POC system survived poc stop"


def _server_pids(fed: PocFederation) -> set[int]:
    return {p.pid for p in fed.server_processes()}


def _last_saved_round(fed: PocFederation, job_id: str) -> int:
    model = fed.server_job_dir(job_id) / "app_server" / "FL_global_model.pt"
    if not model.is_file():  # a finished job: what `nvflare job download` brought back
        (model,) = (fed.workspace / "download" / job_id).rglob("FL_global_model.pt")
    return int(torch.load(model, map_location="cpu", weights_only=True)["meta_props"]["current_round"])


def _downloaded(fed: PocFederation, job_id: str, name: str) -> list[Path]:
    return sorted((fed.workspace / "download" / job_id).rglob(name))


def _trained_rounds(fed: PocFederation, site: str, job_id: str) -> list[int]:
    log = (fed.site_job_dir(site, job_id) / "log.txt").read_text()
    return [int(r) for r in re.findall(r"audit: round (\d+) update", log)]  # what left the site, per round


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_the_interrupted_job_ends_abandoned_with_the_reason(restart: Restart) -> None:
    assert restart.status == ABANDONED
    last = _last_saved_round(restart.fed, restart.job_id)
    assert 1 <= last < ROUNDS - 1  # killed after round 1, before the job's end
    reason = restart.fed.job_meta(restart.job_id)[END_REASON_KEY]
    assert "cannot resume a job after a server restart" in reason
    assert f"{last + 1} round(s) of {ROUNDS} planned had completed (0..{last})" in reason
    assert f"Resumed as job {restart.continuation}" in reason
    assert restart.fed.job_meta(restart.job_id)[ROUNDS_DONE_KEY] == last + 1
    server_log = (restart.fed.kit(restart.fed.server_name) / "log.txt").read_text()
    assert re.search(rf"InterruptedJobGuard - ERROR - .*job {restart.job_id} \(poc_restart\) was RUNNING", server_log)


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_the_sites_stop_their_part_of_the_job(restart: Restart) -> None:
    assert restart.site_job_pids, "the sites ran no process for the job before the server was killed"
    deadline = time.monotonic() + 120  # the next heartbeat to the new server aborts it; the trainer gets 30 s
    while _job_processes(restart.fed, restart.job_id) and time.monotonic() < deadline:
        time.sleep(2)
    assert _job_processes(restart.fed, restart.job_id) == []


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_the_job_resumes_from_the_last_saved_round_and_finishes(restart: Restart, downloaded_job) -> None:
    fed, new = restart.fed, restart.continuation
    assert new and restart.continuation_status == "FINISHED:COMPLETED", (new, restart.continuation_status)
    meta = fed.job_meta(new)
    assert meta[RESUMES_KEY] == restart.job_id and meta["name"] == "poc_restart"
    done = _last_saved_round(fed, restart.job_id) + 1
    server_log = "".join(p.read_text(errors="replace") for p in _downloaded(fed, new, "log.txt"))
    started = [int(r) for r in re.findall(r"Round (\d+) started", server_log)]
    assert started == list(range(done, ROUNDS)), started  # numbering continues; total rounds unchanged
    assert _last_saved_round(fed, new) == ROUNDS - 1
    for site in SITES:
        assert _trained_rounds(fed, site, new) == list(range(done, ROUNDS)), site
    downloaded_job(fed.workspace / "download" / new, new, rounds=ROUNDS)


def _spends(restart: Restart, site: str, job_id: str) -> list[dict]:
    records = [json.loads(line) for line in restart.ledger.read_text().splitlines()]
    return [
        r for r in records if r["type"] == "spend" and r["job_id"] == job_id and r["dataset_id"].startswith(f"{site}/")
    ]


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_each_sites_ledger_counts_every_trained_round_once_under_one_account(restart: Restart) -> None:
    from privacy.ledger import SiteLedger

    ledger = SiteLedger(restart.ledger)  # still parses: nothing torn by the kill
    fed = restart.fed
    held = {r.job_id for r in ledger.reservations()}
    assert restart.continuation not in held  # the continuation reuses the first job's reservation, holds none
    done = _last_saved_round(fed, restart.job_id) + 1
    for site in SITES:
        before = _trained_rounds(fed, site, restart.job_id)
        assert before[:2] == [0, 1] and before == sorted(set(before)), (site, before)
        assert _spends(restart, site, restart.continuation) == []  # charged under the first job's id
        lineage = _spends(restart, site, restart.job_id)  # training rounds, then the final evaluation's releases
        steps = [r["steps"] for r in lineage]
        # one accountant over both parts: every round adds its steps once, none restarts the count
        assert steps == sorted(steps), (site, steps)
        # a round trained after the last save (its update lost with the server) is re-sent, not retrained
        console = (fed.kit(site) / "poc_console.log").read_text()  # where POC sites' training output goes
        resent = re.findall(rf"site {site} round (\d+): re-sending the update sent before the server restart", console)
        assert [int(r) for r in resent] == [r for r in before if r >= done], (site, before, resent)
        assert sorted(set(steps)) == [STEPS_PER_ROUND * (i + 1) for i in range(ROUNDS)], (site, steps)
        (dataset,) = {r["dataset_id"] for r in lineage}
        spent = ledger.spent(dataset)
        eps_resumed = spent.jobs[restart.job_id][0]
        eps_plain = spent.jobs[restart.uninterrupted][0]
        assert eps_resumed == pytest.approx(eps_plain, rel=1e-6), site  # the same rounds: the same ε
        assert spent.epsilon == pytest.approx(eps_resumed + eps_plain, rel=1e-9)  # two accounts, not three


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_no_model_is_published_for_the_interrupted_job(restart: Restart) -> None:
    # a DP job's bundle checkpoint is written at the end of the run (no Dice to select on during training): a
    # killed server never gets there, so nothing claims to be the abandoned run's model
    assert list(restart.fed.server_job_dir(restart.job_id).rglob(BEST_CHECKPOINT_NAME)) == []


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.timeout(1500)
def test_a_resume_of_an_unknown_finished_or_resumed_job_is_refused(restart: Restart, tmp_path: Path) -> None:
    fed = restart.fed
    admin = admin_runner(fed.admin_kit)
    folder = fed.workspace / "jobs" / "poc_restart"
    cases = {
        "0123abcd-0000-0000-0000-000000000000": "not known to the server",
        restart.uninterrupted: "not FINISHED:ABANDONED",
        restart.job_id: f"already resumed as job {restart.continuation}",
    }
    for job_id, message in cases.items():
        with pytest.raises(ResumeError, match=message):
            resume_by_admin(job_id, folder, admin, tmp_path / job_id)
    assert not (tmp_path / restart.job_id / "continuation").exists()  # refused before anything was built
