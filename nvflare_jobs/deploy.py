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
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

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
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(DeploymentError, json.JSONDecodeError):
                last = self.admin_json(["system", "status", "client"], timeout=60)
                if all(site in json.dumps(last) for site in self.sites):
                    return
            time.sleep(2)
        raise DeploymentError(f"sites did not all connect within {timeout}s; last status: {last}")

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
