"""NVFlare's overhead as a function of round length: FedAvg in the simulator ÷ the same rounds without NVFlare.

Why a separate benchmark: NVFlare adds a roughly fixed cost per round (task pick-up after
``server.task_request_interval_s``, transfers between the site, its training process and the server, filters,
model selection and checkpoint) and a fixed start-up and shutdown per job. Its ratio to the training work
therefore depends on how long a round is, which ``bench_fl.py``'s single setting cannot show. Here the same
medium federation (48³, 6 cases per site) is trained for a few rounds with more or fewer local epochs per round,
each once in NVFlare's simulator (``bench_fl.run_fl``, the real job) and once without NVFlare with the same
process layout (``bench_fl.run_local_parallel``: one spawned process per site, one torch thread each, weights
through pipes). Settings run one after the other in one process; compare the ratios within this file.

    python bench/bench_fl_overhead.py                              # ~10 min on 2 idle cores
    python bench/bench_fl_overhead.py --local-epochs 1,3 --intervals 0.5,0.1

Writes bench/results/fl_overhead.md (+ .json). Goal (issue 3): federated ÷ local ≤ 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_fl  # noqa: E402

RESULTS = HERE / "results"


def measure(args: argparse.Namespace, data_root: Path, work: Path, local_epochs: int, interval: float) -> dict:
    """One setting: the federated job and the local reference, right after each other."""
    run_args = argparse.Namespace(**{**vars(args), "local_epochs": local_epochs})
    changes = {"server": {"straggler_wait_s": 600, "task_request_interval_s": interval}}
    name = f"le{local_epochs}_i{round(interval * 1000)}ms"
    fl = bench_fl.run_fl(run_args, data_root, work, name, **changes)
    local = bench_fl.run_local_parallel(run_args, data_root, **changes)
    fl_round = statistics.mean(fl["round_s"]) if fl["round_s"] else float("nan")
    local_round = statistics.mean(local["round_s"]) if local["round_s"] else float("nan")
    row = {
        "local_epochs": local_epochs,
        "task_request_interval_s": interval,
        "fl_wall_s": fl["wall_s"],
        "local_wall_s": local["wall_s"],
        "ratio_wall": fl["wall_s"] / local["wall_s"],
        "fl_round_s": fl_round,
        "local_round_s": local_round,
        "ratio_round": fl_round / local_round,
        "fl_first_round_s": fl["first_round_s"],
        "local_first_round_s": local["first_round_s"],
        "fl_shutdown_s": fl["shutdown_s"],
    }
    print(f"[bench_fl_overhead] {json.dumps(row)}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local-epochs", default="1,3,9", help="local epochs per round (comma-separated)")
    parser.add_argument("--intervals", default="0.5", help="server.task_request_interval_s values (comma-separated)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--size", type=int, default=48, help="volume edge in voxels (48: bench_fl's medium)")
    parser.add_argument("--cases", type=int, default=6, help="cases per site")
    parser.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fl_overhead.md")
    args = parser.parse_args()
    args.overrides = {"pixdim": [bench_fl.FOV_MM / args.size] * 3, "patch_size": [args.size] * 3}
    bench_fl._setup_environment()
    import torch

    from fetalseg.data.federation import write_federation

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_fl_overhead_"))
    data_root = work / "federation"
    if not data_root.exists():
        write_federation(data_root, n_sites=3, cases_per_site=args.cases, shape=(args.size,) * 3, seed=0)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    rows = [
        measure(args, data_root, work, int(le), float(iv))
        for iv in args.intervals.split(",")
        for le in args.local_epochs.split(",")
    ]
    total_min = (time.perf_counter() - started) / 60
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    def verdict(ratio: float) -> str:
        return "met" if ratio <= 1.15 else "not met"

    lines = [
        "# NVFlare overhead vs round length (FedAvg, simulator ÷ same rounds without NVFlare)",
        "",
        f"{now}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; whole benchmark {total_min:.1f} min. "
        f"{args.size}³ volumes, {args.cases} cases per site (3 sites), {args.rounds} rounds. Both sides: one process "
        "per site, one torch thread each, on the same cores; the local side passes weights through pipes.",
        "",
        "| local epochs | task request interval (s) | local round (s) | federated round (s) | ÷ per round | "
        "local end to end (s) | federated end to end (s) | ÷ end to end | goal ≤ 1.15 (round / end to end) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *(
            f"| {r['local_epochs']} | {r['task_request_interval_s']:g} | {r['local_round_s']:.1f} | "
            f"{r['fl_round_s']:.1f} | {r['ratio_round']:.2f}× | {r['local_wall_s']:.1f} | {r['fl_wall_s']:.1f} | "
            f"{r['ratio_wall']:.2f}× | {verdict(r['ratio_round'])} / {verdict(r['ratio_wall'])} |"
            for r in rows
        ),
        "",
        "Per round: mean time from one aggregation to the next after the first round (federated, from the server "
        "log) and from sending the global weights to the average of the replies (local). End to end: from the "
        "call to the end, start-up and shutdown included (federated start-up + first round "
        + ", ".join(f"{r['fl_first_round_s']:.0f} s" for r in rows)
        + "; local "
        + ", ".join(f"{r['local_first_round_s']:.0f} s" for r in rows)
        + "). NVFlare's cost per round is about the difference of the round columns; it is amortised by longer "
        "rounds (more local epochs or more data per site), its fixed start-up by more rounds.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "load_before": load_before}, indent=2))


if __name__ == "__main__":
    main()
