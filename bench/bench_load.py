"""Sustained load on the site's MONAI Label server (issue 19, item 4): N concurrent clients send the Slicer module's
mix of requests for a fixed time while ONE fine-tune runs; per-route latency percentiles, errors, and whether the
server's memory grows (first minute against last minute). Loopback only, bounded in time.

    python bench/bench_load.py --clients 10 --seconds 600        # starts its own tiny server (32³ volumes, auth on)
    python bench/bench_load.py --clients 2 --seconds 5           # smoke run (the fine-tune is started and stopped)
    python bench/bench_load.py --url http://127.0.0.1:8000 --token T  # an already running server (no RSS then)

Traffic per client (closed loop, no think time, weights in ``MIX``): ``GET /info/`` (connect/refresh), ``POST
/activelearning/<strategy>`` (next case: the first strategy ``/info/`` lists, which is what the Slicer module asks
when the user presses Next case), ``POST /infer/<model>?output=image`` (the segmentation file, as the Slicer module
fetches it) and ``PUT /datastore/label?tag=final`` (a correction re-sent for one of the cases that already have a
final label, so the mix stays the same for the whole run and the datastore does not grow: growth is a leak, not more
data). At a quarter of the run one ``POST /train/<model>`` (trainer token) starts a fine-tune with a time budget
that ends it well before the last minute; the bench polls ``GET /train/`` every few seconds and, if it still runs
at the end, stops it with ``DELETE /train/`` and checks that no training process is left.

Memory: RSS of the server process plus its children (the fine-tune runs as a child process that loads the whole
app and the training cases), sampled every ``--sample-s`` seconds. Growth is the mean of the last minute over the
mean of the first minute of load; it is also given without the samples taken while the fine-tune ran, and for the
server process alone, so a training child cannot hide or fake a leak.

Writes ``bench/results/load.md``, ``load.json`` and ``load.png``. Why threads + requests rather than locust: nothing
to install, and each client is one blocking HTTP session, which is what a Slicer user is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "fetal_brain_seg"
MIX = (("info", 0.25), ("next_case", 0.25), ("infer", 0.25), ("label", 0.25))
ROUTES = {
    "info": "GET /info/",
    "next_case": "POST /activelearning/{strategy}",
    "infer": "POST /infer/{model}?output=image",
    "label": "PUT /datastore/label?tag=final",
    "train_status": "GET /train/ (the bench's poll)",
}
LABELLED = ("case00", "case01", "case02", "case03")  # final labels from the start: label saves and training use them
UNLABELLED = ("case04", "case05", "case06", "case07")  # what next case hands out
MAX_SECONDS = 1800.0
GROWTH_GOAL_PCT = 10.0
TRAIN_DONE = {"DONE", "ERROR", "STOPPED"}


@dataclass
class Results:
    """Every request's (start offset, operation, seconds, error); error None = HTTP 200."""

    t0: float
    records: list[tuple[float, str, float, str | None]] = field(default_factory=list)
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: str, started: float, seconds: float, error: str | None, detail: str = "") -> None:
        with self.lock:
            self.records.append((started - self.t0, op, seconds, error))
            if error is not None and len(self.examples[op]) < 5:
                self.examples[op].append(f"{error} {detail}".strip()[:300])


# ---------------------------------------------------------------------------------------------------------------------
# Pure computations (tested with synthetic numbers)
# ---------------------------------------------------------------------------------------------------------------------
def latency_stats(seconds: list[float]) -> dict[str, float | None]:
    """p50/p95/p99/max in milliseconds (numpy's linear interpolation); None when there is no sample."""
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
    ms = 1000.0 * np.asarray(seconds, dtype=float)
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99), "max_ms": float(ms.max())}


def route_table(records: list[tuple[float, str, float, str | None]], elapsed: float) -> dict[str, dict[str, Any]]:
    """Per operation: ok, errors, error kinds, requests per second and latency percentiles of the successful ones."""
    ops: dict[str, dict[str, Any]] = {}
    for op in [*(o for o, _ in MIX), *sorted({r[1] for r in records} - {o for o, _ in MIX})]:
        ok = [s for _, o, s, e in records if o == op and e is None]
        errors = [e for _, o, _, e in records if o == op and e is not None]
        ops[op] = {
            "route": ROUTES.get(op, op),
            "ok": len(ok),
            "errors": len(errors),
            "error_kinds": sorted(set(errors)),
            "per_s": len(ok) / elapsed if elapsed > 0 else 0.0,
            **latency_stats(ok),
        }
    return ops


def per_window(
    records: list[tuple[float, str, float, str | None]], elapsed: float, window_s: float = 60.0
) -> list[dict[str, Any]]:
    """Requests, errors and per-operation p95 (ms) in consecutive windows of ``window_s`` by request start, up to
    the window of the last request (the run's ``elapsed`` includes the last requests' answers, not new ones)."""
    last = max((r[0] for r in records), default=0.0)
    n = max(1, int(min(last, elapsed) // window_s) + 1)
    rows = []
    for i in range(n):
        lo, hi = i * window_s, (i + 1) * window_s
        inside = [r for r in records if lo <= r[0] < hi or (i == n - 1 and r[0] >= hi)]
        p95 = {}
        for op in {r[1] for r in inside}:
            ok = [s for _, o, s, e in inside if o == op and e is None]
            p95[op] = latency_stats(ok)["p95_ms"]
        rows.append(
            {
                "from_s": lo,
                "requests": len(inside),
                "errors": sum(1 for r in inside if r[3] is not None),
                "p95_ms": dict(sorted(p95.items())),
            }
        )
    return rows


def rss_growth(
    samples: list[tuple[float, float]],
    *,
    window_s: float,
    exclude: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Mean RSS of the first ``window_s`` and of the last ``window_s`` of the kept samples, and the growth in percent.

    ``samples`` are (seconds since the load started, RSS). With ``exclude=(a, b)`` samples with a ≤ t ≤ b are dropped
    first (the windows are then the first and last ``window_s`` of what is left). ``growth_pct`` is None when a
    window holds no sample, or when the kept samples span less than two windows (the windows would overlap and
    compare a stretch of the run with itself).
    """
    kept = [(t, v) for t, v in samples if exclude is None or not exclude[0] <= t <= exclude[1]]
    if not kept:
        return {"first": None, "last": None, "growth_pct": None, "n_first": 0, "n_last": 0}
    start, end = kept[0][0], kept[-1][0]
    if end - start < 2 * window_s:
        return {"first": None, "last": None, "growth_pct": None, "n_first": 0, "n_last": 0}
    first = [v for t, v in kept if t < start + window_s]
    last = [v for t, v in kept if t > end - window_s]
    if not first or not last:
        return {"first": None, "last": None, "growth_pct": None, "n_first": len(first), "n_last": len(last)}
    f, la = float(np.mean(first)), float(np.mean(last))
    return {"first": f, "last": la, "growth_pct": 100.0 * (la - f) / f, "n_first": len(first), "n_last": len(last)}


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "not met")


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------
def write_studies(folder: Path) -> dict[str, bytes]:
    """Eight 32³ cases (the tiny bundle variant's size), four with a final label; returns each labelled case's label
    file (the bytes a correction re-sends)."""
    from fetalseg.data.io import write_nifti
    from tests.conftest import sphere_case

    folder.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, name in enumerate(LABELLED + UNLABELLED):
        image, label, affine = sphere_case(shape=(32, 32, 32), seed=i)
        write_nifti(image, affine, folder / f"{name}.nii.gz")
        if name in LABELLED:
            path = write_nifti(label, affine, folder / "labels" / "final" / f"{name}.nii.gz", dtype=np.uint8)
            labels[name] = Path(path).read_bytes()
    return labels


def _check(response: requests.Response) -> tuple[str | None, str]:
    if response.status_code == 200:
        return None, ""
    return f"HTTP {response.status_code}", response.text[:200]


def client_loop(
    url: str,
    headers: dict[str, str],
    labels: dict[str, bytes],
    strategy: str,
    stop_at: float,
    results: Results,
    seed: int,
) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    ops, weights = zip(*MIX)
    images = LABELLED + UNLABELLED
    while time.monotonic() < stop_at:
        op = rng.choices(ops, weights)[0]
        started = time.monotonic()
        detail = ""
        try:
            if op == "info":
                response = session.get(f"{url}/info/", headers=headers, timeout=120)
            elif op == "next_case":
                response = session.post(
                    f"{url}/activelearning/{strategy}",
                    json={"client_id": f"bench-{seed}"},
                    headers=headers,
                    timeout=120,
                )
            elif op == "infer":
                response = session.post(
                    f"{url}/infer/{MODEL}",
                    params={"image": rng.choice(images), "output": "image"},
                    files={"params": (None, "{}")},
                    headers=headers,
                    timeout=300,
                )
                _ = response.content  # the whole segmentation file, as the client saves it
            else:
                image = rng.choice(LABELLED)
                response = session.put(
                    f"{url}/datastore/label",
                    params={"image": image, "tag": "final"},
                    files={"label": ("label.nii.gz", labels[image])},
                    data={"params": json.dumps({"client_id": f"bench-{seed}"})},
                    headers=headers,
                    timeout=120,
                )
            error, detail = _check(response)
        except requests.RequestException as exc:
            error, detail = type(exc).__name__, str(exc)[:200]
        results.add(op, started, time.monotonic() - started, error, detail)


def rss_parts(pid: int | None) -> tuple[int, int] | None:
    """(server process RSS, sum of its children's RSS) in bytes; None without a pid or once it is gone."""
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        main = proc.memory_info().rss
    except psutil.Error:
        return None
    children = 0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += child.memory_info().rss
    return main, children


def _child_pids(pid: int | None) -> list[int]:
    if pid is None:
        return []
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


@dataclass
class Training:
    """The one fine-tune of the run: when it was asked for, what the server said, and how it ended."""

    at_s: float
    params: dict[str, Any]
    requested_s: float | None = None
    requested_utc: str | None = None
    http_status: int | None = None
    response: Any = None
    status: str | None = None
    ended_s: float | None = None
    stopped_by_bench: bool = False
    error: str | None = None


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = max(1.0, min(float(args.seconds), MAX_SECONDS))  # bounded whatever is asked
    clients = max(1, min(int(args.clients), 32))
    sample_s = max(0.2, min(float(args.sample_s), seconds / 20))
    window_s = min(60.0, seconds / 3)
    load_before = os.getloadavg()
    server = None
    auth = False
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        labels = write_studies(Path(tmp) / "studies")
        url = args.url
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        train_headers = {"Authorization": f"Bearer {args.train_token or args.token}"} if args.token else {}
        if url is None:
            from apps.fetal_brain.launcher import start

            conf = [("variant", "tiny"), ("model_path", str(Path(tmp) / "model" / "model.pt"))]
            if not args.no_auth:
                from apps.fetal_brain.lib.auth import UserStore

                users = UserStore(Path(tmp) / "users.json")
                headers = {"Authorization": f"Bearer {users.add('bench-annotator', 'annotator')}"}
                train_headers = {"Authorization": f"Bearer {users.add('bench-trainer', 'trainer')}"}
                conf += [("auth", "true"), ("users_file", str(users.path))]
                auth = True
            server = start(Path(tmp) / "studies", workdir=Path(tmp) / "server", conf=conf)
            url = server.url
        pid = server.process.pid if server else None
        training = Training(
            at_s=seconds / 4,
            params={
                "max_epochs": 10000,  # the time budget ends it
                "time_budget_s": max(1.0, min(args.train_budget_s, seconds * 0.4)),
                "val_interval": 1,
                "publish": "always",  # a new model is loaded by the serving process mid-run: part of the test
            },
        )
        server_log_errors = None
        leftover: list[int] = []
        try:
            info = requests.get(f"{url}/info/", headers=headers, timeout=60).json()
            strategy = next(iter(info.get("strategies") or {"random": None}))
            warm = requests.post(
                f"{url}/infer/{MODEL}", params={"image": LABELLED[0], "output": "json"}, headers=headers, timeout=300
            )
            warm.raise_for_status()
            results = Results(t0=time.monotonic())
            rss: list[dict[str, float]] = []
            stop_at = results.t0 + seconds
            threads = [
                threading.Thread(
                    target=client_loop, args=(url, headers, labels, strategy, stop_at, results, i), daemon=True
                )
                for i in range(clients)
            ]
            for t in threads:
                t.start()
            next_poll = results.t0 + 5.0
            while any(t.is_alive() for t in threads):
                now = time.monotonic()
                parts = rss_parts(pid)
                if parts:
                    rss.append(
                        {
                            "t": now - results.t0,
                            "main": parts[0] / 2**20,
                            "children": parts[1] / 2**20,
                            "load1": os.getloadavg()[0],
                        }
                    )
                if training.requested_s is None and now - results.t0 >= training.at_s and now < stop_at:
                    training.requested_s = now - results.t0
                    training.requested_utc = datetime.now(timezone.utc).isoformat(timespec="seconds")
                    try:
                        r = requests.post(
                            f"{url}/train/{MODEL}", json=training.params, headers=train_headers, timeout=120
                        )
                        training.http_status = r.status_code
                        training.response = (
                            r.json()
                            if r.headers.get("content-type", "").startswith("application/json")
                            else r.text[:300]
                        )
                        if r.status_code == 200:
                            training.status = (training.response or {}).get("status", "SUBMITTED")
                        else:
                            training.error = f"HTTP {r.status_code}"
                            training.ended_s = training.requested_s
                    except requests.RequestException as exc:
                        training.error = type(exc).__name__
                        training.ended_s = training.requested_s
                if training.status and training.status not in TRAIN_DONE and now >= next_poll:
                    next_poll = now + 5.0
                    training.status = _poll_training(url, train_headers, results) or training.status
                    if training.status in TRAIN_DONE:
                        training.ended_s = time.monotonic() - results.t0
                time.sleep(max(0.0, sample_s - (time.monotonic() - now)))
            elapsed = time.monotonic() - results.t0
            if training.status and training.status not in TRAIN_DONE:
                training.status = _poll_training(url, train_headers, results) or training.status
            if training.status and training.status not in TRAIN_DONE:
                r = requests.delete(f"{url}/train/", headers=train_headers, timeout=60)
                training.stopped_by_bench = True
                if not r.ok:
                    training.error = f"DELETE /train/: HTTP {r.status_code}"
                training.status = _poll_training(url, train_headers, results) or training.status
                training.ended_s = time.monotonic() - results.t0
            elif training.status in TRAIN_DONE and training.ended_s is None:
                training.ended_s = elapsed
            time.sleep(2.0)
            leftover = _child_pids(pid)  # a stopped or finished fine-tune leaves no process behind
            rss_end = rss_parts(pid)
            train_stats = {}
            if server is not None:
                stats_file = Path(tmp) / "model" / "train_stats.json"
                if stats_file.exists():
                    train_stats = json.loads(stats_file.read_text())
        finally:
            if server is not None:
                log_text = server.log.read_text(errors="replace") if server.log.exists() else ""
                server_log_errors = sum(1 for line in log_text.splitlines() if "Traceback" in line)
                server.stop()
    load_after = os.getloadavg()
    ops = route_table(results.records, elapsed)
    load_ops = [o for o, _ in MIX]
    total = [(s["t"], s["main"] + s["children"]) for s in rss]
    main = [(s["t"], s["main"]) for s in rss]
    train_window = None
    if training.requested_s is not None:
        # the child lives from the request until the poll that saw it end; one sample after that may still hold it
        train_window = (
            training.requested_s,
            (training.ended_s if training.ended_s is not None else elapsed) + sample_s,
        )
    growth = {
        "total": rss_growth(total, window_s=window_s),
        "total_without_training": rss_growth(total, window_s=window_s, exclude=train_window),
        "server_process": rss_growth(main, window_s=window_s),
    }
    in_training = [v for t, v in total if train_window and train_window[0] <= t <= train_window[1]]
    outside = [v for t, v in total if not (train_window and train_window[0] <= t <= train_window[1])]
    train_errors = int(training.error is not None or training.status == "ERROR")
    errors = sum(ops[o]["errors"] for o in ops) + train_errors
    return {
        "when": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average": {"before": list(load_before), "after": list(load_after)},
        "command": "python bench/bench_load.py " + " ".join(sys.argv[1:]),
        "clients": clients,
        "seconds": round(elapsed, 1),
        "window_s": window_s,
        "sample_s": sample_s,
        "auth": auth if server is not None else bool(args.token),
        "strategy": strategy,
        "mix": dict(MIX),
        "requests_per_s": sum(ops[o]["ok"] for o in load_ops) / elapsed,
        "errors": errors,
        "error_examples": dict(results.examples),
        "ops": ops,
        "per_minute": per_window([r for r in results.records if r[1] in load_ops], elapsed, 60.0),
        "per_minute_routes": "mix",  # the bench's GET /train/ polls are not counted
        "training": {
            "params": training.params,
            "requested_at_s": training.requested_s,
            "ended_at_s": training.ended_s,
            "http_status": training.http_status,
            "status": training.status,
            "stopped_by_bench": training.stopped_by_bench,
            "error": training.error,
            "errors": train_errors,
            "requested_utc": training.requested_utc,
            "stats": _train_stats(train_stats) if train_stats else None,
            "processes_left": len(leftover),
        },
        "rss_mb": {
            "samples": [{k: round(v, 2) for k, v in s.items()} for s in rss],
            "end": (rss_end[0] + rss_end[1]) / 2**20 if rss_end else None,
            "peak": max((v for _, v in total), default=None),
            "peak_during_training": max(in_training, default=None),
            "peak_outside_training": max(outside, default=None),
            "growth": growth,
            "goal_pct": GROWTH_GOAL_PCT,
        },
        "server_log_tracebacks": server_log_errors,
        "server": (
            f"own (tiny variant, 32³ volumes, 127.0.0.1, auth {'on' if auth else 'off'})"
            if args.url is None
            else args.url
        ),
    }


def _train_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """The server's record of the fine-tune (``train_stats.json``): outcome, size, and where its time went."""
    out = {k: stats.get(k) for k in ("status", "started", "finished", "seconds", "epochs_run", "n_train", "n_val")}
    out.update({k: stats.get(k) for k in ("published", "error")})
    history = stats.get("history") or []
    out["fit_seconds"] = history[-1].get("seconds") if history and isinstance(history[-1], dict) else None
    return out


def _poll_training(url: str, headers: dict[str, str], results: Results) -> str | None:
    started = time.monotonic()
    try:
        r = requests.get(f"{url}/train/", headers=headers, timeout=60)
        error, detail = _check(r)
        status = r.json().get("status") if error is None else None
    except (requests.RequestException, ValueError) as exc:
        error, detail, status = type(exc).__name__, str(exc)[:200], None
    results.add("train_status", started, time.monotonic() - started, error, detail)
    return status


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def verdicts(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The issue's goals, judged from the numbers: 0 errors, memory growth ≤ 10 % (with and without the fine-tune)."""
    growth = result["rss_mb"]["growth"]
    goal = result["rss_mb"]["goal_pct"]
    out = {"errors": {"value": result["errors"], "goal": "0 errors", "verdict": verdict(result["errors"] == 0)}}
    for key in ("total", "total_without_training", "server_process"):
        g = growth[key]["growth_pct"]
        out[f"rss_growth_{key}"] = {
            "value": g,
            "goal": f"≤ {goal:g} %",
            "verdict": verdict(None if g is None else g <= goal),
        }
    return out


def _load_note(samples: list[dict[str, float]], start: float, end: float) -> str:
    """Mean 1-minute load average outside/inside the fine-tune, when the samples carry it."""
    out = [s["load1"] for s in samples if "load1" in s and not start <= s["t"] <= end]
    inside = [s["load1"] for s in samples if "load1" in s and start <= s["t"] <= end]
    if not out or not inside:
        return ": load average sampled before and after only"
    return f": mean 1-min load average outside/inside {np.mean(out):.1f} / {np.mean(inside):.1f}"


def _minutes(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-minute rows without a trailing window that holds no request start (only the last answers)."""
    minutes = list(result["per_minute"])
    while len(minutes) > 1 and minutes[-1]["requests"] == 0:
        minutes.pop()
    return minutes


def reading(result: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers that say what the fine-tune did to memory and latency."""
    notes: list[str] = []
    tr, rss = result["training"], result["rss_mb"]
    samples, window = rss["samples"], result["window_s"]
    if tr["requested_at_s"] is not None and samples:
        start = tr["requested_at_s"]
        end = tr["ended_at_s"] if tr["ended_at_s"] is not None else result["seconds"]
        took = f"The fine-tune took {end - start:.0f} s from its request to the poll that saw it end"
        budget = tr["params"].get("time_budget_s")
        stats = tr.get("stats") or {}
        if budget is not None:
            took += f", for a training-loop budget of {budget:g} s"
        if stats.get("fit_seconds") is not None and stats.get("seconds") is not None:
            took += (
                f" (the server's record: {stats['seconds']:.0f} s in the train task, of which the training loop "
                f"{stats['fit_seconds']:.0f} s; the rest of the {end - start:.0f} s is the training process starting "
                "and loading the app)"
            )
        child = max((s["children"] for s in samples), default=0.0)
        ramp = next((s["t"] for s in samples if s["t"] >= start and s["children"] >= 0.9 * child), None)
        notes.append(
            took + f". It runs as a child process of the server holding up to {child:.0f} MB (it loads the app, "
            "the model and the training cases"
            + (f"; its RSS reached 90 % of that {ramp - start:.0f} s after the request" if ramp and child else "")
            + "); the server's own RSS is the 'server process alone' row."
        )
        last_from = samples[-1]["t"] - window
        if end > last_from:
            inside = [s for s in samples if s["t"] > last_from]
            busy = [s for s in inside if s["children"] > 1.0]
            g = rss["growth"]
            pct = lambda k: "n/a" if g[k]["growth_pct"] is None else f"{g[k]['growth_pct']:+.1f} %"  # noqa: E731
            notes.append(
                f"The fine-tune was still running in the last window (it ended at {end:.0f} s; the window starts at "
                f"{max(0.0, last_from):.0f} s): {len(busy)} of its {len(inside)} samples include the training "
                "process, so the all-samples growth measures that process, not growth of the server. Without the "
                f"fine-tune's samples: {pct('total_without_training')}; server process alone: "
                f"{pct('server_process')}."
            )
        outside = [w for w in _minutes(result) if w["from_s"] + 60 <= start or w["from_s"] >= end]
        during = [w for w in _minutes(result) if w["from_s"] >= start and w["from_s"] + 60 <= end]
        if outside and during:

            def mean(rows: list[dict[str, Any]], key: str) -> float:
                return float(np.mean([w[key] for w in rows]))

            def p95(rows: list[dict[str, Any]], op: str) -> str:
                vals = [w["p95_ms"][op] for w in rows if w["p95_ms"].get(op) is not None]
                return "n/a" if not vals else f"{np.mean(vals) / 1000:.1f} s"

            notes.append(
                f"Minutes wholly outside the fine-tune saw {mean(outside, 'requests'):.0f} requests/min start, "
                f"minutes wholly inside it {mean(during, 'requests'):.0f}: the fine-tune shares the 2 cores with "
                f"inference (as do other engineers' jobs{_load_note(samples, start, end)}). Mean "
                f"per-minute p95 of infer outside/inside: {p95(outside, 'infer')} / {p95(during, 'infer')}."
            )
    ops = result["ops"]
    nxt, info = ops.get("next_case", {}), ops.get("info", {})
    if nxt.get("p50_ms") is not None and info.get("p50_ms") is not None and nxt["p50_ms"] > 10 * info["p50_ms"]:
        notes.append(
            f"Next case (strategy `{result['strategy']}`) has p50 {nxt['p50_ms'] / 1000:.1f} s against /info/'s "
            f"{info['p50_ms']:.0f} ms, close to infer's {ops['infer']['p50_ms'] / 1000:.1f} s: the app runs "
            "/activelearning in the inference pool (apps/fetal_brain/routes.py), so choosing a case waits behind "
            "the queued inferences even for a strategy that runs no model."
        )
    return notes


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _mb(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def markdown(result: dict[str, Any]) -> str:
    rss, tr = result["rss_mb"], result["training"]
    la = result["load_average"]
    v = verdicts(result)
    lines = [
        "# MONAI Label server under sustained load (bench/bench_load.py)",
        "",
        f"{result['when']}, {result['machine']}; load average (1/5/15 min) before "
        f"{'/'.join(f'{x:.1f}' for x in la['before'])}, after {'/'.join(f'{x:.1f}' for x in la['after'])}. "
        "The 2 cores are shared with other engineers' test runs and the bench's own client threads: latencies "
        "depend on that load. Command: `" + result["command"] + "`.",
        "",
        f"{result['clients']} concurrent clients, closed loop (no think time), for {result['seconds']} s against "
        f"{result['server']}; mix "
        + ", ".join(f"{op} {int(w * 100)} %" for op, w in result["mix"].items())
        + f"; next case = strategy `{result['strategy']}` (the first /info/ lists, the Slicer module's default). "
        "Label saves re-send a final label of one of 4 labelled cases (stationary datastore); next case hands out "
        "one of 4 unlabelled ones. One warm-up inference before the clock starts.",
        "",
        "| route | ok | errors | per s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for o in result["ops"].values():
        kinds = f" ({', '.join(o['error_kinds'])})" if o["error_kinds"] else ""
        lines.append(
            f"| {o['route']} | {o['ok']} | {o['errors']}{kinds} | {o['per_s']:.2f} | {_ms(o['p50_ms'])} "
            f"| {_ms(o['p95_ms'])} | {_ms(o['p99_ms'])} | {_ms(o['max_ms'])} |"
        )
    train_line = (
        f"Fine-tune: `POST /train/{MODEL}` {tr['params']} at {tr['requested_at_s']:.0f} s → HTTP "
        f"{tr['http_status']}, ended {tr['status']} at "
        + ("n/a" if tr["ended_at_s"] is None else f"{tr['ended_at_s']:.0f} s")
        + (" (stopped by the bench with DELETE /train/ at the end)" if tr["stopped_by_bench"] else "")
        + f"; training processes left afterwards: {tr['processes_left']}."
        if tr["requested_at_s"] is not None
        else "Fine-tune: not started (run too short)."
    )
    if tr.get("stats"):
        s = tr["stats"]
        train_line += (
            f" Server's record: {s.get('status')}, {s.get('epochs_run')} epochs on {s.get('n_train')} cases "
            f"(validated on {s.get('n_val')}), published {s.get('published')}."
        )
    g = rss["growth"]
    lines += [
        "",
        f"Total: {result['requests_per_s']:.2f} requests/s (mix routes), {result['errors']} errors (routes + the "
        f"fine-tune); server log tracebacks: {result['server_log_tracebacks']}.",
        "",
        train_line,
        "",
        f"Server RSS (process + children) sampled every {result['sample_s']:.2g} s; first and last "
        f"{result['window_s']:.3g} s of load compared:",
        "",
        "| memory | first window MB | last window MB | growth | goal | verdict |",
        "|---|---:|---:|---:|---:|---|",
    ]
    names = {
        "total": "server + children (all samples)",
        "total_without_training": "server + children, samples during the fine-tune left out",
        "server_process": "server process alone",
    }
    for key, name in names.items():
        gg, vv = g[key], v[f"rss_growth_{key}"]
        pct = "n/a" if gg["growth_pct"] is None else f"{gg['growth_pct']:+.1f} %"
        lines.append(f"| {name} | {_mb(gg['first'])} | {_mb(gg['last'])} | {pct} | {vv['goal']} | {vv['verdict']} |")
    lines += [
        "",
        f"Peak {_mb(rss['peak'])} MB (during the fine-tune {_mb(rss['peak_during_training'])} MB, outside it "
        f"{_mb(rss['peak_outside_training'])} MB); end {_mb(rss['end'])} MB.",
        "",
        f"Verdicts: errors {v['errors']['verdict']} ({result['errors']} errors, goal 0); memory growth "
        f"{v['rss_growth_total']['verdict']} (all samples), {v['rss_growth_total_without_training']['verdict']} "
        f"(without the fine-tune window), {v['rss_growth_server_process']['verdict']} (server process alone).",
        "",
    ]
    notes = reading(result)
    if notes:
        lines += ["Reading the numbers:", "", *[f"- {n}" for n in notes], ""]
    if result["error_examples"]:
        lines += ["Error examples:", ""]
        lines += [f"- {op}: {msg}" for op, msgs in result["error_examples"].items() for msg in msgs]
        lines.append("")
    ops = [op for op, _ in result["mix"].items()]
    lines += [
        "Per minute (by request start): requests ("
        + ("the mix routes" if result.get("per_minute_routes") == "mix" else "all routes, the bench's polls too")
        + "), errors, p95 ms per route.",
        "",
        "| from s | requests | errors | " + " | ".join(f"p95 {op}" for op in ops) + " |",
        "|---:|---:|---:|" + "---:|" * len(ops),
    ]
    for w in _minutes(result):
        lines.append(
            f"| {w['from_s']:.0f} | {w['requests']} | {w['errors']} | "
            + " | ".join(_ms(w["p95_ms"].get(op)) for op in ops)
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["rss_mb"]["samples"]
    if not samples:
        return None
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    t = [s["t"] for s in samples]
    ax.plot(t, [s["main"] + s["children"] for s in samples], label="server + children")
    ax.plot(t, [s["main"] for s in samples], label="server process")
    tr = result["training"]
    for a in (ax, bx):
        if tr["requested_at_s"] is not None:
            a.axvspan(tr["requested_at_s"], tr["ended_at_s"] or result["seconds"], color="orange", alpha=0.2)
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"{result['clients']} clients, {result['seconds']:.0f} s (shaded: fine-tune)")
    ax.legend(loc="upper left")
    mins = result["per_minute"]
    x = [w["from_s"] + 30 for w in mins]
    for op in result["mix"]:
        y = [w["p95_ms"].get(op) for w in mins]
        bx.plot(x, [np.nan if v is None else v for v in y], marker="o", label=op)
    bx.set_yscale("log")
    bx.set_ylabel("p95 latency per minute (ms)")
    bx.set_xlabel("seconds since the load started")
    bx.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="concurrent clients (1..32, default 10)")
    parser.add_argument("--seconds", type=float, default=30.0, help=f"duration (at most {MAX_SECONDS:.0f})")
    parser.add_argument("--sample-s", type=float, default=2.0, help="RSS sampling interval (default 2 s)")
    parser.add_argument(
        "--train-budget-s", type=float, default=240.0, help="the fine-tune's time budget (capped at 0.4 × the run)"
    )
    parser.add_argument("--no-auth", action="store_true", help="own server without token auth (default: auth on)")
    parser.add_argument("--url", help="an already running server on this machine (default: start a tiny one)")
    parser.add_argument("--token", help="bearer token for --url (a server started with --conf auth true)")
    parser.add_argument("--train-token", help="trainer token for the fine-tune on --url (default --token)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    parser.add_argument("--no-plot", action="store_true", help="do not write <out>.png")
    parser.add_argument("--render", type=Path, help="only rewrite <out>.md/.png from this result JSON (no run)")
    args = parser.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.0.0.1", "https://127.0.0.1", "http://localhost")):
        parser.error("--url must be a loopback address: this is a load test, not a remote attack tool")
    result = json.loads(args.render.read_text()) if args.render else run(args)
    result["verdicts"] = verdicts(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
    if not args.no_plot and plot(result, args.out.with_suffix(".png")):
        text += f"\n![RSS and per-minute p95]({args.out.with_suffix('.png').name})\n"
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(text)
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
