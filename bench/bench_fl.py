"""Federated training on the synthetic 3-site federation: utility, overhead and bytes per round.

Three tables, all measured in one run (ratios are only meaningful within a run on this shared machine):

1. Utility: mean Dice over the held-out TEST cases of ALL sites for single-site training (site-1 only),
   centralized training (the three sites pooled), FedAvg, FedAvg + NVFlare's percentile filter, FedAvg + DP-SGD at
   two ε. Every site is split once with ``fetalseg.baseline.split_site`` (train / validation / test), the split the
   federated job itself uses: every method trains on the training cases only, and the test cases are used for
   nothing but this table. Every method sees the same number of passes over its data (rounds × local epochs);
   the non-FL baselines use ``fetalseg.training.fit``, the federated ones the real job in NVFlare's simulator
   (its final global model), and all are scored with ``fetalseg.evaluation.evaluate_cases`` on the same cases.
   Goal: FedAvg ≥ centralized − 0.01.
2. Overhead: wall time of the FedAvg simulation ÷ the same local work without NVFlare (the job's own
   ``SiteTrainer`` per site: validate, train, diff, weighted average, for the same rounds), end to end and per
   round (start-up excluded). The local reference has the simulator's layout (one spawned process per site with
   the job's torch threads, ``run_local_parallel``), so the ratio is NVFlare's cost, not a difference in how the
   cores are shared. Goal ≤ 1.15.
3. Bytes per round per site: the update's array payload as sent (float32 DIFF), after NVFlare's
   ``PercentilePrivacy`` (still dense) and after the project's ``SparsePercentileFilter`` (sparse payload).

Sizes (``--rounds``, ``--local-epochs``, ``--cases`` override a size's values):

* ``--quick``: 32³ volumes at 4 mm, 4 cases per site, 3 rounds: minutes; shows the plumbing works, its numbers
  are dominated by start-up and tiny data.
* default (medium): 48³ volumes on a 48³ grid (the bundle at 128/48 mm), 6 cases per site (3 train, 1 validation,
  2 test), 12 rounds × 3 local epochs: 8.3 minutes on 2 idle CPU cores (41 under load 6–9 from other work);
  centralized training reaches about 0.45 mean Dice, so the Dice values mean something.
* ``--full``: 64³ volumes with the bundle's defaults, 8 cases per site, 10 rounds × 1 local epoch (not run yet;
  at 10 passes FedAvg is far from converged: ``bench_fl_schedule.py`` shows the budgets that compare fairly).

Writes bench/results/fl.md and fl.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SITES = ["site-1", "site-2", "site-3"]
TINY = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}
FOV_MM = 128.0  # the synthetic federation's field of view (fetalseg.data.federation.write_federation)
# size -> volume edge (voxels), cases per site, rounds, local epochs, bundle overrides
SIZES: dict[str, tuple[int, int, int, int, dict[str, Any]]] = {
    "quick": (32, 4, 3, 1, TINY),
    "medium": (48, 6, 12, 3, {"pixdim": [FOV_MM / 48] * 3, "patch_size": [48, 48, 48]}),
    "full": (64, 8, 10, 1, {}),
}


def _setup_environment() -> None:
    """NVFlare's client processes must find this checkout and this interpreter (as ``python3``)."""
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    sys.path.insert(0, str(ROOT))


def job_config(args: argparse.Namespace, data_root: Path, name: str, **changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "name": name,
        "algorithm": "fedavg",
        "num_rounds": args.rounds,
        "min_clients": 3,
        "sites": SITES,
        "bundle_overrides": args.overrides,
        "data": {"root": str(data_root), "split_seed": 0},
        "training": {"local_epochs": args.local_epochs, "seed": 0},
        "server": {"straggler_wait_s": 600},
        "tracking": "tensorboard",
        "cross_site_eval": False,
        # three site processes share the cores: one torch thread each (the local run uses them all in one process)
        "runtime": {"external_process": True, "init_seed": 0, "torch_threads": 1},
    }
    cfg.update(changes)
    return cfg


def site_splits(data_root: Path) -> list:
    """Every site split once, the way the federated job splits it (``fetalseg.baseline.split_site``)."""
    from fetalseg.baseline import split_site
    from fetalseg.data.loaders import load_dataset

    return [split_site(load_dataset(data_root / site, site=site), seed=0) for site in SITES]


def score(network: Any, cases: list, overrides: dict) -> float:
    from fetalseg.bundle import Bundle
    from fetalseg.evaluation import evaluate_cases
    from fetalseg.metrics import nanmean

    scores = evaluate_cases(network, cases, bundle=Bundle("common", overrides=overrides), with_hd95=False)
    return nanmean(s.mean_dice for s in scores)


def run_fl(args: argparse.Namespace, data_root: Path, work: Path, name: str, **changes: Any) -> dict[str, Any]:
    """One federated job in the simulator: wall time, per-round time (from the server log), final global model."""
    import torch

    from fetalseg.bundle import load_checkpoint_file
    from nvflare_jobs.fetal_brain.job import run_simulation
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    cfg = job_config(args, data_root, name, **changes)
    started_at = datetime.now()
    start = time.perf_counter()
    run = run_simulation(cfg, work / name)
    wall = time.perf_counter() - start
    log = (run / "server" / "log.txt").read_text()
    # per round: from one aggregation to the next (round 0 also contains the sites' start-up, so it is left out)
    fmt = "%Y-%m-%d %H:%M:%S,%f"
    done = [
        datetime.strptime(t, fmt)
        for t in re.findall(r"^(\S+ \S+) - .*round \d+: (?:aggregating|continuing)", log, flags=re.M)
    ]
    round_s = [(b - a).total_seconds() for a, b in itertools.pairwise(done)]
    # start-up + round 0: from the call to the first aggregation; after the last one: shutdown
    first_round_s = (done[0] - started_at).total_seconds() if done else float("nan")
    shutdown_s = wall - (done[-1] - started_at).total_seconds() if done else float("nan")
    model = FetalBrainNet(cfg["bundle_overrides"], init_seed=None)
    state = load_checkpoint_file(run / "server" / "simulate_job" / "app_server" / "FL_global_model.pt")
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state["model"].items()})
    rows = (run / "server" / "simulate_job" / "metrics" / "round_metrics.jsonl").read_text().splitlines()
    per_round = [{m["name"]: m["value"] for m in json.loads(row)["aggregated_metrics"]} for row in rows]
    final = per_round[-1] if per_round else {}
    return {
        "wall_s": wall,
        "startup": startup_breakdown(run, started_at),
        "round_s": round_s,
        "first_round_s": first_round_s,
        "shutdown_s": shutdown_s,
        "model": model,
        "config": cfg,
        "metrics": final,
        "val_mean_dice": [m.get("val_mean_dice", float("nan")) for m in per_round],
        "run": run,
    }


def best_checkpoint(run: Path) -> Path:
    """The best global model (bundle format) that the job's server kept in a simulator run ``run``."""
    from nvflare_jobs.checkpoint import BEST_CHECKPOINT_NAME

    path = run / "server" / "simulate_job" / "app_server" / BEST_CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no best global model in {run}: {path} is missing")
    return path


STARTUP_MARKS = [  # (what, log file, message): the first time each appears in a simulator run's logs
    ("simulator server created", "server", "Create the Simulator Server"),
    ("server app deployed and started", "server", "Server runner starting"),
    ("site processes running", "site", "ClientTaskWorker started to run"),
    ("site apps built; training scripts launched", "site", "launching external trainer"),
    ("training scripts ready (imports, data, model)", "site", "trainer session established"),
    ("first round aggregated", "server", "round 0: aggregating"),
]


def _log_times(path: Path, message: str) -> list[datetime]:
    fmt = "%Y-%m-%d %H:%M:%S,%f"
    pattern = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) - .*" + re.escape(message), flags=re.M)
    return [datetime.strptime(t, fmt) for t in pattern.findall(path.read_text())] if path.is_file() else []


def startup_breakdown(run: Path, started_at: datetime) -> list[dict[str, Any]]:
    """When each start-up step of a simulator run finished, from its logs: for site steps the LAST site to get
    there (the round waits for every site). ``started_at``: when ``run_simulation`` was called."""
    rows, previous = [], started_at
    for what, where, message in STARTUP_MARKS:
        if where == "server":
            times = _log_times(run / "server" / "log.txt", message)[:1]
        else:
            firsts = [_log_times(run / site / "log.txt", message)[:1] for site in SITES]
            times = [max(t[0] for t in firsts)] if all(firsts) else []
        if not times:
            rows.append({"step": what, "at_s": float("nan"), "step_s": float("nan")})
            continue
        rows.append(
            {
                "step": what,
                "at_s": (times[0] - started_at).total_seconds(),
                "step_s": (times[0] - previous).total_seconds(),
            }
        )
        previous = times[0]
    return rows


def startup_table(rows: list[dict[str, Any]]) -> list[str]:
    return [
        "| step (last site for site steps) | done at (s) | step took (s) |",
        "|---|---:|---:|",
        *(f"| {r['step']} | {r['at_s']:.1f} | {r['step_s']:.1f} |" for r in rows),
    ]


def run_local(args: argparse.Namespace, data_root: Path, **changes: Any) -> dict[str, Any]:
    """The same rounds without NVFlare: each site's SiteTrainer in turn, then the weighted average of the diffs.

    Also returns the final global weights and the one with the best mean validation Dice over the sites (what the
    job's model selection keeps), for ``bench_fl_schedule.py``. ``changes``: job-config entries to override.
    """

    from nvflare_jobs.config import JobConfig
    from nvflare_jobs.fetal_brain.client import SiteTrainer
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    cfg = JobConfig.from_dict(job_config(args, data_root, "local", **changes))
    start = time.perf_counter()
    trainers = [SiteTrainer(cfg, site) for site in SITES]
    setup_s = time.perf_counter() - start
    global_state = {k: v.clone() for k, v in FetalBrainNet(cfg.bundle_overrides, init_seed=0).state_dict().items()}
    round_s, val, best_state = [], [], global_state
    for _ in range(cfg.num_rounds):
        round_start = time.perf_counter()
        diffs, weights, scores = [], [], []
        for trainer in trainers:
            base = trainer.load_global(global_state)
            scores.append(trainer.validate().get("val_mean_dice", float("nan")))
            stats = trainer.train_round()
            diffs.append(trainer.weight_diff(base))
            weights.append(stats.steps)
        val.append(statistics.mean(scores))
        if val[-1] >= max(val):
            best_state = global_state
        global_state = weighted_average(global_state, diffs, weights)
        round_s.append(time.perf_counter() - round_start)
    return {
        **_timings(start, setup_s, round_s),
        "global_state": global_state,
        "best_state": best_state,
        "val_mean_dice": val,
    }


def weighted_average(global_state: dict[str, Any], diffs: list[dict[str, Any]], weights: list[int]) -> dict[str, Any]:
    """The server's FedAvg step: global weights plus the diffs averaged by each site's number of steps."""
    total = float(sum(weights))
    return {k: v + sum(w / total * d[k].to(v.dtype) for w, d in zip(weights, diffs)) for k, v in global_state.items()}


def _timings(start: float, setup_s: float, round_s: list[float]) -> dict[str, Any]:
    """Wall time since ``start``; rounds after the first; start-up + first round (what the simulator's log gives)."""
    return {
        "wall_s": time.perf_counter() - start,
        "round_s": round_s[1:],
        "setup_s": setup_s,
        "first_round_s": setup_s + round_s[0],
    }


def _site_worker(cfg_dict: dict[str, Any], site: str, conn: Any) -> None:
    """One site of ``run_local_parallel``: its own process and torch threads, as in the simulator."""
    import torch

    _setup_environment()
    from nvflare_jobs.config import JobConfig
    from nvflare_jobs.fetal_brain.client import SiteTrainer

    cfg = JobConfig.from_dict(cfg_dict)
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    trainer = SiteTrainer(cfg, site)
    conn.send("ready")
    while (global_state := conn.recv()) is not None:
        base = trainer.load_global(global_state)
        val = trainer.validate().get("val_mean_dice", float("nan"))
        stats = trainer.train_round()
        conn.send((trainer.weight_diff(base), stats.steps, val))
    conn.close()


def run_local_parallel(args: argparse.Namespace, data_root: Path, **changes: Any) -> dict[str, Any]:
    """The same rounds without NVFlare, laid out like the simulator: one process per site, same torch threads.

    The overhead reference: each site's ``SiteTrainer`` in its own spawned process (Python start-up, imports,
    data and model included, as the simulator's site scripts have them), the server's weighted average of the
    diffs in this process, weights passed through pipes. What remains of the federated wall time beyond this is
    NVFlare: its processes, task exchange, serialization, filters, persistence and tracking.
    """
    import multiprocessing as mp

    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    cfg_dict = job_config(args, data_root, "local", **changes)
    ctx = mp.get_context("spawn")
    start = time.perf_counter()
    pipes, procs = [], []
    for site in SITES:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_site_worker, args=(cfg_dict, site, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    global_state = {
        k: v.clone()
        for k, v in FetalBrainNet(cfg_dict["bundle_overrides"], init_seed=cfg_dict["runtime"]["init_seed"])
        .state_dict()
        .items()
    }
    try:
        for conn in pipes:
            if conn.recv() != "ready":
                raise RuntimeError("a site process did not start")
        setup_s = time.perf_counter() - start
        round_s, val = [], []
        for _ in range(cfg_dict["num_rounds"]):
            round_start = time.perf_counter()
            for conn in pipes:
                conn.send(global_state)
            replies = [conn.recv() for conn in pipes]
            val.append(statistics.mean(r[2] for r in replies))
            global_state = weighted_average(global_state, [r[0] for r in replies], [r[1] for r in replies])
            round_s.append(time.perf_counter() - round_start)
        for conn in pipes:
            conn.send(None)
        for proc in procs:
            proc.join(timeout=60)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    return {**_timings(start, setup_s, round_s), "global_state": global_state, "val_mean_dice": val}


def run_baseline(args: argparse.Namespace, train: list, val: list) -> Any:
    from fetalseg.bundle import Bundle
    from fetalseg.training import fit
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    bundle = Bundle("train", overrides=args.overrides)
    network = FetalBrainNet(args.overrides, init_seed=0).net  # the same initial weights as the federated jobs
    epochs = args.rounds * args.local_epochs
    model, _ = fit(bundle, train, val, max_epochs=epochs, val_interval=epochs, network=network, seed=0)
    return model


def update_bytes(args: argparse.Namespace, data_root: Path) -> list[dict[str, Any]]:
    """Array bytes of one real round's update as it leaves a site: full, NVFlare percentile, sparse percentile."""
    import numpy as np
    from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

    from nvflare_jobs.config import JobConfig
    from nvflare_jobs.fetal_brain.client import SiteTrainer
    from nvflare_jobs.fetal_brain.model import FetalBrainNet
    from privacy.nvflare_filters import SparsePercentileFilter

    def array_bytes(obj: Any) -> int:
        if isinstance(obj, np.ndarray):
            return int(obj.nbytes)
        if isinstance(obj, dict):
            return sum(array_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(array_bytes(v) for v in obj)
        return 0

    cfg = JobConfig.from_dict(job_config(args, data_root, "bytes"))
    trainer = SiteTrainer(cfg, SITES[0])
    base = trainer.load_global(FetalBrainNet(cfg.bundle_overrides, init_seed=0).state_dict())
    stats = trainer.train_round()
    diff = {k: v.numpy().astype(np.float32) for k, v in trainer.weight_diff(base).items()}
    rows = []
    for label, flt in (
        ("full update (float32 DIFF)", None),
        ("NVFlare PercentilePrivacy (percentile 90)", PercentilePrivacy(90, 0.01, data_kinds=[DataKind.WEIGHT_DIFF])),
        ("project SparsePercentileFilter (percentile 90)", SparsePercentileFilter(percentile=90)),
    ):
        dxo = DXO(DataKind.WEIGHT_DIFF, data={k: v.copy() for k, v in diff.items()})
        dxo.set_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, stats.steps)
        shareable = dxo.to_shareable()
        if flt is not None:
            shareable = flt.process(shareable, FLContext())
        rows.append({"payload": label, "bytes": array_bytes(from_shareable(shareable).data)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="32³, 4 cases per site, 3 rounds: minutes")
    size.add_argument("--full", action="store_true", help="64³, 8 cases per site, 10 rounds (bundle defaults)")
    parser.add_argument("--rounds", type=int, help="federated rounds (= epochs of the baselines ÷ local epochs)")
    parser.add_argument("--local-epochs", type=int, help="local epochs per round")
    parser.add_argument("--cases", type=int, help="cases per site")
    parser.add_argument("--epsilons", type=float, nargs=2, default=[8.0, 2.0], help="two DP-SGD target ε")
    parser.add_argument("--work", type=Path, help="keep data and runs here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fl.md")
    args = parser.parse_args()
    args.size = "quick" if args.quick else "full" if args.full else "medium"
    edge, cases, rounds, local_epochs, args.overrides = SIZES[args.size]
    args.rounds = args.rounds or rounds
    args.cases = args.cases or cases
    args.local_epochs = args.local_epochs or local_epochs
    shape = (edge, edge, edge)
    _setup_environment()
    import torch

    from fetalseg.data.federation import write_federation

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_fl_"))
    data_root = work / "federation"
    if not data_root.exists():
        write_federation(data_root, n_sites=3, cases_per_site=args.cases, shape=shape, seed=0)
    splits = site_splits(data_root)
    train = [c for s in splits for c in s.train]
    val = [c for s in splits for c in s.val]
    held_out = [c for s in splits for c in s.test]
    overrides = args.overrides
    load_before = os.getloadavg()[0]
    started = time.perf_counter()

    utility: list[dict[str, Any]] = []
    phase = time.perf_counter()

    def add(method: str, model: Any, **extra: Any) -> None:
        """Score ``model`` on the test cases; record the seconds since the previous row (training + scoring)."""
        nonlocal phase
        utility.append({"method": method, "dice": score(model, held_out, overrides), **extra})
        utility[-1]["seconds"] = time.perf_counter() - phase
        print(f"[bench_fl] {method}: Dice {utility[-1]['dice']:.4f} ({utility[-1]['seconds']:.0f} s)", flush=True)
        phase = time.perf_counter()

    add("single site (site-1 only)", run_baseline(args, splits[0].train, splits[0].val))
    add("centralized (3 sites pooled)", run_baseline(args, train, val))
    fedavg = run_fl(args, data_root, work, "fedavg")
    add("FedAvg", fedavg["model"], epsilon=None)
    local = run_local_parallel(args, data_root)  # right after the FedAvg job, the same process layout
    phase = time.perf_counter()
    pct = run_fl(args, data_root, work, "percentile", privacy={"filters": [{"type": "percentile", "percentile": 90}]})
    add("FedAvg + PercentilePrivacy (90)", pct["model"], epsilon=None)
    for eps in args.epsilons:
        dp = {"dp_sgd": {"target_epsilon": eps, "max_grad_norm": 1.0, "delta": 1e-5}}
        run = run_fl(args, data_root, work, f"dpsgd_eps{eps:g}", privacy=dp)
        add(
            f"FedAvg + DP-SGD (target ε = {eps:g}, δ = 1e-5, per site)",
            run["model"],
            epsilon=run["metrics"].get("dp_epsilon"),
        )

    fl_round = statistics.mean(fedavg["round_s"]) if fedavg["round_s"] else float("nan")
    local_round = statistics.mean(local["round_s"]) if local["round_s"] else float("nan")
    overhead = {
        "fl_wall_s": fedavg["wall_s"],
        "local_wall_s": local["wall_s"],
        "ratio_wall": fedavg["wall_s"] / local["wall_s"],
        "fl_round_s": fl_round,
        "local_round_s": local_round,
        "ratio_round": fl_round / local_round,
        "fl_first_round_s": fedavg["first_round_s"],
        "local_first_round_s": local["first_round_s"],
        "local_setup_s": local["setup_s"],
        "fl_shutdown_s": fedavg["shutdown_s"],
        "fl_rounds_after_first_s": sum(fedavg["round_s"]),
        "local_rounds_after_first_s": sum(local["round_s"]),
    }
    sizes = update_bytes(args, data_root)
    total_s = time.perf_counter() - started

    centralized = next(u["dice"] for u in utility if u["method"].startswith("centralized"))
    fed = next(u["dice"] for u in utility if u["method"] == "FedAvg")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# Federated training benchmark ({args.size}: {shape[0]}³, {args.cases} cases/site, "
        f"{args.rounds} rounds × {args.local_epochs} local epoch{'s' if args.local_epochs > 1 else ''})",
        "",
        f"{now}, {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}; load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after; whole benchmark {total_s / 60:.1f} min. "
        "One run: compare numbers within this file only.",
        "",
        f"## Utility: mean Dice on the {len(held_out)} held-out test cases of all sites",
        "",
        f"Each site split with `fetalseg.baseline.split_site` (the federated job's own split): {len(train)} training, "
        f"{len(val)} validation, {len(held_out)} test cases in all. Every method: {args.rounds * args.local_epochs} "
        "passes over its training cases, from the same initial weights; federated rows use the final global model.",
        "",
        "| method | mean Dice | Δ vs centralized | ε spent (mean over sites) | train + score (s) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {u['method']} | {u['dice']:.4f} | {u['dice'] - centralized:+.4f} | "
            f"{'–' if u.get('epsilon') is None else format(u['epsilon'], '.2f')} | {u['seconds']:.0f} |"
            for u in utility
        ),
        "",
        f"Goal FedAvg ≥ centralized − 0.01: **{'met' if fed >= centralized - 0.01 else 'not met'}** "
        f"({fed:.4f} vs {centralized:.4f}). At equal passes FedAvg makes about a third of the pooled model's "
        "sequential optimizer steps (each site trains on a third of the cases, and the sites' steps are averaged, "
        "not chained); `bench/bench_fl_schedule.py` finds the budget at which it catches up.",
        "",
        "## Overhead: FedAvg in NVFlare's simulator ÷ the same local rounds without NVFlare",
        "",
        "| | federated (s) | local (s) | ratio |",
        "|---|---:|---:|---:|",
        f"| end to end (start-up included) | {overhead['fl_wall_s']:.1f} | {overhead['local_wall_s']:.1f} | "
        f"{overhead['ratio_wall']:.2f}× |",
        f"| one round after the first (mean) | {overhead['fl_round_s']:.1f} | {overhead['local_round_s']:.1f} | "
        f"{overhead['ratio_round']:.2f}× |",
        f"| start-up + first round | {overhead['fl_first_round_s']:.1f} | {overhead['local_first_round_s']:.1f} | "
        f"{overhead['fl_first_round_s'] / overhead['local_first_round_s']:.2f}× |",
        f"| all rounds after the first | {overhead['fl_rounds_after_first_s']:.1f} | "
        f"{overhead['local_rounds_after_first_s']:.1f} | "
        f"{overhead['fl_rounds_after_first_s'] / max(overhead['local_rounds_after_first_s'], 1e-9):.2f}× |",
        f"| after the last aggregation (shutdown) | {overhead['fl_shutdown_s']:.1f} | – | – |",
        "",
        "### Where the federated start-up goes (FedAvg run, from the simulator's logs)",
        "",
        *startup_table(fedavg["startup"]),
        "",
        f"Goal ≤ 1.15×: end to end **{'met' if overhead['ratio_wall'] <= 1.15 else 'not met'}**, per round "
        f"**{'met' if overhead['ratio_round'] <= 1.15 else 'not met'}**. End to end includes NVFlare's fixed "
        "start-up (simulator, one Python process per site); it is amortised over the rounds of a real job. Both "
        "runs train the three sites in parallel processes with the job's torch threads (one each) sharing the "
        "cores; the local one passes weights through pipes instead of NVFlare.",
        "",
        "## Bytes sent per round per site (array payload of one real update of site-1)",
        "",
        "| payload | bytes | ÷ full |",
        "|---|---:|---:|",
        *(f"| {s['payload']} | {s['bytes']:,} | {s['bytes'] / sizes[0]['bytes']:.3f} |" for s in sizes),
        "",
        "NVFlare's PercentilePrivacy zeroes small values but still sends a dense array (no bytes saved); the sparse "
        "filter sends indices and values of the shared entries. Neither is differential privacy.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    data = {
        "utility": utility,
        "overhead": overhead,
        "startup": fedavg["startup"],
        "bytes": sizes,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
