"""Load test of the site's MONAI Label server: N concurrent clients on /info, /infer and label submission for a fixed
time; throughput, latency percentiles, errors and server memory growth. Loopback only, bounded in time.

    python bench/bench_load.py --clients 4 --seconds 30            # starts its own tiny server (32³ volumes)
    python bench/bench_load.py --url http://127.0.0.1:8000 --token T  # an already running server (no RSS then)

Writes ``bench/results/load.md`` and ``load.json``. Why threads + requests rather than locust: nothing to install,
and each client is one blocking HTTP session, which is what a Slicer user is.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "fetal_brain_seg"
MIX = (("info", 0.6), ("infer", 0.2), ("label", 0.2))
IMAGES = ("case00", "case01", "case02", "case03")


@dataclass
class Results:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, op: str, seconds: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies[op].append(seconds)
            else:
                self.errors[op].append(error)


def write_studies(folder: Path) -> bytes:
    """Four 32³ cases (the tiny bundle variant's size); returns a valid label file for case00..03."""
    from fetalseg.data.io import write_nifti
    from tests.conftest import sphere_case

    folder.mkdir(parents=True, exist_ok=True)
    label_bytes = b""
    for i, name in enumerate(IMAGES):
        image, label, affine = sphere_case(shape=(32, 32, 32), seed=i)
        write_nifti(image, affine, folder / f"{name}.nii.gz")
        if i == 0:
            path = write_nifti(label, affine, folder.parent / "label.nii.gz", dtype=np.uint8)
            label_bytes = Path(path).read_bytes()
    return label_bytes


def client_loop(url: str, headers: dict[str, str], label: bytes, stop_at: float, results: Results, seed: int) -> None:
    rng = random.Random(seed)
    session = requests.Session()
    ops, weights = zip(*MIX)
    while time.monotonic() < stop_at:
        op = rng.choices(ops, weights)[0]
        image = rng.choice(IMAGES)
        started = time.perf_counter()
        try:
            if op == "info":
                response = session.get(f"{url}/info/", headers=headers, timeout=120)
            elif op == "infer":
                response = session.post(
                    f"{url}/infer/{MODEL}", params={"image": image, "output": "json"}, headers=headers, timeout=300
                )
            else:
                response = session.put(
                    f"{url}/datastore/label",
                    params={"image": "case00", "tag": "bench"},  # the label file is case00's grid
                    files={"label": ("label.nii.gz", label)},
                    data={"params": "{}"},
                    headers=headers,
                    timeout=120,
                )
            error = None if response.status_code == 200 else f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            error = type(exc).__name__
        results.add(op, time.perf_counter() - started, error)


def rss_bytes(pid: int | None) -> int | None:
    if pid is None:
        return None
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
    except psutil.Error:
        return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    seconds = min(float(args.seconds), 600.0)  # bounded whatever is asked
    clients = max(1, min(int(args.clients), 32))
    server = None
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        label = write_studies(Path(tmp) / "studies")
        url = args.url
        if url is None:
            from apps.fetal_brain.launcher import start

            server = start(
                Path(tmp) / "studies",
                workdir=Path(tmp) / "server",
                conf=[("variant", "tiny"), ("model_path", str(Path(tmp) / "model.pt"))],
            )
            url = server.url
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
        pid = server.process.pid if server else None
        try:
            requests.post(f"{url}/infer/{MODEL}", params={"image": "case00", "output": "json"}, headers=headers)
            rss_start = rss_bytes(pid)
            rss_samples = [rss_start] if rss_start else []
            results = Results()
            stop_at = time.monotonic() + seconds
            threads = [
                threading.Thread(target=client_loop, args=(url, headers, label, stop_at, results, i), daemon=True)
                for i in range(clients)
            ]
            began = time.perf_counter()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                time.sleep(1.0)
                sample = rss_bytes(pid)
                if sample:
                    rss_samples.append(sample)
            elapsed = time.perf_counter() - began
            rss_end = rss_bytes(pid)
        finally:
            if server is not None:
                server.stop()
    per_op = {}
    for op, _ in MIX:
        lat = results.latencies.get(op, [])
        per_op[op] = {
            "ok": len(lat),
            "errors": len(results.errors.get(op, [])),
            "error_kinds": sorted(set(results.errors.get(op, []))),
            "per_s": len(lat) / elapsed,
            "p50_ms": 1000 * percentile(lat, 50),
            "p90_ms": 1000 * percentile(lat, 90),
            "p99_ms": 1000 * percentile(lat, 99),
            "max_ms": 1000 * max(lat) if lat else float("nan"),
        }
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "requests_per_s": sum(v["ok"] for v in per_op.values()) / elapsed,
        "errors": sum(v["errors"] for v in per_op.values()),
        "ops": per_op,
        "rss_mb": {
            "start": rss_start / 2**20 if rss_start else None,
            "end": rss_end / 2**20 if rss_end else None,
            "peak": max(rss_samples) / 2**20 if rss_samples else None,
        },
        "server": "own (tiny variant, 32³ volumes, 127.0.0.1)" if args.url is None else args.url,
    }


def markdown(result: dict[str, Any]) -> str:
    rss = result["rss_mb"]
    fmt = lambda v: "n/a" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [
        "# MONAI Label server under load (bench/bench_load.py)",
        "",
        f"{result['clients']} concurrent clients for {result['seconds']} s against {result['server']}; mix "
        + ", ".join(f"{op} {int(w * 100)}%" for op, w in MIX)
        + ". 2 shared CPU cores: absolute numbers depend on the machine's other load.",
        "",
        "| operation | ok | errors | per s | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for op, v in result["ops"].items():
        lines.append(
            f"| {op} | {v['ok']} | {v['errors']} {' '.join(v['error_kinds'])} | {v['per_s']:.2f} | {v['p50_ms']:.0f} "
            f"| {v['p90_ms']:.0f} | {v['p99_ms']:.0f} | {v['max_ms']:.0f} |"
        )
    lines += [
        "",
        f"Total: {result['requests_per_s']:.2f} requests/s, {result['errors']} errors.",
        f"Server RSS (process + children): start {fmt(rss['start'])} MB, end {fmt(rss['end'])} MB, "
        f"peak {fmt(rss['peak'])} MB.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (1..32)")
    parser.add_argument("--seconds", type=float, default=30.0, help="duration (at most 600)")
    parser.add_argument("--url", help="an already running server on this machine (default: start a tiny one)")
    parser.add_argument("--token", help="bearer token (a server started with --conf auth true)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load.md")
    args = parser.parse_args(argv)
    if args.url and not args.url.startswith(("http://127.0.0.1", "https://127.0.0.1", "http://localhost")):
        parser.error("--url must be a loopback address: this is a load test, not a remote attack tool")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(result))
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
