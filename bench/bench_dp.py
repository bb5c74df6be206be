"""DP-SGD cost on the bundle's 3D U-Net: step time and peak memory of each per-sample gradient method vs a plain step.

Each configuration runs in its own process (peak RSS is per process), on the same random batch, through the same
code the federated client uses (``privacy.dpsgd.SitePrivacyEngine`` + ``fetalseg.training.train_step``); the
sample rate is 1 (dataset = one batch) so every step sees the same batch size. Rounds interleave the modes so
load from other processes on a shared machine hits all of them alike; the table gives medians and the ratio to
the plain step measured in the same run. Opacus's "ew" (expanded weights) mode is tried too: it cannot handle
``conv_transpose3d``.

One table per torch thread count (default 1 and 2): with 1 thread, CPU time measures the work even on a loaded
machine; with 2, wall-clock shows how well each mode uses a 2-core site (grouped convolutions, which vmap turns
per-sample weight gradients into, parallelise less well on CPU than the plain step's).

Goals (issue 4): DP step ≤ 1.5× the plain step's time and ≤ 2× its memory. The fastest correct mode (CPU time)
is ``privacy.dpsgd.DEFAULT_GRAD_SAMPLE_MODE``. Writes bench/results/dp.md (+ .json).

``--small-n`` (issue 24) measures instead the small-N DP setting: full-batch DP-GD with K augmented views per case
(``augmentation_multiplicity``) on a parameter subspace (``--subspace``, default ``norm+bias+head``), against a
plain step on the same B·K views with the same weights trained; it adds (or replaces) its own section of dp.md
and a ``small_n`` entry of dp.json and keeps the other tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from privacy.dpsgd import DEFAULT_GRAD_SAMPLE_MODE  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MODES = ("plain", "loop", "vmap", "functorch", "hooks", "ghost", "ew")
# --small-n: a plain step on B·K views vs full-batch DP-GD with K views per case (views averaged before clipping)
SMALL_N_MODES = ("plain", "vmap", "loop")
SMALL_N_TITLE = "## Small-N DP: full-batch DP-GD with K views per case on a subspace"


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _RssSampler:
    """Highest resident set seen while running (sampled every 5 ms): the memory a training step needs."""

    def __init__(self) -> None:
        import threading

        self.peak = _rss_now_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_now_mb())
            self._stop.wait(0.005)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_now_mb())


def worker(
    mode: str, size: int, batch: int, steps: int, warmup: int, threads: int, views: int = 0, subspace: str = "all"
) -> dict:
    """One configuration in this process: returns per-step seconds and the peak RSS growth during the steps.

    ``views`` > 0: the small-N setting (``batch`` cases × ``views`` views, full batch, ``subspace`` trained)."""
    import torch

    from fetalseg import subspace as groups
    from fetalseg.bundle import Bundle
    from fetalseg.training import train_step

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bundle = Bundle("train", overrides={"patch_size": [size] * 3})
    net = bundle.network()
    groups.freeze_except(net, groups.parameter_names(net, subspace))
    optimizer = bundle.optimizer([p for p in net.parameters() if p.requires_grad])
    g = torch.Generator().manual_seed(0)
    n_samples = batch * views if mode == "plain" and views else batch  # plain: every view is a sample
    images = torch.rand(n_samples, 1, size, size, size, generator=g)
    labels = torch.randint(0, bundle.num_classes, (n_samples, 1, size, size, size), generator=g)
    data = [{"image": images[i], "label": labels[i]} for i in range(n_samples)]
    loss_fn = bundle.loss()
    note = ""
    if mode == "plain":
        model = net

        def batches():
            while True:
                yield {"image": images, "label": labels}
    elif mode == "ew":
        from opacus.grad_sample import prepare_module

        model = prepare_module(net, grad_sample_mode="ew", batch_first=True, loss_reduction="mean")
        try:
            loss_fn(model(images), labels).backward()
        except Exception as exc:  # the point of trying it
            return {"mode": mode, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"}
        return {"mode": mode, "error": "ran (unexpected); not timed"}
    else:
        from torch.utils.data import DataLoader

        from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine

        small_n = {"full_batch": True, "augmentation_multiplicity": views} if views else {}
        engine = SitePrivacyEngine(
            config=DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, grad_sample_mode=mode, **small_n),
            dataset_size=batch,
            batch_size=None if views else batch,
        )
        model, optimizer, loader = engine.make_private(
            model=net, optimizer=optimizer, data_loader=DataLoader(data, batch_size=batch)
        )
        loss_fn = engine.wrap_loss(loss_fn)

        def batches():
            while True:
                yield from loader

    it = batches()
    baseline = _rss_now_mb()  # model, optimizer, data and libraries loaded; no step taken yet
    times, cpu_times = [], []
    with _RssSampler() as rss:
        for _ in range(warmup):
            train_step(model, next(it), optimizer, loss_fn)
        for _ in range(steps):
            b = next(it)
            t, c = time.perf_counter(), time.process_time()
            train_step(model, b, optimizer, loss_fn)
            times.append(time.perf_counter() - t)
            cpu_times.append(time.process_time() - c)
    return {
        "mode": mode,
        "seconds": times,
        "cpu_seconds": cpu_times,
        "baseline_rss_mb": baseline,
        "step_memory_mb": rss.peak - baseline,
        "peak_rss_mb": _rss_peak_mb(),
        "note": note,
    }


def run_worker(mode: str, args: argparse.Namespace, n_threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--size", str(args.size), "--batch", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(n_threads)]  # fmt: skip
    if args.small_n:
        cmd += ["--views", str(args.views), "--subspace", args.subspace]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        return {"mode": mode, "error": proc.stderr.strip().splitlines()[-1][:120] if proc.stderr else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="patch size (voxels per axis)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (functorch traces, allocator)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every mode")
    ap.add_argument(
        "--threads",
        default="1,2",
        help="torch threads per process, one table each (1: the work itself, CPU time not inflated by OpenMP "
        "threads waiting for cores other processes hold; 2: wall-clock as a 2-core site trains)",
    )
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    ap.add_argument("--out", type=Path, default=RESULTS / "dp.md")
    ap.add_argument("--small-n", action="store_true", help="full-batch DP-GD with K views on a subspace (own section)")
    ap.add_argument("--views", type=int, default=4, help="--small-n: augmented views per case (K)")
    ap.add_argument("--subspace", default="norm+bias+head", help="--small-n: trained parameter groups")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        views, sub = (args.views, args.subspace) if args.small_n else (0, "all")
        print(
            json.dumps(
                worker(args.worker, args.size, args.batch, args.steps, args.warmup, int(args.threads), views, sub)
            )
        )
        return
    if args.small_n:
        small_n(args)
        return

    modes = [m for m in args.modes.split(",") if m]
    threads = [int(t) for t in str(args.threads).split(",") if t]
    lines = [
        f"# DP-SGD cost on the 3D U-Net ({args.size}³ patches, batch {args.batch}, CPU)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores. Median of {args.rounds} processes × {args.steps} timed steps (after {args.warmup} "
        "warm-up steps) per mode, modes interleaved; ratios are to the plain step of the same table. Time: "
        "wall-clock and CPU seconds (all threads) per step. Step memory: highest resident set during the steps "
        "minus the resident set before the first step (model, data and libraries already loaded); peak RSS: the "
        "whole process. The goal column judges CPU time (the work) and step memory.",
    ]
    record: dict = {"args": vars(args) | {"out": str(args.out)}, "tables": {}}
    for n_threads in threads:
        rows, runs, load = _measure(args, modes, n_threads)
        record["tables"][n_threads] = {"rows": rows, "runs": runs, "load_average": load}
        lines += _table(rows, n_threads, load)
    cpu_rows = record["tables"][threads[0]]["rows"]
    timed = {m: r for m, r in cpu_rows.items() if m not in ("plain", "ew") and "cpu_s" in r}
    if timed:
        best = min(timed, key=lambda m: timed[m]["cpu_s"])
        lines += [
            "",
            f"Fastest DP mode (CPU time, {threads[0]} thread(s)): **{best}**; the default is "
            f"`privacy.dpsgd.DEFAULT_GRAD_SAMPLE_MODE = {DEFAULT_GRAD_SAMPLE_MODE!r}`. Every mode computes the "
            "per-sample gradients of `DiceCELoss(batch=False)` (ghost clipping through `privacy.dpsgd.PerSampleLoss`); "
            "tests/privacy/test_dpsgd.py checks them against one-sample-at-a-time gradients and checks that one DP "
            "step is the same update in every mode.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))


def small_n(args: argparse.Namespace) -> None:
    """Run the small-N rows and put them into dp.md / dp.json next to the tables already there."""
    if args.modes == ",".join(MODES):
        args.modes = ",".join(SMALL_N_MODES)
    modes = [m for m in args.modes.split(",") if m]
    threads = [int(t) for t in str(args.threads).split(",") if t]
    views = args.batch * args.views
    lines = [
        SMALL_N_TITLE,
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; `python bench/bench_dp.py {' '.join(sys.argv[1:])}`. {args.size}³ patches; "
        f"DP rows: full-batch DP-GD (`full_batch: true`, q = 1) on {args.batch} cases × {args.views} views "
        f"(`augmentation_multiplicity: {args.views}`; a case's views averaged before its clipping); plain row: one "
        f"ordinary step on the same {views} views as one batch. Both train only `{args.subspace}` (the rest "
        f"frozen; fetalseg.subspace). Median of {args.rounds} processes × {args.steps} timed steps (after "
        f"{args.warmup} warm-up), modes interleaved; per view = step ÷ {views}. Same columns as above.",
    ]
    record: dict = {"args": vars(args) | {"out": str(args.out)}, "tables": {}}
    for n_threads in threads:
        rows, runs, load = _measure(args, modes, n_threads)
        record["tables"][n_threads] = {"rows": rows, "runs": runs, "load_average": load}
        table = _table(rows, n_threads, load)
        table[1] = table[1].replace("## ", "### ", 1)
        per_view = [f"{m} {r['step_s'] / views:.3f} wall / {r['cpu_s'] / views:.3f} CPU" for m, r in rows.items()
                    if "step_s" in r]  # fmt: skip
        table += ["", "Per case-view (s): " + ", ".join(per_view) + "."]
        lines += table
    text = "\n".join(lines) + "\n"
    print(text)
    old = args.out.read_text() if args.out.exists() else ""
    kept = old.split("\n" + SMALL_N_TITLE)[0].rstrip("\n")
    args.out.write_text((kept + "\n\n" if kept else "") + text)
    json_path = args.out.with_suffix(".json")
    previous = json.loads(json_path.read_text()) if json_path.exists() else {}
    json_path.write_text(json.dumps(previous | {"small_n": record}, indent=1, default=str))


def _measure(args: argparse.Namespace, modes: list[str], n_threads: int) -> tuple[dict, dict, tuple[float, float]]:
    load_before = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes:
            if mode == "ew" and r > 0:
                continue
            res = run_worker(mode, args, n_threads)
            runs[mode].append(res)
            msg = res.get("error") or _fmt_times(res)
            print(f"{n_threads} thread(s), round {r + 1} {mode}: {msg}", file=sys.stderr, flush=True)
    rows = {}
    for mode, results in runs.items():
        ok = [r for r in results if "seconds" in r]
        if not ok:
            rows[mode] = {"error": results[0].get("error", "failed") if results else "not run"}
            continue
        rows[mode] = {
            "step_s": statistics.median(s for r in ok for s in r["seconds"]),
            "cpu_s": statistics.median(s for r in ok for s in r["cpu_seconds"]),
            "step_memory_mb": statistics.median(r["step_memory_mb"] for r in ok),
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok),
            "runs": len(ok),
        }
    return rows, runs, (load_before, os.getloadavg()[0])


def _table(rows: dict, n_threads: int, load: tuple[float, float]) -> list[str]:
    plain = rows.get("plain", {})
    lines = [
        "",
        f"## {n_threads} torch thread(s) per process (load average before/after {load[0]:.1f}/{load[1]:.1f})",
        "",
        "| mode | wall (s) | ÷ plain | CPU (s) | ÷ plain | step memory (MB) | ÷ plain | peak RSS (MB) "
        "| goal ≤ 1.5× time, ≤ 2× memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for mode, row in rows.items():
        if "error" in row:
            lines.append(f"| {mode} | – | – | – | – | – | – | – | unsupported: {row['error']} |")
            continue
        t_ratio = row["step_s"] / plain["step_s"] if "step_s" in plain else float("nan")
        c_ratio = row["cpu_s"] / plain["cpu_s"] if "cpu_s" in plain else float("nan")
        m_ratio = row["step_memory_mb"] / plain["step_memory_mb"] if plain.get("step_memory_mb") else float("nan")
        if mode == "plain":
            goal = "–"
        else:
            goal = (
                ("CPU time met" if c_ratio <= 1.5 else "CPU time not met")
                + (", wall met" if t_ratio <= 1.5 else ", wall not met")
                + (", memory met" if m_ratio <= 2 else ", memory not met")
            )
        lines.append(
            f"| {mode} | {row['step_s']:.2f} | {t_ratio:.2f}× | {row['cpu_s']:.2f} | {c_ratio:.2f}× "
            f"| {row['step_memory_mb']:.0f} | {m_ratio:.2f}× | {row['peak_rss_mb']:.0f} | {goal} |"
        )
    return lines


def _fmt_times(res: dict) -> str:
    return (
        f"{statistics.median(res['seconds']):.2f} s/step wall, {statistics.median(res['cpu_seconds']):.2f} s CPU, "
        f"step memory {res['step_memory_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
