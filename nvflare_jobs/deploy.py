"""Real NVFlare deployments on this machine: POC and provisioned startup kits, every listener on loopback.

Both modes are driven through NVFlare's own command line (``nvflare poc prepare/start/stop``, ``nvflare
provision``, each kit's ``startup/start.sh``, ``nvflare job submit/wait``, ``nvflare system shutdown``); this
module only prepares what a site admin would prepare by hand, through NVFlare's own configuration files:

* the project file (``sites/project.yml``) names the server ``localhost``: NVFlare binds a loopback service
  target to 127.0.0.1 and any other name to every interface; the ports are set per run;
* each participant's ``local/resources.json`` allows this project's component classes (NVFlare 2.9 refuses
  unlisted classes), and each hospital's ``local/privacy.json`` holds its privacy scopes;
* ``HOME`` points into the workspace, so ``nvflare poc prepare`` does not rewrite the user's
  ``~/.nvflare/config.conf``, and ``python3`` on ``PATH`` is this interpreter (NVFlare's start scripts use it).

:class:`Federation` objects are context managers: leaving the block stops the system and then kills, by pid,
every process still running in (or naming) the run's private workspace (also after a failure).

A server restart mid-job ends the job's run; NVFlare cannot resume it in place: NVFlare 2.9 writes no job snapshots
(the server engine's ``persist_components`` is a no-op, "Component snapshot persistence has been removed") and
nothing calls ``JobRunner.restore_running_job`` any more (the start-up restore went with the overseer/HA code), so the
``snapshot_persistor`` that POC and provisioned kits still declare in ``local/resources.json`` stays empty and a
restarted server has no process for the job. The sites learn it at their first heartbeat to the new server and
abort their part (NVFlare's client/server job sync). What this module adds is the job store's side: the server kit
gets :class:`InterruptedJobGuard`, which at server start-up ends every job a previous server process left RUNNING
as ``FINISHED:ABANDONED`` with the reason in its meta (``nvflare job meta <id>``, key ``end_reason``); without
it such a job stays RUNNING for ever and ``nvflare job wait`` never returns. The guard then submits the job's
continuation from its last saved round (:mod:`nvflare_jobs.resume`; off with ``server.resume_on_restart: false``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_context import FLContext

from fetalseg.plumbing import free_port

log = logging.getLogger(__name__)

SITES_DIR = Path(__file__).resolve().parent / "sites"
PROJECT_TEMPLATE = SITES_DIR / "project.yml"
# What a site must add to the class allow list in local/resources.json to run this project's jobs and policies:
# the project's packages, and the two NVFlare classes PyTorch recipe jobs use that NVFlare 2.9's default list lacks.
COMPONENT_PREFIXES = (
    "nvflare_jobs.",
    "privacy.nvflare_filters.",
    "nvflare.app_opt.pt.file_model_persistor.PTFileModelPersistor",
    "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
)
LOOPBACK = "127.0.0.1"
TERMINAL_OK = "FINISHED_OK"
ABANDONED = "FINISHED:ABANDONED"  # NVFlare's status for a job a server restart left without a server process
END_REASON_KEY = "end_reason"  # job meta key: why InterruptedJobGuard ended a job
ROUNDS_DONE_KEY = "rounds_done"  # job meta key: rounds of an abandoned job whose global model was saved
RESTART_GUARD_ID = "interrupted_job_guard"
SERVER_STARTED = "Admin Server is started"  # the server log line after which admin commands are answered


class DeploymentError(RuntimeError):
    """An NVFlare command failed; the message carries its output."""


def render_project(
    dest: str | Path,
    *,
    fed_port: int,
    admin_port: int,
    sites: Sequence[str] | None = None,
    template: str | Path = PROJECT_TEMPLATE,
) -> Path:
    """Write a project file from ``template`` with the given ports (and client list); return its path."""
    project = yaml.safe_load(Path(template).read_text())
    servers = [p for p in project["participants"] if p["type"] == "server"]
    if len(servers) != 1:
        raise ValueError(f"{template}: expected exactly one server participant, found {len(servers)}")
    servers[0]["fed_learn_port"] = int(fed_port)
    servers[0]["admin_port"] = int(admin_port)
    if sites is not None:
        org = next((p["org"] for p in project["participants"] if p["type"] == "client"), "hospital")
        others = [p for p in project["participants"] if p["type"] != "client"]
        project["participants"] = others + [{"name": s, "type": "client", "org": org} for s in sites]
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(yaml.safe_dump(project, sort_keys=False))
    return dest


def allow_project_components(kit: str | Path, prefixes: Sequence[str] = COMPONENT_PREFIXES) -> Path:
    """Add ``prefixes`` to the class allow list in the kit's ``local/resources.json`` (created from the default)."""
    local = Path(kit) / "local"
    target = local / "resources.json"
    source = target if target.exists() else local / "resources.json.default"
    resources: dict[str, Any] = json.loads(source.read_text()) if source.exists() else {"format_version": 2}
    if "class_allow_list" not in resources:
        from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

        resources["class_allow_list"] = list(DEFAULT_CLASS_ALLOW_LIST)
    allowed = resources["class_allow_list"]
    allowed.extend(p for p in prefixes if p not in allowed)
    target.write_text(json.dumps(resources, indent=4))
    return target


def job_component_paths(job_folder: str | Path) -> set[str]:
    """Every class path an exported job's configs ask the sites to build (to check against allow lists)."""
    paths: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("path", "class_path") and isinstance(value, str):
                    paths.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for config in Path(job_folder).rglob("config_fed_*.json"):
        walk(json.loads(config.read_text()))
    return paths


def is_allowed(path: str, allow_list: Sequence[str]) -> bool:
    """NVFlare's allow-list rule: an exact class path, or a package prefix ending in '.'."""
    return any(path == a or path.startswith(a if a.endswith(".") else a + ".") for a in allow_list)


def install_site_policy(kit: str | Path, policy: str | Path) -> Path:
    """Copy a hospital's ``privacy.json`` (named scopes) into its kit's ``local/`` folder."""
    json.loads(Path(policy).read_text())  # refuse a policy that does not even parse
    target = Path(kit) / "local" / "privacy.json"
    shutil.copyfile(policy, target)
    return target


class _MetaOnlyUnpickler(pickle.Unpickler):
    """Reads the plain values of a ``torch.save`` pickle without torch: tensors and storages become None, and no
    class other than ``OrderedDict`` is ever looked up (nothing in the file can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        return lambda *args, **kwargs: None

    def persistent_load(self, pid: Any) -> None:
        return None


def saved_round(model: str | Path) -> int | None:
    """The round recorded in a global model NVFlare's ``PTFileModelPersistor`` saved (``meta_props.current_round``),
    or None. Read without importing torch: this runs while the server starts, and a slow start-up step widens the
    window in which NVFlare 2.9 accepts admin connections before its admin handler is registered (seen once, with a
    torch import here: the window grew from ~20 ms to ~4 s, an admin command landed in it and that server answered
    no admin command for minutes; without the import the same restart was fine)."""
    with contextlib.suppress(Exception), zipfile.ZipFile(model) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        value = _MetaOnlyUnpickler(io.BytesIO(archive.read(name))).load()["meta_props"]["current_round"]
        return int(value)
    return None


def interrupted_job_reason(job_id: str, meta: Mapping[str, Any], app_dir: str | Path) -> str:
    """Why a job found RUNNING at server start-up is ended, with how far it got (from its server app folder)."""
    app_dir = Path(app_dir)
    progress = "no round had completed"
    planned = ""
    with contextlib.suppress(Exception):
        config = json.loads((app_dir / "config" / "config_fed_server.json").read_text())
        rounds = [w["args"]["num_rounds"] for w in config.get("workflows", []) if "num_rounds" in w.get("args", {})]
        planned = f" of {rounds[0]} planned" if rounds else ""
    model = app_dir / "FL_global_model.pt"  # NVFlare's persistor saves the global model after every round
    if model.is_file():
        progress = f"the last global model saved by the server is {model}"
        last = saved_round(model)
        if last is not None:
            progress = f"{last + 1} round(s){planned} had completed (0..{last}); its global model is {model}"
    return (
        f"job {job_id} ({meta.get('name', '?')}) was {meta.get('status', 'RUNNING')} when the server process stopped; "
        "NVFlare 2.9 cannot resume a job after a server restart (no job snapshots), so it is ended as "
        f"{ABANDONED}; the sites abort their part at their next heartbeat. {progress[0].upper()}{progress[1:]}. "
        "Unless its server.resume_on_restart is false, a continuation job starts from the last saved round "
        "(else: fetal-fl fl resume)"
    )


class InterruptedJobGuard(FLComponent):
    """Server component (``components`` of the server kit's ``local/resources.json``): at start-up, ends every job
    that a previous server process left RUNNING or DISPATCHED as ``FINISHED:ABANDONED``, the reason in its meta
    (:data:`END_REASON_KEY`) and in the server log. NVFlare 2.9 keeps no job snapshots and restores no running job
    (see the module docstring), so such a job has no server process: without this it stays RUNNING for ever."""

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.SYSTEM_START:
            return
        try:
            self.end_interrupted_jobs(fl_ctx)
        except Exception as e:  # the server must start anyway; the error says what is left to clean up
            self.log_exception(fl_ctx, f"could not end the jobs a server restart interrupted: {e}")

    def end_interrupted_jobs(self, fl_ctx: FLContext) -> list[str]:
        from nvflare.apis.fl_constant import SystemComponents
        from nvflare.apis.job_def import RunStatus

        engine = fl_ctx.get_engine()
        job_manager = engine.get_component(SystemComponents.JOB_MANAGER)
        workspace = engine.get_workspace()
        ended = []
        for job in job_manager.get_jobs_by_status([RunStatus.RUNNING, RunStatus.DISPATCHED], fl_ctx):
            app_dir = Path(workspace.get_app_dir(job.job_id))
            reason = interrupted_job_reason(job.job_id, job.meta, app_dir)
            job_manager.update_meta(job.job_id, {END_REASON_KEY: reason}, fl_ctx)
            job_manager.set_status(job.job_id, RunStatus.ABANDONED, fl_ctx)
            self.log_error(fl_ctx, reason)
            ended.append(job.job_id)
            last = saved_round(app_dir / "FL_global_model.pt")
            done = {ROUNDS_DONE_KEY: last + 1} if last is not None else {}
            job_manager.update_meta(job.job_id, done, fl_ctx)  # what `fetal-fl fl resume` continues from
            job.meta.update({"status": RunStatus.ABANDONED.value, END_REASON_KEY: reason, **done})
            self.resume(job_manager, job, app_dir, fl_ctx)
        return ended

    def resume(self, job_manager: Any, job: Any, app_dir: Path, fl_ctx: FLContext) -> str | None:
        """Submit the continuation of an abandoned job (:mod:`nvflare_jobs.resume`) unless its config turns it off
        (``server.resume_on_restart``) or no round was saved; return its id. Never raises: the abandoned job stays
        ended, and the log says why it was not resumed."""
        from nvflare_jobs import resume

        try:
            if not resume.resume_enabled(resume.stored_job_config(job_manager, job, fl_ctx)):
                self.log_info(fl_ctx, f"job {job.job_id}: server.resume_on_restart is false; not resumed")
                return None
            last = saved_round(app_dir / resume.GLOBAL_MODEL)
            if last is None:
                self.log_warning(fl_ctx, f"job {job.job_id}: no saved global model; not resumed (submit it again)")
                return None
            new_id = resume.clone_in_store(job_manager, job, last + 1, fl_ctx)
        except Exception as e:
            self.log_exception(fl_ctx, f"job {job.job_id} could not be resumed: {e}")
            return None
        job_manager.update_meta(
            job.job_id, {END_REASON_KEY: f"{job.meta.get(END_REASON_KEY, '')} Resumed as job {new_id}."}, fl_ctx
        )
        self.log_info(fl_ctx, f"job {job.job_id} resumed as job {new_id} from round {last + 1}")
        return new_id


def install_restart_guard(kit: str | Path) -> Path:
    """Add :class:`InterruptedJobGuard` to the ``components`` of a server kit's ``local/resources.json``."""
    target = Path(kit) / "local" / "resources.json"
    resources = json.loads(target.read_text())
    components = resources.setdefault("components", [])
    if not any(c.get("id") == RESTART_GUARD_ID for c in components):
        components.append({"id": RESTART_GUARD_ID, "path": "nvflare_jobs.deploy.InterruptedJobGuard", "args": {}})
    target.write_text(json.dumps(resources, indent=4))
    return target


def nvflare_executable() -> list[str]:
    exe = Path(sys.executable).parent / "nvflare"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "nvflare.cli"]


@dataclass
class Listener:
    pid: int
    name: str
    address: str
    port: int


class Federation:
    """Common part of a local NVFlare system: environment, commands, job submission, process cleanup."""

    def __init__(
        self,
        workspace: str | Path,
        *,
        sites: Sequence[str] = ("site-1", "site-2", "site-3"),
        env: Mapping[str, str] | None = None,
        site_policies: Mapping[str, str | Path] | None = None,
    ) -> None:
        self.workspace = Path(workspace).resolve()
        self.sites = list(sites)
        self.fed_port = free_port()
        self.admin_port = free_port()
        while self.admin_port == self.fed_port:
            self.admin_port = free_port()
        self.site_policies = dict(site_policies or {})
        home = self.workspace / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(env or {})
        self.env["HOME"] = str(home)
        self.env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), self.env.get("PATH", "")])
        self.prod_dir: Path | None = None
        self.server_name = "localhost"
        self.admin_name = ""

    # -- plumbing --------------------------------------------------------------------------------------------
    def run(self, args: Sequence[str], *, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run one NVFlare CLI command (in its own process group, killed on timeout)."""
        cmd = [*nvflare_executable(), *args]
        log.info("$ %s", " ".join(cmd))
        proc = subprocess.Popen(
            cmd,
            env=self.env,
            cwd=self.workspace,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill_group(proc.pid)
            out, _ = proc.communicate()
            raise DeploymentError(f"{' '.join(args)} timed out after {timeout}s:\n{out}") from None
        result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
        if check and proc.returncode != 0:
            raise DeploymentError(f"{' '.join(args)} failed (exit {proc.returncode}):\n{out}")
        return result

    def start_script(self, script: Path) -> None:
        """Start a kit's ``start.sh`` in a new process group (NVFlare daemonises the participant from it)."""
        proc = subprocess.Popen(
            ["bash", str(script)],
            env=self.env,
            cwd=script.parent.parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc.wait(timeout=30)

    def kit(self, name: str) -> Path:
        if self.prod_dir is None:
            raise RuntimeError("the federation has not been prepared")
        return self.prod_dir / name

    @property
    def admin_kit(self) -> Path:
        return self.kit(self.admin_name)

    def _configure_kits(self) -> None:
        for name in (self.server_name, *self.sites):
            allow_project_components(self.kit(name))
        install_restart_guard(self.kit(self.server_name))
        for site, policy in self.site_policies.items():
            install_site_policy(self.kit(site), policy)

    def admin_json(self, args: Sequence[str], *, timeout: float = 60) -> dict[str, Any]:
        """Run an admin command with the admin's startup kit and return NVFlare's JSON answer."""
        result = self.run(
            ["--format", "json", *args, "--startup-kit", str(self.admin_kit)], timeout=timeout, check=False
        )
        lines = [ln for ln in result.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            raise DeploymentError(f"{' '.join(args)}: no JSON answer (exit {result.returncode}):\n{result.stdout}")
        return json.loads(lines[-1])

    # -- jobs ------------------------------------------------------------------------------------------------
    def submit(self, job_folder: str | Path, *, timeout: float = 120) -> str:
        """``nvflare job submit -j <folder>``; return the job id."""
        answer = self.admin_json(["job", "submit", "-j", str(job_folder)], timeout=timeout)
        job_id = (answer.get("data") or {}).get("job_id")
        if answer.get("status") != "ok" or not job_id:
            raise DeploymentError(f"job submit failed: {answer}")
        return str(job_id)

    def wait(self, job_id: str, *, timeout: float = 600) -> str:
        """``nvflare job wait <id>``; return the job's terminal status (e.g. ``FINISHED_OK``)."""
        answer = self.admin_json(["job", "wait", job_id, "--timeout", str(int(timeout))], timeout=timeout + 60)
        data = answer.get("data") or {}
        status = data.get("status") or data.get("job_status") or answer.get("error_code")
        return str(status)

    def download(self, job_id: str, dest: str | Path, *, timeout: float = 120) -> Path:
        """``nvflare job download``: the job's result workspace (server side) into ``dest``; return its folder."""
        answer = self.admin_json(["job", "download", job_id, "-o", str(dest), "--force"], timeout=timeout)
        if answer.get("status") != "ok":
            raise DeploymentError(f"job download failed: {answer}")
        return Path(dest)

    def job_meta(self, job_id: str) -> dict[str, Any]:
        return self.admin_json(["job", "meta", job_id], timeout=60).get("data") or {}

    def server_job_dir(self, job_id: str) -> Path:
        return self.kit(self.server_name) / job_id

    def site_job_dir(self, site: str, job_id: str) -> Path:
        return self.kit(site) / job_id

    # -- processes -------------------------------------------------------------------------------------------
    def processes(self) -> list[Any]:
        """Live processes of this federation: every one runs in, or names, this run's private workspace."""
        import psutil

        root = str(self.workspace)
        found = []
        for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
            if proc.pid == os.getpid():
                continue
            cmd = " ".join(proc.info["cmdline"] or [])
            cwd = proc.info["cwd"] or ""
            if root in cmd or cwd == root or cwd.startswith(root + os.sep):
                found.append(proc)
        return found

    def listeners(self) -> list[Listener]:
        """Every listening TCP socket of this federation's processes."""
        import psutil

        out = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections(kind="inet"):
                    if conn.status == psutil.CONN_LISTEN:
                        out.append(Listener(proc.pid, proc.name(), conn.laddr.ip, conn.laddr.port))
        return out

    def _kill_group(self, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)

    def server_processes(self) -> list[Any]:
        """Live processes of the server: its kit's watchdog script, the server and its job processes."""
        import psutil

        kit = str(self.kit(self.server_name))

        def in_kit(path: str) -> bool:
            return path == kit or path.startswith(kit + os.sep)

        found = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if in_kit(proc.cwd()) or any(in_kit(arg) for arg in proc.cmdline()):
                    found.append(proc)
        return found

    def kill_server(self) -> list[int]:
        """SIGKILL every server process (a crash of the server machine); the sites keep running. Return the pids."""
        import psutil

        procs = self.server_processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]

    def start_server(self, *, timeout: float = 120) -> None:
        """Start the server from its kit's ``startup/start.sh`` and wait until every site is connected again.

        No admin command is sent before the server logs that it started: NVFlare 2.9 opens its admin listener a
        moment before it registers the admin handler, and a command landing in between can leave the admin
        channel unusable."""
        log_file = self.kit(self.server_name) / "log.txt"

        def starts() -> int:
            return log_file.read_text(errors="replace").count(SERVER_STARTED) if log_file.is_file() else 0

        before = starts()
        self.start_script(self.kit(self.server_name) / "startup" / "start.sh")
        deadline = time.monotonic() + timeout
        while starts() <= before and time.monotonic() < deadline:
            time.sleep(0.5)
        self.wait_for_sites(timeout=max(deadline - time.monotonic(), 10))

    def wait_for_sites(self, *, timeout: float = 120) -> None:
        """Wait until the server lists every site as connected (``nvflare system status client``)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(DeploymentError, json.JSONDecodeError):
                last = self.admin_json(["system", "status", "client"], timeout=60)
                if all(site in json.dumps(last) for site in self.sites):
                    return
            time.sleep(2)
        raise DeploymentError(f"sites did not all connect within {timeout}s; last status: {last}")

    def kill_all(self, *, grace_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL, each remaining process of this federation, by pid (nothing else is touched)."""
        import psutil

        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)

    def stop(self) -> None:  # overridden: the graceful way
        pass

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        except Exception as e:  # never mask the test's own failure; the kill below still runs
            log.warning("graceful stop failed: %s", e)
        finally:
            self.kill_all()


class PocFederation(Federation):
    """``nvflare poc``: one machine, mutual-TLS startup kits made by POC provisioning, the server on 127.0.0.1."""

    def __init__(self, workspace: str | Path, **kwargs: Any) -> None:
        super().__init__(workspace, **kwargs)
        self.env["NVFLARE_POC_WORKSPACE"] = str(self.workspace / "poc")
        self.project_file = self.workspace / "project.yml"

    def prepare(self) -> None:
        """``nvflare poc prepare -i project.yml --force``, then the kits' local configuration."""
        render_project(self.project_file, fed_port=self.fed_port, admin_port=self.admin_port, sites=self.sites)
        self.run(["poc", "prepare", "-i", str(self.project_file), "--force"], timeout=120)
        project = yaml.safe_load(self.project_file.read_text())
        self.prod_dir = self.workspace / "poc" / project["name"] / "prod_00"
        self.admin_name = next(p["name"] for p in project["participants"] if p["type"] == "admin")
        self._configure_kits()

    def start(self, *, timeout: float = 120) -> None:
        self.run(["poc", "start", "--timeout", str(int(timeout))], timeout=timeout + 30)

    def stop(self) -> None:
        if self.prod_dir is not None:
            self.run(["poc", "stop"], timeout=90, check=False)


class ProvisionedFederation(Federation):
    """``nvflare provision``: production-style startup kits (mutual TLS), each participant started from its kit."""

    def __init__(self, workspace: str | Path, **kwargs: Any) -> None:
        super().__init__(workspace, **kwargs)
        self.project_file = self.workspace / "project.yml"
        self._started = False

    def prepare(self) -> None:
        render_project(self.project_file, fed_port=self.fed_port, admin_port=self.admin_port, sites=self.sites)
        out_dir = self.workspace / "provision"
        self.run(["provision", "-p", str(self.project_file), "-w", str(out_dir), "--force"], timeout=120)
        project = yaml.safe_load(self.project_file.read_text())
        self.prod_dir = out_dir / project["name"] / "prod_00"
        self.admin_name = next(p["name"] for p in project["participants"] if p["type"] == "admin")
        self._configure_kits()

    def start(self, *, timeout: float = 120) -> None:
        """Start the server, then every site, from their kits; wait until all sites are connected."""
        self.start_script(self.kit(self.server_name) / "startup" / "start.sh")
        self._started = True
        for site in self.sites:
            self.start_script(self.kit(site) / "startup" / "start.sh")
        self.wait_for_sites(timeout=timeout)

    def stop(self) -> None:
        if self._started:
            self.run(
                ["system", "shutdown", "all", "--force", "--startup-kit", str(self.admin_kit)], timeout=90, check=False
            )


@contextlib.contextmanager
def running(federation: Federation, *, start_timeout: float = 120) -> Iterator[Federation]:
    """Prepare and start ``federation``; always stop and clean up when the block ends."""
    with federation:
        federation.prepare()
        federation.start(timeout=start_timeout)
        yield federation
