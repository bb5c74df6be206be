"""Secure aggregation (issue 20): what pairwise masking costs, per round, against plain FedAvg in the same run, and
how the server's cost grows with the number of sites.

1. The project's NVFlare job in the simulator (``nvflare_jobs.fetal_brain.job.run_simulation``; the bundle U-Net
   at 32³ patches, 605,808 weights; tiny synthetic sites), run twice in this script — plain FedAvg, then the same
   config with ``server.secure_aggregation`` on — and per round:
   * wall time from the server log: "Round N started" to the next round's start (or "Finished FedAvg"), so the
     secure round includes its unmasking step; round 0 also holds the simulator's start-up and, for the secure
     job, the one-off key agreement (reported on its own);
   * bytes each site sent: the model payload the server's audit recorded (float32 DIFF vs uint32 masked DIFF) plus
     every result message envelope the site logged in the round (NVFlare's "SubmitUpdate ... (N Bytes)": the
     train result's metadata and, under secure aggregation, the unmasking reply).
2. The maths alone (``privacy.secure_aggregation``, no NVFlare) for 3, 10 and 30 simulated sites on the same
   605,808 weights: per-site masking time, the server's summing and unmasking time with no dropout and with 10 %
   of the sites dropped after masking, key agreement, and the protocol's message bytes. Beside it, the plain
   weighted float32 sum of the same updates.

    python bench/bench_secure_aggregation.py                      # both parts (3 rounds; 3, 10, 30 sites)
    python bench/bench_secure_aggregation.py --rounds 2 --scale-sites 3 10 --out /tmp/sa.md   # smaller
    python bench/bench_secure_aggregation.py --he --rounds 2 --long-steps 0 --scale-sites 3 --repeats 1 \
        --out bench/results/secure_aggregation_he.md    # + NVFlare's HE option (TenSEAL CKKS) in the same run

With ``--he`` the simulation also runs the job with ``"method": "he"`` (its TenSEAL contexts written into the
simulator workspace's ``startup/``, as NVFlare's HEBuilder would provision them); its ciphertext travels inside the
result envelope, so its bytes are the envelopes alone (there is no server audit record of a ciphertext).

Writes bench/results/secure_aggregation.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
LOG_TIME = "%Y-%m-%d %H:%M:%S,%f"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - ")
SUBMIT_ENVELOPE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - .*SubmitUpdate to: server\. size: .*\((\d+) Bytes\)"
)
GOAL_TIME, GOAL_BYTES = 1.10, 1.05


def _ts(text: str) -> float:
    return datetime.strptime(text, LOG_TIME).timestamp()


def round_windows(server_log: str) -> list[dict[str, Any]]:
    """Per round: from its "Round N started" banner to the next banner or "Finished FedAvg" (timestamps of the
    log lines that carry them)."""
    marks: list[tuple[float, int | None]] = []
    last = None
    for line in server_log.splitlines():
        m = _STAMP.match(line)
        if m:
            last = _ts(m.group(1))
        s = re.search(r"Round (\d+) started\.", line)
        if s and last is not None:
            marks.append((last, int(s.group(1))))
        if ("Finished FedAvg." in line or "Finished ScatterAndGather Training." in line) and last is not None:
            marks.append((last, None))
    out = []
    for (t0, r), (t1, _) in itertools.pairwise(marks):
        if r is not None:
            out.append({"round": r, "start": t0, "end": t1, "seconds": t1 - t0})
    return out


def key_agreement_seconds(server_log: str, n_sites: int) -> float | None:
    """From the moment every site had answered the first key-agreement step (all site processes up: their start-up
    is not the protocol's cost) to "keys agreed"."""
    answers, end = [], None
    for line in server_log.splitlines():
        m = _STAMP.match(line)
        if not m:
            continue
        if "task_name=secagg_setup" in line and "finished processing client result by controller" in line:
            answers.append(_ts(m.group(1)))
        if "secure aggregation: keys agreed" in line:
            end = _ts(m.group(1))
    return None if end is None or len(answers) < n_sites else end - answers[n_sites - 1]


def site_bytes(run: Path, windows: list[dict[str, Any]], sites: list[str]) -> dict[int, dict[str, dict[str, int]]]:
    out = {w["round"]: {s: {"payload": 0, "envelopes": 0} for s in sites} for w in windows}
    audit = run / "server" / "audit" / "received.jsonl"  # none under HE: the ciphertext travels in the envelope
    for rec in audit.read_text().splitlines() if audit.exists() else []:
        row = json.loads(rec)
        if row.get("site") in sites and row.get("round") in out:
            out[row["round"]][row["site"]]["payload"] += int(row["bytes"])
    for s in sites:
        for line in (run / s / "log.txt").read_text(errors="replace").splitlines():
            m = SUBMIT_ENVELOPE.match(line)
            if not m:
                continue
            t = _ts(m.group(1))
            for w in windows:
                if w["start"] <= t <= w["end"]:
                    out[w["round"]][s]["envelopes"] += int(m.group(2))
    return out


def simulate(args: argparse.Namespace, work: Path, steps: int) -> dict[str, Any]:
    from fetalseg.data.federation import write_federation
    from nvflare_jobs.fetal_brain.job import run_simulation

    sites = [f"site-{i + 1}" for i in range(args.sim_sites)]
    data = work / "data"
    if not data.exists():
        write_federation(data, n_sites=args.sim_sites, cases_per_site=4, shape=(32, 32, 32), seed=0)
    runs = {}
    methods = [("plain", {}), ("secure", {"secure_aggregation": {"enabled": True}})]
    if args.he:  # NVFlare's homomorphic encryption (nvflare_jobs.secure_aggregation.he), the same config otherwise
        methods.append(("he", {"secure_aggregation": {"enabled": True, "method": "he"}}))
    for name, server in methods:
        cfg = {
            "name": f"bench_sa_{name}_{steps}",
            "num_rounds": args.rounds,
            "min_clients": len(sites),
            "sites": sites,
            "bundle_overrides": {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]},
            "data": {"root": str(data), "split_seed": 0},
            # 2 training cases per site, batch 1: an epoch is 2 steps
            "training": {"local_epochs": max(1, steps // 2), "max_steps_per_epoch": 2, "batch_size": 1, "seed": 0},
            "server": {"straggler_wait_s": 5, **server},
            "tracking": None,
            "cross_site_eval": False,
            "runtime": {"external_process": True, "torch_threads": 1, "init_seed": 0},
        }
        if name == "he":  # the TenSEAL contexts NVFlare's HEBuilder would provision, in the simulator's startup/
            from nvflare_jobs.secure_aggregation.he import prepare_simulator_workspace

            prepare_simulator_workspace(work / f"{name}_{steps}", cfg["name"])
        t0 = time.perf_counter()
        job = run_simulation(cfg, work / f"{name}_{steps}")
        wall = time.perf_counter() - t0
        log = (job / "server" / "log.txt").read_text()
        windows = round_windows(log)
        runs[name] = {
            "wall_s": wall,
            "rounds": [{"round": w["round"], "seconds": w["seconds"]} for w in windows],
            "bytes": site_bytes(job, windows, sites),
            "key_agreement_s": key_agreement_seconds(log, len(sites)),
        }
        print(
            f"{name} ({steps} steps/round): {wall:.0f} s, rounds {[round(w['seconds'], 2) for w in windows]}",
            flush=True,
        )
    later = [r for r in range(1, args.rounds)]
    ratios = [
        runs["secure"]["rounds"][r]["seconds"] / runs["plain"]["rounds"][r]["seconds"]
        for r in later
        if r < len(runs["secure"]["rounds"]) and r < len(runs["plain"]["rounds"])
    ]

    def per_site(name: str, r: int) -> float:
        b = runs[name]["bytes"][r]
        return statistics.mean(v["payload"] + v["envelopes"] for v in b.values())

    byte_ratios = [per_site("secure", r) / per_site("plain", r) for r in later if r in runs["secure"]["bytes"]]
    he = {}
    if "he" in runs:
        he_rounds = [r for r in later if r < len(runs["he"]["rounds"]) and r < len(runs["plain"]["rounds"])]
        he_t = [runs["he"]["rounds"][r]["seconds"] / runs["plain"]["rounds"][r]["seconds"] for r in he_rounds]
        he_b = [per_site("he", r) / per_site("plain", r) for r in he_rounds if r in runs["he"]["bytes"]]
        he = {
            "he_time_ratio_median": statistics.median(he_t) if he_t else None,
            "he_bytes_ratio_median": statistics.median(he_b) if he_b else None,
        }
    return {
        **he,
        "sites": sites,
        "steps_per_round": steps,
        "runs": runs,
        "time_ratio_rounds_1_plus": ratios,
        "time_ratio_median": statistics.median(ratios) if ratios else None,
        "bytes_ratio_rounds_1_plus": byte_ratios,
        "bytes_ratio_median": statistics.median(byte_ratios) if byte_ratios else None,
    }


def model_layout() -> dict[str, tuple[int, ...]]:
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    net = FetalBrainNet({"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}, init_seed=0)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _json_bytes(obj: Any) -> int:
    return len(json.dumps(obj).encode())


def scale(n: int, layout: dict[str, tuple[int, ...]], repeats: int, drop_fraction: float) -> dict[str, Any]:
    from privacy.secure_aggregation import Params, ServerSession, SiteSession

    sites = [f"site-{i + 1:02d}" for i in range(n)]
    threshold = n // 2 + 1
    rng = np.random.default_rng(n)
    updates = {s: {k: rng.normal(0, 1e-3, shape).astype(np.float32) for k, shape in layout.items()} for s in sites}
    weights = {s: float(rng.integers(1, 20)) for s in sites}
    n_drop = max(1, math.floor(drop_fraction * n)) if n > 3 else 1
    out: dict[str, Any] = {
        "sites": n,
        "threshold": threshold,
        "dropped": n_drop,
        "weights": sum(map(np.prod, layout.values())),
    }
    timing: dict[str, list[float]] = {k: [] for k in ("setup_site", "setup_server", "mask_site", "server_sum",
                                                      "unmask_site", "server_finish", "server_finish_drop",
                                                      "plain_sum")}  # fmt: skip
    for rep in range(repeats):
        params = Params(f"bench-{rep}", tuple(sites), threshold)
        server = ServerSession(params)
        clients = {s: SiteSession(s, params) for s in sites}
        for s in sites:
            server.add_public_key(clients[s].advertise(), authenticated_site=s)
        table = server.key_table()
        t = time.perf_counter()
        setups = {s: clients[s].setup(table) for s in sites}
        timing["setup_site"].append((time.perf_counter() - t) / n)
        t = time.perf_counter()
        for s in sites:
            server.add_setup(setups[s], authenticated_site=s)
        conf = server.confirmation()
        timing["setup_server"].append(time.perf_counter() - t)
        for s in sites:
            clients[s].confirm(conf["transcript"], conf["tags"][s])
        out["setup_message_bytes_per_site"] = statistics.mean(_json_bytes(m) for m in setups.values())
        for rnd, drop in ((0, 0), (1, n_drop)):
            parts = server.participants()
            server.start_round(rnd, parts)
            t = time.perf_counter()
            msgs = {s: clients[s].mask(rnd, updates[s], weights[s], parts) for s in parts}
            timing["mask_site"].append((time.perf_counter() - t) / len(parts))
            dropped = set(parts[-drop:]) if drop else set()
            t = time.perf_counter()
            for s in parts:
                if s not in dropped:
                    server.add_masked(s, msgs[s])
            timing["server_sum"].append(time.perf_counter() - t)
            requests = server.unmask_requests()
            t = time.perf_counter()
            replies = {v: clients[v].unmask(rnd, q["survivors"], q["dropped"], q["self_shares"], q["key_shares"])
                       for v, q in requests.items()}  # fmt: skip
            timing["unmask_site"].append((time.perf_counter() - t) / len(requests))
            t = time.perf_counter()
            agg, _ = server.finish(replies)
            timing["server_finish_drop" if drop else "server_finish"].append(time.perf_counter() - t)
            alive = [s for s in parts if s not in dropped]
            t = time.perf_counter()
            total = sum(weights[s] for s in alive)
            plain = {k: sum(weights[s] * updates[s][k] for s in alive) / total for k in layout}
            timing["plain_sum"].append(time.perf_counter() - t)
            out.setdefault("max_abs_error", 0.0)
            out["max_abs_error"] = max(
                out["max_abs_error"], max(float(np.max(np.abs(agg[k] - plain[k]))) for k in layout)
            )
            if rnd == 0:
                s0 = parts[0]
                out["masked_payload_bytes_per_site"] = sum(a.nbytes for a in msgs[s0]["masked"].values())
                out["plain_payload_bytes_per_site"] = sum(a.nbytes for a in updates[s0].values())
                out["round_message_bytes_per_site"] = _json_bytes(
                    {"self_shares": msgs[s0]["self_shares"], "self_commit": msgs[s0]["self_commit"]}
                ) + statistics.mean(_json_bytes(r) for r in replies.values())
                out["unmask_request_bytes"] = _json_bytes(requests)
    out["seconds"] = {k: statistics.median(v) for k, v in timing.items() if v}
    return out


def _by_round(table: dict[Any, Any], r: int) -> Any:
    return table[r] if r in table else table[str(r)]  # int keys in memory, str keys once read back from JSON


def he_table(sim: dict[str, Any]) -> list[str]:
    """Rows for NVFlare's HE option beside plain FedAvg and masking (same run)."""
    runs = sim["runs"]
    out = [
        "",
        'NVFlare homomorphic encryption (`"method": "he"`, TenSEAL CKKS) in the same run:',
        "",
        "| round | plain s | masking s | HE s | HE ÷ plain | plain bytes/site | masking bytes/site | HE bytes/site "
        "| HE ÷ plain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p, m, h in zip(runs["plain"]["rounds"], runs["secure"]["rounds"], runs["he"]["rounds"]):
        r = p["round"]
        b = {
            k: statistics.mean(v["payload"] + v["envelopes"] for v in _by_round(runs[k]["bytes"], r).values())
            for k in ("plain", "secure", "he")
        }
        note = " (start-up)" if r == 0 else ""
        out.append(
            f"| {r}{note} | {p['seconds']:.2f} | {m['seconds']:.2f} | {h['seconds']:.2f} | "
            f"{h['seconds'] / p['seconds']:.2f}× | {b['plain']:,.0f} | {b['secure']:,.0f} | {b['he']:,.0f} | "
            f"{b['he'] / b['plain']:.1f}× |"
        )
    th, bh = sim.get("he_time_ratio_median"), sim.get("he_bytes_ratio_median")
    if th is not None and bh is not None:
        out += ["", f"HE, rounds 1+ (median): time **{th:.2f}×** plain, bytes per site **{bh:.1f}×** plain."]
    out.append("")
    return out


def report(args: argparse.Namespace, result: dict[str, Any]) -> str:
    lines = ["# Secure aggregation: cost against plain FedAvg (issue 20)", ""]
    lines.append(f"Measured {result['date']} on {result['machine']} (`{result['command']}`).")
    if result.get("label"):
        lines += ["", f"**{result['label']}**"]
    lines.append("")
    for sim in (result.get("simulation"), result.get("simulation_long")):
        if not sim:
            continue
        lines += [
            f"## The NVFlare job in the simulator, same run ({len(sim['sites'])} sites, {args.rounds} rounds of "
            f"{sim['steps_per_round']} local steps, bundle "
            "U-Net at 32³, 605,808 weights)",
            "",
            "| round | plain FedAvg s | secure aggregation s | ratio | plain bytes/site | secure bytes/site | ratio |",
            "|---|---|---|---|---|---|---|",
        ]
        runs = sim["runs"]
        for i, (p, s) in enumerate(zip(runs["plain"]["rounds"], runs["secure"]["rounds"])):
            r = p["round"]
            bp, bs = (
                statistics.mean(v["payload"] + v["envelopes"] for v in _by_round(runs[k]["bytes"], r).values())
                for k in ("plain", "secure")
            )
            note = " (start-up; secure: + key agreement)" if i == 0 else ""
            ps, ss = p["seconds"], s["seconds"]
            lines.append(f"| {r}{note} | {ps:.2f} | {ss:.2f} | {ss / ps:.2f}× ({ss - ps:+.2f} s) "
                         f"| {bp:,.0f} | {bs:,.0f} | {bs / bp:.4f}× |")  # fmt: skip
        if "he" in runs:
            lines += he_table(sim)
        tr, br = sim["time_ratio_median"], sim["bytes_ratio_median"]
        lines += [
            "",
            f"Rounds 1+ (median): time **{tr:.2f}×** "
            f"(goal ≤ {GOAL_TIME}×: {'met' if tr <= GOAL_TIME else 'NOT met'}), "
            f"bytes per site **{br:.4f}×** (goal ≤ {GOAL_BYTES}×: {'met' if br <= GOAL_BYTES else 'NOT met'}). "
            f"Key agreement (once per job, inside round 0, once every site process was up): "
            f"{runs['secure']['key_agreement_s']:.2f} s. "
            "Bytes: the model payload the server's audit recorded plus the result envelopes each site logged "
            "(uploads only). One run of each on a shared 2-core machine: round times carry the machine's noise.",
            "",
        ]
    lines += [
        "## The maths alone (no NVFlare): server and site cost by number of sites (605,808 weights)",
        "",
        "| sites | threshold | mask / site ms | server sum ms | server unmask ms (0 dropped) | server unmask ms "
        "(dropped) | unmask reply / site ms | key setup / site ms | plain weighted sum ms | max abs error | "
        "upload bytes / site (masked ÷ float32) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["scale"]:
        t = row["seconds"]
        up = row["masked_payload_bytes_per_site"] + row["round_message_bytes_per_site"]
        lines.append(
            f"| {row['sites']} | {row['threshold']} | {t['mask_site'] * 1e3:.0f} | {t['server_sum'] * 1e3:.0f} | "
            f"{t['server_finish'] * 1e3:.0f} | {t['server_finish_drop'] * 1e3:.0f} ({row['dropped']}) | "
            f"{t['unmask_site'] * 1e3:.1f} | {t['setup_site'] * 1e3:.1f} | {t['plain_sum'] * 1e3:.0f} | "
            f"{row['max_abs_error']:.1e} | {up:,} ({up / row['plain_payload_bytes_per_site']:.4f}×) |"
        )
    lines += [
        "",
        "Medians over the repeats. The site's masking grows with the number of peers (one mask stream each); the "
        "server's unmasking with dropouts grows with survivors × dropped. Upload bytes: the uint32 masked payload "
        "(one extra value: the masked weight) plus the per-round protocol messages (encrypted self-mask shares, "
        "commitment, unmasking reply), as JSON.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sim-sites", type=int, default=3)
    ap.add_argument("--scale-sites", type=int, nargs="+", default=[3, 10, 30])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--drop-fraction", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=2, help="local steps per round of the short simulation")
    ap.add_argument("--long-steps", type=int, default=40, help="local steps per round of the long one (0: none)")
    ap.add_argument("--skip-simulation", action="store_true")
    ap.add_argument("--label", default="", help="a line under the title (e.g. 'REDUCED run: ...')")
    ap.add_argument("--he", action="store_true", help="also run the job under NVFlare's HE option (same run)")
    ap.add_argument("--out", default=str(RESULTS / "secure_aggregation.md"))
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from its .json, measuring nothing")
    args = ap.parse_args(argv)
    if args.report_only:
        out = Path(args.out)
        result = json.loads(out.with_suffix(".json").read_text())
        args.rounds = len(result["simulation"]["runs"]["plain"]["rounds"]) if result.get("simulation") else 0
        out.write_text(report(args, result))
        print(out.read_text())
        return
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "command": " ".join(
            ["python bench/bench_secure_aggregation.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "goals": {"time_ratio": GOAL_TIME, "bytes_ratio": GOAL_BYTES},
        "label": args.label,
    }
    layout = model_layout()
    result["scale"] = []
    for n in args.scale_sites:
        row = scale(n, layout, args.repeats, args.drop_fraction)
        print(f"{n} sites: {json.dumps(row['seconds'])}", flush=True)
        result["scale"].append(row)
    if not args.skip_simulation:
        with tempfile.TemporaryDirectory(prefix="bench_sa_") as work:
            result["simulation"] = simulate(args, Path(work), args.steps)
            if args.long_steps:
                result["simulation_long"] = simulate(args, Path(work), args.long_steps)
    text = report(args, result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(text)


if __name__ == "__main__":
    main()
