"""Scale of the federation (issue 19, item 3): the project's NVFlare job in the simulator with 3, 10 and 30 sites.

For each number of sites: the real job (``nvflare_jobs.fetal_brain.job.run_simulation``, FedAvg, weight DIFFs, the
audit filters and update guard as in production) on tiny synthetic sites (``write_federation``: 2 cases per site,
32³ at 4 mm, 2 rounds × 1 local epoch of 1 step), and per round:

* wall time: from "Round N started" to the round's aggregation in the server log;
* server memory: RSS of the simulator's server process (the process that runs the server app and the simulator's
  client runner; the site workers are its children), sampled every 0.5 s from /proc via psutil, peak per round, and
  its kernel high-water mark (VmHWM); the whole process tree's peak beside it;
* bytes received by the server: measured two ways, both per round — NVFlare's own log of each transfer (the
  server's "[client] download ... (N bytes)" of every update's array stream, plus each site's "SubmitUpdate ... (N
  Bytes)" envelope) and the payload the server's audit filter (``nvflare_jobs.audit.ServerAuditFilter``) recorded
  as it arrived (``received.jsonl``: array bytes of each DIFF). Bytes the server sent (the global model to each
  site) are read from the same logs.

Then one fault run: the largest size (30 sites) where 3 sites die mid-round (the site's process is frozen with
SIGSTOP in its training step, ``--die-how stop``, or killed, ``kill``; in every round from ``--die-round`` on) and
``min_clients`` is set below the survivors: the job must complete and the server log must show each round
continuing with the survivors.
The time the server waited for the dead sites is read from its log and audit trail (last valid update -> round
closed; ``straggler_wait_s`` after ``min_clients`` valid updates arrived).

How the sites share one machine (2 cores here): clients run in-process (``runtime.external_process: false``: one
process per site turn instead of two) and the simulator gets far fewer threads than sites, so the sites take turns;
each turn is a fresh simulator worker process (Python, torch and MONAI imports, the site's data and model), which
dominates per-round time here. In the simulator a frozen site process holds its simulator thread until the job's
last round has closed (then this script kills it), so the fault run gets one thread per dying site + 2; a killed
one ends its thread, and with no thread left the simulator aborts the server (see the report).

Memory guard: before each run the expected footprint (server + threads × worker) must leave ``--min-free-gb`` of
available memory; during a run, available memory below that aborts the run (its processes are killed) and the
size is reported as not run.

    python bench/bench_scale.py                         # 3, 10, 30 sites + the 30-site fault run
    python bench/bench_scale.py --sites 2 3 --fault-sites 4 --dead 1 --out /tmp/scale.md   # smoke run

Writes bench/results/scale.md, scale.json and scale.png.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Self

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TINY = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}
EDGE = 32
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"
GB = 1024**3
MB = 1024**2
# measured here (2026-12-03, 2 cores): a simulator worker with an in-process site ~0.6 GB, the server process ~0.6 GB
WORKER_GB = 0.7
SERVER_GB = 1.0

DEPLOYMENT = (
    "On one machine the limits are CPU (each site's training shares the same cores: round time grows linearly with "
    "the sites) and memory (every site process that runs at once holds torch, MONAI and its data, ~0.7 GB "
    "measured, so 30 sites at once would need ~21 GB). The server itself grows slowly with the sites (a few MB of "
    "update per site per round, aggregated in turn), so it is not what outgrows one machine. A federation of real "
    "hospitals runs each site on its own machine: NVFlare's provisioned (production) deployment — `nvflare "
    "provision` with a project.yml naming the server and every site, one startup kit per participant, mutual TLS, "
    "each site running its own client against the one server (`ProdEnv` / `nvflare job submit`); POC mode is the "
    "same on one host for rehearsal. Nothing here distributes the simulator by hand."
)

# The dying site: the production client script, whose process is SIGKILLed in its training step in every round
# from --die-round on (written next to the job's data; NVFlare copies it into the site's custom/ folder).
DYING_CLIENT = '''\
"""A site that dies mid-round (bench/bench_scale.py): the production client; SIGKILL in training from a round on."""
import argparse
import json
import os
import pathlib
import signal
import time

import nvflare.client as flare

from nvflare_jobs.fetal_brain import client

parser = argparse.ArgumentParser()
parser.add_argument("--die-round", type=int, required=True)
parser.add_argument("--record", required=True)
parser.add_argument("--site", required=True)
parser.add_argument("--how", choices=["stop", "kill"], default="stop")
args, rest = parser.parse_known_args()
# in-process, the script runs from where it was written with the site workspace as cwd: point --config at the
# job config NVFlare deployed into the site's app (custom/ folder)
if "--config" in rest:
    i = rest.index("--config") + 1
    if not os.path.isfile(rest[i]):
        found = sorted(pathlib.Path.cwd().glob("**/custom/" + os.path.basename(rest[i])))
        if found:
            rest[i] = str(found[0])
state = {"round": None}
receive = flare.receive


def receive_and_note(*a, **k):
    model = receive(*a, **k)
    if model is not None:
        state["round"] = int(model.current_round or 0)
    return model


train_round = client.SiteTrainer.train_round


def dying_train_round(self, **kwargs):
    if state["round"] is not None and state["round"] >= args.die_round:
        with open(args.record, "a") as f:
            row = {"site": args.site, "round": state["round"], "time": time.time(), "how": args.how}
            f.write(json.dumps(row) + "\\n")
            f.flush()
            os.fsync(f.fileno())
        # stop: the process freezes mid-round (no answer, no goodbye, sockets left open: a crashed or cut-off site)
        # kill: the process vanishes (in the simulator this also ends the simulator thread that ran it)
        os.kill(os.getpid(), signal.SIGSTOP if args.how == "stop" else signal.SIGKILL)
    return train_round(self, **kwargs)


flare.receive = receive_and_note
client.SiteTrainer.train_round = dying_train_round
client.main(rest)
'''


def _setup_environment() -> None:
    """NVFlare's worker processes must find this checkout and this interpreter (as ``python3``)."""
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    sys.path.insert(0, str(ROOT))


def site_names(n: int) -> list[str]:
    return [f"site-{i + 1}" for i in range(n)]


def job_config(
    n_sites: int,
    data_root: Path,
    args: argparse.Namespace,
    name: str,
    *,
    min_clients: int | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "algorithm": "fedavg",
        "num_rounds": rounds or args.rounds,
        "min_clients": n_sites if min_clients is None else min_clients,
        "sites": site_names(n_sites),
        "bundle_overrides": TINY,
        "data": {"root": str(data_root), "split_seed": args.seed},
        "training": {"local_epochs": 1, "max_steps_per_epoch": 1, "seed": args.seed},
        "server": {"straggler_wait_s": args.straggler_wait, "task_timeout_s": args.task_timeout},
        "tracking": None,
        "cross_site_eval": False,
        # in-process sites: one process per site turn; one torch thread each (the sites share 2 cores)
        "runtime": {"external_process": False, "init_seed": args.seed, "torch_threads": 1},
    }


def fault_threads(dead: int, n_sites: int, free: int = 2) -> int:
    """Simulator threads for the fault run: a frozen site process holds the simulator thread that runs it for the
    rest of the job, so the dead sites get one each and ``free`` threads run the survivors."""
    return max(1, min(n_sites, dead + free))


# ------------------------------------------------------------------------------------------------------ sampling
class _Background:
    """Runs ``_run`` in a daemon thread for the length of a ``with`` block; ``_run`` ends when ``_stop`` is set."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        raise NotImplementedError


class MemorySampler(_Background):
    """Samples the simulator's processes (children of this process) every ``interval`` s; aborts below a floor.

    The server process: the simulator's process whose cwd is the server workspace (it runs the server app; the
    simulator launcher and its multiprocessing manager above it are small); site workers: ``simulator_worker``.
    """

    def __init__(self, min_free_bytes: int, interval: float = 0.5) -> None:
        import psutil

        super().__init__()
        self.psutil = psutil
        self.me = psutil.Process()
        self.min_free = min_free_bytes
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self.server_hwm = 0
        self.server_pid: int | None = None
        self.aborted: str | None = None
        self.min_available = psutil.virtual_memory().available

    @staticmethod
    def _hwm(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _server(self, procs: list[Any]) -> Any:
        best, best_rss = None, -1
        for p in procs:
            try:
                cmd = " ".join(p.cmdline())
                if "simulator_worker" in cmd:
                    continue
                if p.cwd().endswith(os.sep + "server"):
                    return p
                rss = p.memory_info().rss
                if rss > best_rss:
                    best, best_rss = p, rss
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
        return best

    def _run(self) -> None:
        ps = self.psutil
        while not self._stop.wait(self.interval):
            try:
                procs = self.me.children(recursive=True)
            except ps.NoSuchProcess:
                continue
            server = self._server(procs)
            server_rss = workers_rss = tree_rss = 0
            workers = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    tree_rss += rss
                    if server is not None and p.pid == server.pid:
                        server_rss = rss
                    elif "simulator_worker" in " ".join(p.cmdline()):
                        workers_rss += rss
                        workers += 1
                except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                    continue
            if server is not None:
                self.server_pid = server.pid
                self.server_hwm = max(self.server_hwm, self._hwm(server.pid))
            available = ps.virtual_memory().available
            self.min_available = min(self.min_available, available)
            self.samples.append(
                {
                    "time": time.time(),
                    "server_rss": server_rss,
                    "workers_rss": workers_rss,
                    "workers": workers,
                    "tree_rss": tree_rss,
                    "available": available,
                }
            )
            if available < self.min_free and self.aborted is None:
                self.aborted = f"available memory {available / GB:.1f} GB < {self.min_free / GB:.1f} GB: run killed"
                for p in reversed(procs):  # the simulator's processes (all started by this run), by pid
                    with contextlib.suppress(ps.NoSuchProcess):
                        p.send_signal(signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------- log parsing
def _ts(text: str) -> float:
    return datetime.strptime(text, LOG_TIME).timestamp()


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - ")


def round_windows(server_log: str) -> list[dict[str, Any]]:
    """Per round: start ("Round N started", the banner's timestamp), end (the project's aggregation line),
    and that line's kind ("aggregating" = all sites, "continuing" = survivors only)."""
    starts: dict[int, float] = {}
    ends: dict[int, tuple[float, str, str]] = {}
    last = None
    for line in server_log.splitlines():
        m = _STAMP.match(line)
        if m:
            last = _ts(m.group(1))
        s = re.search(r"Round (\d+) started\.", line)
        if s and last is not None:
            starts.setdefault(int(s.group(1)), last)
        e = re.search(r"round (\d+): (aggregating|continuing)(.*)$", line)
        if e and last is not None:
            ends[int(e.group(1))] = (last, e.group(2), e.group(2) + e.group(3))
    return [
        {"round": r, "start": starts[r], "end": ends[r][0], "seconds": ends[r][0] - starts[r], "closed": ends[r][1],
         "message": ends[r][2].strip()}
        for r in sorted(starts)
        if r in ends
    ]  # fmt: skip


def _in_round(t: float, windows: list[dict[str, Any]]) -> int | None:
    for w in windows:
        if w["start"] <= t <= w["end"] + 1e-3:
            return w["round"]
    return None


def log_bytes(path: Path, pattern: str) -> list[tuple[float, int]]:
    """(time, bytes) of every log line matching ``pattern`` (its group 1 = the byte count, commas allowed)."""
    if not path.is_file():
        return []
    rx = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - .*" + pattern)
    out = []
    for line in path.read_text(errors="replace").splitlines():
        m = rx.match(line)
        if m:
            out.append((_ts(m.group(1)), int(m.group(2).replace(",", ""))))
    return out


RECEIVED_STREAM = r"\[client\] download ref=\S+ done: .*\(([\d,]+) bytes\)"  # server log: server fetched an update
SENT_STREAM = r"\[server\] download tx \S+ done: status=finished .*\(([\d,]+) bytes\)"  # server log: model served
LOST_THREAD = r"Subprocess died for client|Communication error with client"  # simulator: a site process vanished
SUBMIT_ENVELOPE = r"SubmitUpdate to: server\. size: .*\((\d+) Bytes\)"  # site log: the result message itself


def per_round_bytes(run: Path, windows: list[dict[str, Any]], sites: list[str]) -> dict[int, dict[str, int]]:
    """Bytes per round from NVFlare's logs and the server's audit trail (see the module doc)."""
    out = {w["round"]: {"received_stream": 0, "received_envelope": 0, "sent_stream": 0, "audit_payload": 0,
                        "audit_updates": 0, "streams_received": 0} for w in windows}  # fmt: skip
    server_log = run / "server" / "log.txt"
    for key, pattern, count in (("received_stream", RECEIVED_STREAM, "streams_received"), ("sent_stream", SENT_STREAM,
                                                                                           None)):  # fmt: skip
        for t, n in log_bytes(server_log, pattern):
            r = _in_round(t, windows)
            if r is not None:
                out[r][key] += n
                if count:
                    out[r][count] += 1
    for site in sites:
        for t, n in log_bytes(run / site / "log.txt", SUBMIT_ENVELOPE):
            r = _in_round(t, windows)
            if r is not None:
                out[r]["received_envelope"] += n
    for rec in _audit_records(run):
        r = rec.get("round")
        if r in out:
            out[r]["audit_payload"] += int(rec.get("bytes", 0))
            out[r]["audit_updates"] += 1
    return out


def _audit_records(run: Path) -> list[dict[str, Any]]:
    """The server audit filter's records of the updates it received (unreadable lines skipped)."""
    audit = run / "server" / "audit" / "received.jsonl"
    records = []
    for line in audit.read_text().splitlines() if audit.is_file() else []:
        with contextlib.suppress(json.JSONDecodeError):
            records.append(json.loads(line))
    return records


def audit_times(run: Path) -> dict[int, list[tuple[float, str]]]:
    """Per round: (arrival time, site) of every update the server's audit filter recorded, in order."""
    out: dict[int, list[tuple[float, str]]] = {}
    for rec in _audit_records(run):
        out.setdefault(int(rec["round"]), []).append((float(rec["time"]), str(rec["site"])))
    return {r: sorted(v) for r, v in out.items()}


def waits(windows: list[dict[str, Any]], arrivals: dict[int, list[tuple[float, str]]], min_clients: int,
          deaths: list[dict[str, Any]]) -> list[dict[str, Any]]:  # fmt: skip
    """Per round: when the min_clients-th and the last update arrived, when sites died, and how long the server then
    waited before closing the round (the time spent on sites that never answered)."""
    rows = []
    for w in windows:
        got = arrivals.get(w["round"]) or arrivals.get(str(w["round"])) or []  # (str keys: read back from JSON)
        died = sorted(d["time"] for d in deaths if d["round"] == w["round"])
        row = {
            "round": w["round"],
            "updates": len(got),
            "closed": w["closed"],
            "message": w["message"],
            "round_s": w["seconds"],
            "sites_died": len(died),
        }
        if len(got) >= min_clients:
            row["min_clients_reached_s"] = got[min_clients - 1][0] - w["start"]
            row["waited_after_min_clients_s"] = w["end"] - got[min_clients - 1][0]
        if got:
            row["last_update_s"] = got[-1][0] - w["start"]
            row["waited_after_last_update_s"] = w["end"] - got[-1][0]
        if died:
            row["last_death_s"] = died[-1] - w["start"]
            row["waited_after_last_death_s"] = w["end"] - died[-1]
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------------- one run
def _peak_mb(samples: list[dict[str, float]], key: str) -> float:
    """The largest ``key`` (bytes) among memory samples, in MB (0 without samples)."""
    return max((s[key] for s in samples), default=0) / MB


def _reused(saved: Path, name: str, accept: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """A run's result saved by an earlier invocation (``--reuse``), if there is one and ``accept`` (if given) takes
    it; marked with where it came from."""
    if not saved.is_file():
        return None
    old = json.loads(saved.read_text())
    old["job_completed"] = _completed(old)
    if accept is not None and not accept(old):
        return None
    print(f"[bench_scale] {name}: reusing {saved}", flush=True)
    old["reused_from"] = str(saved)
    return old


def run_one(
    args: argparse.Namespace,
    data_root: Path,
    work: Path,
    n_sites: int,
    threads: int,
    *,
    name: str,
    min_clients: int | None = None,
    per_site_config: dict[str, dict[str, str]] | None = None,
    rounds: int | None = None,
) -> dict[str, Any]:
    import psutil

    from nvflare_jobs.fetal_brain.job import run_simulation

    sites = site_names(n_sites)
    rounds = rounds or args.rounds
    saved = work / f"{name}.result.json"  # each run's result, so a later invocation can reuse it (--reuse)

    def same_run(r: dict[str, Any]) -> bool:
        return r["job_completed"] and r["threads"] == threads and r["config"]["num_rounds"] == rounds

    old = _reused(saved, name, same_run) if args.reuse else None
    if old is not None:
        return old
    need = (SERVER_GB + threads * WORKER_GB) * GB
    available = psutil.virtual_memory().available
    result: dict[str, Any] = {"sites": n_sites, "threads": threads, "name": name, "expected_peak_gb": need / GB,
                              "available_before_gb": available / GB}  # fmt: skip
    if available - need < args.min_free_gb * GB:
        result["skipped"] = (
            f"expected {need / GB:.1f} GB would leave {(available - need) / GB:.1f} GB < {args.min_free_gb:g} GB free"
        )
        print(f"[bench_scale] {name}: SKIPPED ({result['skipped']})", flush=True)
        return result
    cfg = job_config(n_sites, data_root, args, name, min_clients=min_clients, rounds=rounds)
    result["config"] = cfg
    load_before = os.getloadavg()
    start = time.time()
    result["started"] = start
    error = None
    with MemorySampler(int(args.min_free_gb * GB)) as sampler:
        try:
            run = run_simulation(cfg, work / name, per_site_config=per_site_config, num_threads=threads)
        except Exception as exc:  # a failed job is a result here (reported), not a crash of the benchmark
            error = f"{type(exc).__name__}: {exc}"
            run = work / name / name
    wall = time.time() - start
    result.update(wall_s=wall, load_before=load_before, load_after=os.getloadavg(), error=error,
                  aborted=sampler.aborted, min_available_gb=sampler.min_available / GB)  # fmt: skip
    server_log = (run / "server" / "log.txt").read_text(errors="replace") if (run / "server").is_dir() else ""
    windows = round_windows(server_log)
    bytes_by_round = per_round_bytes(run, windows, sites)
    samples = sampler.samples
    times = [s["time"] for s in samples]
    per_round = []
    for w in windows:
        lo, hi = bisect.bisect_left(times, w["start"]), bisect.bisect_right(times, w["end"])
        inside = samples[lo:hi] or samples[-1:]
        per_round.append(
            {
                **{k: w[k] for k in ("round", "seconds", "closed", "message")},
                "seconds_per_site": w["seconds"] / n_sites,
                "server_peak_rss_mb": _peak_mb(inside, "server_rss"),
                "tree_peak_rss_mb": _peak_mb(inside, "tree_rss"),
                "max_concurrent_workers": max((s["workers"] for s in inside), default=0),
                **bytes_by_round.get(w["round"], {}),
            }
        )
    result.update(
        rounds=per_round,
        rounds_completed=len(windows),
        job_completed=error is None and sampler.aborted is None and len(windows) == rounds,  # see _completed
        server_hwm_mb=sampler.server_hwm / MB,
        server_peak_rss_mb=_peak_mb(samples, "server_rss"),
        tree_peak_rss_mb=_peak_mb(samples, "tree_rss"),
        workers_peak_rss_mb=_peak_mb(samples, "workers_rss"),
        samples=len(samples),
        run_dir=str(run),
        simulator_lost_threads=len(re.findall(LOST_THREAD, server_log)),
        arrivals=audit_times(run),
        server_log=server_log,
    )
    saved.write_text(json.dumps(result, indent=2, default=str))
    state = "completed" if result["job_completed"] else f"NOT completed ({error or sampler.aborted})"
    print(f"[bench_scale] {name}: {n_sites} sites, {threads} threads, {wall:.0f} s, {state}; rounds "
          f"{[round(r['seconds'], 1) for r in per_round]} s; server peak {result['server_peak_rss_mb']:.0f} MB",
          flush=True)  # fmt: skip
    return result


def fault_run(args: argparse.Namespace, data_root: Path, work: Path, how: str) -> dict[str, Any]:
    """The fault run with the dying sites' processes frozen (``how="stop"``) or killed (``"kill"``)."""
    n = args.fault_sites
    dying = [site_names(n)[round((i + 1) * n / args.dead) - 1] for i in range(args.dead)]  # spread over the order
    survivors = n - len(dying)
    min_clients = args.fault_min_clients or max(1, survivors - 2)
    rounds = args.fault_rounds or args.rounds
    threads = args.fault_threads or fault_threads(len(dying), n)
    name = f"fault_{n}_{how}"
    record = work / f"deaths_{how}.jsonl"
    saved = work / f"{name}.result.json"
    res = _reused(saved, name) if args.reuse else None  # a fault run is a behaviour test: reused even if it failed
    if res is None:
        record.unlink(missing_ok=True)
        script_dir = work / "dying_client"
        script_dir.mkdir(parents=True, exist_ok=True)
        script = script_dir / "dying_client.py"
        script.write_text(DYING_CLIENT)
        per_site = {
            site: {
                "train_script": str(script),
                "train_args": f"--die-round {args.die_round} --how {how} --record {record} --site {site} "
                "--config fetal_fl_job.json",
            }
            for site in dying
        }
        run_log = work / name / name / "server" / "log.txt"
        with StoppedReaper(run_log, rounds):
            res = run_one(args, data_root, work, n, threads, name=name, min_clients=min_clients,
                          per_site_config=per_site, rounds=rounds)  # fmt: skip
    deaths = [json.loads(x) for x in record.read_text().splitlines()] if record.is_file() else res.get("deaths", [])
    res.update(dying_sites=dying, min_clients=min_clients, survivors=survivors, die_round=args.die_round, how=how,
               deaths=deaths, straggler_wait_s=args.straggler_wait, task_timeout_s=args.task_timeout)  # fmt: skip
    if "skipped" in res:
        return res
    if "server_log" in res:
        windows = round_windows(res["server_log"])
        res["waits"] = waits(windows, res["arrivals"], min_clients, deaths)
        res["continuing_lines"] = re.findall(r"round \d+: continuing with [^\n]*", res["server_log"])
        # the simulator aborts its server when every client thread has ended: after the job's end that is its normal
        # shutdown, before it the job was cut short
        log = res["server_log"]
        abort = log.find("asked to abort - triggered abort_signal")
        res["simulator_aborted_server"] = abort >= 0 and "Finished FedAvg" not in log[:abort]
    saved.write_text(json.dumps(res, indent=2, default=str))
    return res


class StoppedReaper(_Background):
    """Frozen site processes (SIGSTOP) block the simulator thread that runs them until they end: once the server log
    shows the job's last round closed (or the job ending), this kills them (by pid; descendants of this process), so
    the simulator can finish."""

    DONE = re.compile(r"round (\d+): (?:aggregating|continuing)|Finished FedAvg|triggered abort_signal|END_RUN fired")

    def __init__(self, server_log: Path, rounds: int) -> None:
        super().__init__()
        self.server_log, self.rounds = server_log, rounds
        self.killed: list[int] = []

    def _done(self) -> bool:
        text = self.server_log.read_text(errors="replace") if self.server_log.is_file() else ""
        return any(m.group(1) is None or int(m.group(1)) >= self.rounds - 1 for m in self.DONE.finditer(text))

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(2.0):
            if not self._done():
                continue
            for p in me.children(recursive=True):
                with contextlib.suppress(psutil.NoSuchProcess):
                    if p.status() == psutil.STATUS_STOPPED:
                        p.send_signal(signal.SIGKILL)
                        self.killed.append(p.pid)


# ----------------------------------------------------------------------------------------------------- reporting
def _mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.get("rounds")]
    if not done:
        return
    n = [r["sites"] for r in done]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for rnd, marker in ((0, "o"), (1, "s")):
        ys = [next((x["seconds"] for x in r["rounds"] if x["round"] == rnd), float("nan")) for r in done]
        axes[0].plot(n, ys, marker=marker, label=f"round {rnd}" + (" (start-up)" if rnd == 0 else ""))
    axes[0].set(title="wall time per round", xlabel="sites", ylabel="s")
    axes[0].legend()
    axes[1].plot(n, [r["server_peak_rss_mb"] for r in done], marker="o", label="server process (peak RSS)")
    axes[1].plot(n, [r["tree_peak_rss_mb"] for r in done], marker="s", label="server + site workers")
    axes[1].set(title="memory (peak)", xlabel="sites", ylabel="MB")
    axes[1].legend()
    axes[2].plot(n, [_mean([(x["received_stream"] + x["received_envelope"]) / MB for x in r["rounds"]]) for r in done],
                 marker="o", label="received (NVFlare log)")  # fmt: skip
    axes[2].plot(n, [_mean([x["audit_payload"] / MB for x in r["rounds"]]) for r in done], marker="x", ls="--",
                 label="DIFF payload (audit)")  # fmt: skip
    axes[2].plot(n, [_mean([x["sent_stream"] / MB for x in r["rounds"]]) for r in done], marker="s",
                 label="sent (global model)")  # fmt: skip
    axes[2].set(title="server bytes per round", xlabel="sites", ylabel="MB")
    axes[2].legend()
    for ax in axes:
        ax.set_xticks(n)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _machine() -> dict[str, Any]:
    import psutil

    cpu = ""
    with contextlib.suppress(OSError):
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in info if "model name" in ln), "")
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gb": psutil.virtual_memory().total / GB, "python": platform.python_version()}  # fmt: skip


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("nvflare", "torch", "monai"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # a version is informative only
            out[mod] = "?"
    return out


def report(args: argparse.Namespace, rows: list[dict[str, Any]], faults: list[dict[str, Any]],
           meta: dict[str, Any]) -> str:  # fmt: skip
    lines = [
        f"# Scale of the federation: {', '.join(str(s) for s in args.sites)} simulated sites",
        "",
        f"{meta['date']}, {meta['machine']['cpu']} ({meta['machine']['cores']} cores, "
        f"{meta['machine']['memory_gb']:.0f} GB), NVFlare {meta['versions']['nvflare']}, torch "
        f"{meta['versions']['torch']}; load average {meta['load_before'][0]:.1f} before the first run, "
        f"{meta['load_after'][0]:.1f} after the last (machine shared with other work; each run's own in the table "
        f"and the JSON); the runs took {meta['runs_s'] / 60:.1f} min.",
        "",
        f"The project's job (FedAvg, weight DIFFs, audit filters, update guard) in NVFlare's simulator; each site has "
        f"2 synthetic cases ({EDGE}³ at 4 mm), {args.rounds} rounds × 1 local epoch of 1 step (fewer where listed "
        f"under Reduced), seed {args.seed}. "
        "Sites run in-process (`runtime.external_process: false`) and the simulator gets "
        f"{args.threads} thread(s), so the sites take turns: each turn is a fresh worker process (imports, data, "
        "model), which is most of the time per site here. Round 0 also holds the server's start-up of the sites.",
        "",
        "| sites | threads | load avg before | round 0 (s) | round 1 (s) | s per site (last round) | "
        "server peak RSS (MB) | "
        "server + workers peak (MB) | received per round (MB, NVFlare log) | DIFF payload per round (MB, audit) | "
        "sent per round (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.get("rounds"):
            why = r.get("skipped") or r.get("aborted") or r.get("error")
            lines.append(f"| {r['sites']} | {r['threads']} | | not run: {why} | | | | | | | |")
            continue
        by = {x["round"]: x for x in r["rounds"]}
        last = by.get(max(by))
        rec = _mean([(x["received_stream"] + x["received_envelope"]) / MB for x in r["rounds"]])
        lines.append(
            f"| {r['sites']} | {r['threads']} | {r['load_before'][0]:.1f} | {by[0]['seconds']:.0f} | "
            f"{format(by[1]['seconds'], '.0f') if 1 in by else '– (not run)'} | {last['seconds_per_site']:.1f} | "
            f"{r['server_peak_rss_mb']:.0f} | {r['tree_peak_rss_mb']:.0f} | {rec:.1f} | "
            f"{_mean([x['audit_payload'] / MB for x in r['rounds']]):.1f} | "
            f"{_mean([x['sent_stream'] / MB for x in r['rounds']]):.1f} |"
        )
    done = [r for r in rows if r.get("rounds")]
    if len(done) >= 2:
        a, b = done[0], done[-1]
        per = lambda r: (r["rounds"][0]["received_stream"] + r["rounds"][0]["received_envelope"]) / r["sites"]  # noqa: E731
        lines += [
            "",
            f"From {a['sites']} to {b['sites']} sites: round 0 time × "
            f"{b['rounds'][0]['seconds'] / a['rounds'][0]['seconds']:.1f} "
            f"(sites × {b['sites'] / a['sites']:.0f}), server peak RSS {a['server_peak_rss_mb']:.0f} → "
            f"{b['server_peak_rss_mb']:.0f} MB, bytes received per round grow linearly "
            f"({per(a) / MB:.2f} MB per site per round at {a['sites']}, {per(b) / MB:.2f} at {b['sites']}). "
            "Bytes: NVFlare's own transfer log (the server's download of each update's array stream + the site's "
            "SubmitUpdate envelope); the audit column is the DIFF payload the server's audit filter recorded "
            "(`received.jsonl`, measured at arrival). Memory: sampled every 0.5 s from /proc (psutil); the server "
            f"process also hosts the simulator's client runner. Its kernel high-water mark (VmHWM): "
            + ", ".join(f"{r['sites']} sites {r['server_hwm_mb']:.0f} MB" for r in done)
            + ".",
        ]
    for fault in faults:
        what = {"stop": "process frozen", "kill": "process killed"}.get(fault.get("how", ""), "")
        lines += ["", f"## {fault['sites']} sites, {len(fault['dying_sites'])} of them dying mid-round ({what})", ""]
        if "skipped" in fault:
            lines.append(f"Not run: {fault['skipped']}.")
        else:
            how = (
                "frozen (SIGSTOP: no answer, no goodbye, its sockets left open, as a crashed or cut-off machine looks "
                "to the server)"
                if fault.get("how", "kill") == "stop"
                else "killed (SIGKILL)"
            )
            threads_note = (
                f"each frozen site holds one for the rest of the job, {len(fault['dying_sites'])} + 2 free"
                if fault.get("how", "kill") == "stop"
                else f"a killed site process ends the simulator thread that ran it: {fault['simulator_lost_threads']} "
                "lost"
            )
            outcome = "**completed**" if fault["job_completed"] else "**did not complete**: " + _why(fault)
            if fault.get("simulator_aborted_server"):
                outcome += " (the simulator aborted the server: all its client threads had ended)"
            lines += [
                f"Dying sites {', '.join(fault['dying_sites'])}: their process is {how} in its training step, in "
                f"every round from round {fault['die_round']} on ({len(fault['deaths'])} deaths recorded). "
                f"`min_clients` = {fault['min_clients']} (survivors: {fault['survivors']}), `straggler_wait_s` = "
                f"{fault['straggler_wait_s']}, `task_timeout_s` = {fault['task_timeout_s']} (0 = none); "
                f"{fault['threads']} simulator threads ({threads_note}). Job {outcome} in {fault['wall_s']:.0f} s, "
                f"{fault['rounds_completed']} of {fault['config']['num_rounds']} round(s), "
                f"{sum(len(v) for v in fault.get('arrivals', {}).values())} valid updates received in all; server "
                f"peak RSS {fault['server_peak_rss_mb']:.0f} MB.",
            ]
            if fault.get("waits"):
                lines += [
                    "",
                    "| round | round time (s) | updates received | sites died | min_clients reached at (s) | last "
                    "update at (s) | server waited after last update (s) | after min_clients (s) | closed |",
                    "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
                ]
            for w in fault.get("waits", []):
                f = lambda k, w=w: f"{w[k]:.0f}" if k in w else "–"  # noqa: E731
                lines.append(
                    f"| {w['round']} | {w['round_s']:.0f} | {w['updates']} | {w['sites_died']} | "
                    f"{f('min_clients_reached_s')} | {f('last_update_s')} | {f('waited_after_last_update_s')} | "
                    f"{f('waited_after_min_clients_s')} | {w['closed']} |"
                )
            if fault.get("continuing_lines"):
                lines += ["", "Server log:", "", *(f"    {c}" for c in fault["continuing_lines"])]
            if fault.get("waits"):
                lines += [
                    "",
                    "The server waited for the dead sites until `straggler_wait_s` had passed since valid update "
                    f"number min_clients = {fault['min_clients']} (NVFlare's `wait_time_after_min_received`); a "
                    "lower `straggler_wait_s` shortens that wait but also cuts off slow live sites. In the simulator "
                    "the dead sites stay registered, so every round would target them again and wait again; a "
                    "provisioned server drops a site after its heartbeat timeout (`heart_beat_timeout`, 600 s by "
                    "default; not measured here).",
                ]
            if fault.get("how") == "kill":
                lines += [
                    "",
                    "With SIGKILL the simulator itself is the weak point: a simulator worker that dies ends the "
                    "client thread that ran it (NVFlare 2.9 `SimulatorClientRunner.do_one_task`), a thread that "
                    "finds no task for a site moves on within seconds and restarts the dead site, which gets its "
                    "task resent and dies again; when the last thread has ended the simulator aborts the server, "
                    "even though min_clients valid updates had arrived and the server was only waiting out "
                    "`straggler_wait_s`. Simulate dead sites by freezing them (`--die-how stop`), or test crashes in "
                    "POC mode, where each site is its own client process as in production.",
                ]
    lines += ["", "## Where this outgrows one machine", "", DEPLOYMENT]
    if meta["reduced"]:
        lines += ["", "## Reduced (not run as asked)", "", *(f"- {x}" for x in meta["reduced"])]
    return "\n".join(lines) + "\n"


def _completed(r: dict[str, Any]) -> bool:
    """Every planned round aggregated, no error, not aborted."""
    planned = r.get("config", {}).get("num_rounds")
    return not r.get("error") and not r.get("aborted") and r.get("rounds_completed") == planned


def _why(r: dict[str, Any]) -> str:
    """Why a run did not complete, in words."""
    return str(r.get("skipped") or r.get("aborted") or r.get("error") or "rounds missing")


def _strip(r: dict[str, Any] | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {k: v for k, v in r.items() if k not in ("server_log",)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="*", default=[3, 10, 30], help="federation sizes to measure")
    parser.add_argument("--threads", type=int, default=2, help="simulator threads for the size runs (sites take turns)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--site-rounds", nargs="*", default=[], metavar="N=R",
                        help="rounds for a size other than --rounds, e.g. 30=1")  # fmt: skip
    parser.add_argument("--fault-rounds", type=int, help="rounds of the fault run (default: --rounds)")
    parser.add_argument("--reuse", action="store_true", help="reuse a completed run's result saved in --work")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fault-sites", type=int, default=30, help="sites of the fault run (0: no fault run)")
    parser.add_argument("--dead", type=int, default=3, help="sites that die in the fault run")
    parser.add_argument("--die-how", nargs="+", choices=["stop", "kill"], default=["stop"],
                        help="dying sites' process frozen (stop) or killed (kill); one run each")  # fmt: skip
    parser.add_argument("--die-round", type=int, default=0, help="the dying sites die in every round from this one")
    parser.add_argument("--fault-min-clients", type=int, help="default: survivors - 2")
    parser.add_argument("--fault-threads", type=int, help="default: one per site death + 1 (see fault_threads)")
    parser.add_argument("--straggler-wait", type=int, default=60, help="server.straggler_wait_s")
    parser.add_argument("--task-timeout", type=int, default=0, help="server.task_timeout_s (0 = none)")
    parser.add_argument("--min-free-gb", type=float, default=5.0, help="never let available memory drop below this")
    parser.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale.md")
    args = parser.parse_args(argv)
    _setup_environment()
    from fetalseg.data.federation import write_federation

    started = time.time()
    load_before = os.getloadavg()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    data_root = work / "federation"
    n_data = max([*args.sites, args.fault_sites])
    if not (data_root / "federation.json").exists():
        write_federation(data_root, n_sites=n_data, cases_per_site=2, shape=(EDGE,) * 3, seed=args.seed)
    reduced: list[str] = []
    rows = []
    site_rounds = {int(k): int(v) for k, v in (x.split("=") for x in args.site_rounds)}
    for n in args.sites:
        rounds = site_rounds.get(n, args.rounds)
        rows.append(run_one(args, data_root, work, n, min(args.threads, n), name=f"scale_{n}", rounds=rounds))
        if rounds < args.rounds:
            reduced.append(f"{n} sites: {rounds} round(s) instead of {args.rounds} (time)")
        if not rows[-1].get("job_completed"):
            reduced.append(f"{n} sites: {_why(rows[-1])}")
    faults = [fault_run(args, data_root, work, how) for how in args.die_how] if args.fault_sites else []
    for fault in faults:
        if not fault.get("job_completed"):
            note = " (a simulator limit, see its section)" if fault.get("simulator_aborted_server") else ""
            reduced.append(f"fault run ({args.fault_sites} sites, {fault['how']}): {_why(fault)}{note}")
    if args.fault_sites and (args.fault_rounds or args.rounds) < args.rounds:
        reduced.append(f"fault run: {args.fault_rounds} round(s) instead of {args.rounds} (time)")
    if args.fault_sites and args.fault_sites < 30:
        reduced.append(f"fault run with {args.fault_sites} sites, not 30")
    all_runs = [r for r in [*rows, *faults] if "wall_s" in r]
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "versions": _versions(),
        # this invocation's; runs reused from --work keep their own load and wall time (in "runs" / "faults")
        "load_before": all_runs[0]["load_before"] if all_runs else load_before,  # (runs in the order they ran)
        "load_after": all_runs[-1]["load_after"] if all_runs else os.getloadavg(),
        "runs_s": sum(r.get("wall_s", 0.0) for r in all_runs),
        "total_s": time.time() - started,
        "reduced": reduced,
    }
    text = report(args, rows, faults, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(rows, args.out.with_suffix(".png"))
    data = {
        **meta,
        "settings": {
            "sites": args.sites,
            "threads": args.threads,
            "rounds": args.rounds,
            "local_epochs": 1,
            "max_steps_per_epoch": 1,
            "cases_per_site": 2,
            "volume": [EDGE] * 3,
            "bundle_overrides": TINY,
            "seeds": {"data": args.seed, "split": args.seed, "training": args.seed, "init": args.seed},
            "external_process": False,
            "torch_threads": 1,
            "min_free_gb": args.min_free_gb,
            "straggler_wait_s": args.straggler_wait,
            "task_timeout_s": args.task_timeout,
        },
        "runs": [_strip(r) for r in rows],
        "faults": [_strip(f) for f in faults],
        "deployment": DEPLOYMENT,
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    main()
