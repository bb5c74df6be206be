"""How many passes FedAvg needs to match centralized training, and how to split them into rounds × local epochs.

Why: at the same number of passes over the data, FedAvg takes about one third of the pooled model's sequential
optimizer steps (each site trains on a third of the cases, and the three sites' steps are averaged, not chained),
so a short budget compares an under-trained federated model with a better-trained pooled one. This benchmark
trains both at several budgets (passes over each training case) and several local-epoch splits, on the demo's
synthetic 3-site federation (64³, 10 cases per site, split with ``fetalseg.baseline.split_site``), and scores them
on the same held-out test cases as ``bench_fl.py``.

By default FedAvg here is the job's own site code without NVFlare (``bench_fl.run_local``: each site's
``SiteTrainer``, weighted average of the diffs by steps), so many budgets can run in parallel processes;
``--fedavg-via nvflare`` runs the real job in NVFlare's simulator instead (``bench_fl.run_fl``: its server's
model selection and its ``fetal_brain_best.pt``). Both models are chosen on validation Dice (the pooled one
every 10 epochs, the federated one every round, as the job's server does); the federated final model is reported
too.

    python bench/bench_fl_schedule.py                    # CPU: hours (9 trainings); on a GPU: minutes
    python bench/bench_fl_schedule.py --budgets 60 --local-epochs 2 --parallel 1
    python bench/bench_fl_schedule.py --budgets 240 --local-epochs 6 --fedavg-via nvflare \
        --out bench/results/fl_schedule_nvflare.md   # the NVFlare job itself: ~20 min on 2 CPU cores
    python bench/bench_fl_schedule.py --budgets 480 --local-epochs 6 --fedavg-via nvflare --extend \
        --out bench/results/fl_schedule_nvflare.md   # add a budget (or --seeds) to that table, keep its rows

Every training keeps its chosen (and FedAvg's final) model under ``<work>/models``. ``--extra-test N`` scores every
kept model on N more subjects per site from the same synthetic sites (``write_more_cases``: never in the
federation, so never trained on or used for selection); 6 test cases make Dice differences of ~0.005 noise, so the
goal is then judged on all held-out cases. ``--redo centralized`` trains rows again that were measured before
models were kept (a note says whether the Dice was reproduced):

    python bench/bench_fl_schedule.py --budgets 480 --local-epochs 6 --seeds 0,1,2 --fedavg-via nvflare --extend \
        --extra-test 20 --out bench/results/fl_schedule_nvflare.md --work <the work folder of those runs>

The "chosen at" column says where validation picked each model: a model picked at the last check was still
improving, so that budget compares under-trained models.

Writes bench/results/fl_schedule.md (+ .json). Goal (issue 3): FedAvg ≥ centralized − 0.01.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench_fl  # noqa: E402
from summary import fl_schedule_gap  # noqa: E402

RESULTS = HERE / "results"


def run_name(run: dict[str, Any]) -> str:
    """Folder / file stem of one training in the work directory (also the NVFlare job's name)."""
    if run["method"] == "centralized":
        return f"centralized_{run['budget']}_{run['seed']}"
    return f"fedavg_{run['budget']}_{run['local_epochs']}_{run['seed']}"


def model_path(run: dict[str, Any], work: Path, kind: str = "best") -> Path:
    """Where a training's chosen (``best``) or last (``final``) model is kept, in the bundle checkpoint format."""
    return work / "models" / f"{run_name(run)}_{kind}.pt"


def load_model(run: dict[str, Any], work: Path, kind: str = "best") -> Any | None:
    """The kept network of a training, or None when it was not kept (results from before models were kept;
    NVFlare runs fall back to the checkpoints their server wrote)."""
    import torch

    from fetalseg.bundle import load_checkpoint, load_checkpoint_file
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    net = FetalBrainNet({}, init_seed=None)
    path = model_path(run, work, kind)
    if path.is_file():
        load_checkpoint(net.net, path)
        return net.net
    if run.get("via") != "nvflare":
        return None
    run_dir = work / "nvflare" / run_name(run) / run_name(run)  # what bench_fl.run_fl returns as "run"
    app = run_dir / "server" / "simulate_job" / "app_server"
    if kind == "best" and app.is_dir():
        load_checkpoint(net.net, bench_fl.best_checkpoint(run_dir))
        return net.net
    if kind == "final" and (app / "FL_global_model.pt").is_file():
        state = load_checkpoint_file(app / "FL_global_model.pt")["model"]
        net.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
        return net.net
    return None


def case_dice(network: Any, cases: list) -> list[float]:
    """Mean Dice over the 7 tissues of each case (kept per case so that test sets can be pooled exactly)."""
    from fetalseg.bundle import Bundle
    from fetalseg.evaluation import evaluate_cases

    return [float(s.mean_dice) for s in evaluate_cases(network, cases, bundle=Bundle("common"), with_hd95=False)]


def train_one(run: dict[str, Any], data_root: Path) -> dict[str, Any]:
    """One training (``run['method']`` = centralized or fedavg) at ``run['budget']`` passes; test Dice.

    The chosen and final models are kept under ``<work>/models`` so that they can be scored again later on more
    held-out cases (``--extra-test``) without training again."""
    import torch

    from fetalseg.bundle import Bundle, load_checkpoint, save_checkpoint
    from fetalseg.metrics import nanmean
    from fetalseg.training import fit
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    if run.get("threads"):
        torch.set_num_threads(int(run["threads"]))
    work = data_root.parent
    splits = bench_fl.site_splits(data_root)
    test = [c for s in splits for c in s.test]
    start = time.perf_counter()
    out = dict(run)
    final = None
    if run["method"] == "centralized":
        train = [c for s in splits for c in s.train]
        val = [c for s in splits for c in s.val]
        net = FetalBrainNet({}, init_seed=0).net  # the same initial weights as the federated jobs
        best, result = fit(
            Bundle("train"), train, val, max_epochs=run["budget"], val_interval=10, network=net, seed=run["seed"]
        )
        out["best_epoch"] = result.best_epoch
    elif run.get("via") == "nvflare":
        args = argparse.Namespace(rounds=run["budget"] // run["local_epochs"], local_epochs=run["local_epochs"])
        args.overrides = {}
        training = {"local_epochs": run["local_epochs"], "seed": run["seed"]}
        fl = bench_fl.run_fl(args, data_root, work / "nvflare", run_name(run), training=training)
        net = FetalBrainNet({}, init_seed=None)
        load_checkpoint(net.net, bench_fl.best_checkpoint(fl["run"]))
        best, final = net.net, fl["model"].net
        out["val_mean_dice"] = fl["val_mean_dice"]
        out["nvflare_wall_s"] = fl["wall_s"]
    else:
        args = argparse.Namespace(rounds=run["budget"] // run["local_epochs"], local_epochs=run["local_epochs"])
        args.overrides = {}
        local = bench_fl.run_local(args, data_root, training={"local_epochs": run["local_epochs"], "seed": run["seed"]})
        best_net, final_net = FetalBrainNet({}, init_seed=0), FetalBrainNet({}, init_seed=0)
        best_net.load_state_dict(local["best_state"])
        final_net.load_state_dict(local["global_state"])
        best, final = best_net.net, final_net.net
        out["val_mean_dice"] = local["val_mean_dice"]
    out["dice_cases"] = case_dice(best, test)
    out["dice"] = nanmean(out["dice_cases"])
    save_checkpoint(best, model_path(run, work, "best"), passes=run["budget"], seed=run["seed"])
    if final is not None:
        out["dice_final_cases"] = case_dice(final, test)
        out["dice_final"] = nanmean(out["dice_final_cases"])
        save_checkpoint(final, model_path(run, work, "final"), passes=run["budget"], seed=run["seed"])
    out["seconds"] = time.perf_counter() - start
    return out


def _key(run: dict[str, Any]) -> tuple:
    return (run["method"], run["budget"], run["local_epochs"], run["seed"], run.get("via"))


def load_previous(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Results already in ``args.out``'s .json, refused if they were measured on other data or another FedAvg."""
    path = args.out.with_suffix(".json")
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    for key in ("cases", "size", "fedavg_via"):
        if old["args"].get(key) != getattr(args, key):
            raise SystemExit(
                f"--extend: {path} was measured with --{key.replace('_', '-')} {old['args'].get(key)!r}, "
                f"not {getattr(args, key)!r}; write to another --out"
            )
    return list(old["results"])


def _previous_notes(args: argparse.Namespace) -> list[str]:
    path = args.out.with_suffix(".json")
    return list(json.loads(path.read_text()).get("notes", [])) if path.is_file() else []


def plan(budgets: list[int], local_epochs: list[int], seeds: list[int], *, via: str = "local") -> list[dict[str, Any]]:
    runs = []
    for seed in seeds:
        for budget in budgets:
            runs.append({"method": "centralized", "budget": budget, "local_epochs": None, "seed": seed})
            runs += [
                {"method": "fedavg", "budget": budget, "local_epochs": le, "seed": seed, "via": via}
                for le in local_epochs
                if budget % le == 0
            ]
    return runs


def select_runs(
    planned: list[dict[str, Any]], previous: list[dict[str, Any]], *, redo: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[tuple, dict[str, Any]]]:
    """(trainings to run, earlier results to keep, earlier results being redone by key).

    Planned trainings already in the table are skipped, unless ``redo`` names their method (or is "all"): then
    they run again and their old rows are kept aside, so the new Dice can be compared with the old one."""
    done = {_key(r) for r in previous}
    again = {_key(r) for r in planned if redo in ("all", r["method"])}
    redone = {_key(r): r for r in previous if _key(r) in again}
    kept = [r for r in previous if _key(r) not in again]
    return [r for r in planned if _key(r) in again or _key(r) not in done], kept, redone


def chosen_at(r: dict[str, Any]) -> str:
    """Where validation chose the model: at the last check means the run was still improving (under-trained)."""
    if r["method"] == "centralized":
        return f"epoch {r['best_epoch']} of {r['budget']}" if r.get("best_epoch") else "–"
    val = list(r.get("val_mean_dice") or [])
    scored = [i for i, v in enumerate(val) if v == v]  # NaN: a round without a validation score
    if not scored:
        return "–"
    # the sites validate the global model they receive: entry i scores the model after i aggregations
    best = max(scored, key=val.__getitem__)
    return f"after round {best} of {r['budget'] // r['local_epochs']}"


def table(results: list[dict[str, Any]]) -> list[str]:
    central = {(r["budget"], r["seed"]): r for r in results if r["method"] == "centralized"}
    pooled = any(r.get("dice_heldout") is not None for r in results)
    n_heldout = max((r.get("n_heldout", 0) for r in results), default=0)
    head = "| passes | method | rounds × local epochs | seed | test mean Dice | Δ vs centralized "
    rule = "|---:|---|---|---:|---:|---:|"
    if pooled:
        head += f"| all held-out ({n_heldout} cases) | Δ vs centralized "
        rule += "---:|---:|"
    head += (
        f"| goal (≥ −0.01) | FedAvg final model{' (all held-out)' if pooled else ''} | chosen at | train + score (s) |"
    )
    lines = [head, rule + "---|---:|---|---:|"]

    def cell(value: float | None, fmt: str = ".4f") -> str:
        return "–" if value is None or value != value else format(value, fmt)

    for r in sorted(
        results, key=lambda r: (r["budget"], r["seed"], r["method"] != "centralized", r["local_epochs"] or 0)
    ):
        ref = central.get((r["budget"], r["seed"]))
        fed = r["method"] == "fedavg"
        split = f"{r['budget'] // r['local_epochs']} × {r['local_epochs']}" if fed else f"{r['budget']} epochs"
        delta = r["dice"] - ref["dice"] if ref is not None else None
        row = f"| {r['budget']} | {'FedAvg' if fed else 'centralized'} | {split} | {r['seed']} | {r['dice']:.4f} | "
        row += f"{cell(delta, '+.4f')} | "
        if pooled:
            held = r.get("dice_heldout")
            held_delta = held - ref["dice_heldout"] if held is not None and ref and ref.get("dice_heldout") else None
            row += f"{cell(held)} | {cell(held_delta, '+.4f')} | "
        goal = "–"
        if fed and ref is not None:
            gap, on = fl_schedule_gap(r, ref)
            goal = ("met" if gap >= -0.01 else "not met") + (f" ({on})" if pooled else "")
        final = cell(r.get("dice_final")) if fed else "–"
        if fed and pooled:  # the final model on all held-out cases; a row without them says its cases
            held_final = r.get("dice_final_heldout")
            final = cell(held_final) if held_final is not None else f"{final} (test cases)"
        row += f"{goal} | {final} | {chosen_at(r)} | {r['seconds']:.0f} |"
        lines.append(row)
    return lines


def score_heldout(results: list[dict[str, Any]], work: Path, test: list, extra: list) -> list[str]:
    """Score every kept model on the extra held-out cases (once per model) and pool them with the split's test
    cases into ``dice_heldout``. A model whose test cases were not kept per case is scored on them again first,
    and must give the Dice in the table: the kept file is then the model that was measured. Returns the names of
    trainings whose model was not kept (left unscored)."""
    from fetalseg.metrics import nanmean

    missing = []
    for r in results:
        if r.get("n_extra") == len(extra):
            continue
        for kind, key in (("best", "dice"), ("final", "dice_final")):
            if kind == "final" and r["method"] != "fedavg":
                continue
            net = load_model(r, work, kind)
            if net is None:
                missing.append(f"{run_name(r)} ({kind})")
                continue
            if not r.get(f"{key}_cases"):
                r[f"{key}_cases"] = case_dice(net, test)
                if abs(nanmean(r[f"{key}_cases"]) - r[key]) > 5e-5:
                    raise RuntimeError(
                        f"{run_name(r)}: the kept {kind} model scores {nanmean(r[f'{key}_cases']):.4f} on the test "
                        f"cases, the table says {r[key]:.4f}: it is not the model that was measured"
                    )
            r[f"{key}_extra_cases"] = case_dice(net, extra)
            r[f"{key}_heldout"] = nanmean(r[f"{key}_cases"] + r[f"{key}_extra_cases"])
        if r.get("dice_heldout") is not None:
            r["n_extra"], r["n_heldout"] = len(extra), len(test) + len(extra)
    return missing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default="60,120,240", help="passes over each training case (comma-separated)")
    ap.add_argument("--local-epochs", default="2,6", help="FedAvg local epochs per round (comma-separated)")
    ap.add_argument("--seeds", default="0", help="training seeds (comma-separated)")
    ap.add_argument("--cases", type=int, default=10, help="cases per site (the demo's default)")
    ap.add_argument("--size", type=int, default=64, help="volume edge in voxels (the demo's default)")
    ap.add_argument("--parallel", type=int, default=1, help="trainings at once (one process each)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per training (0: torch's default)")
    ap.add_argument("--work", type=Path, help="keep the synthetic federation here")
    ap.add_argument("--out", type=Path, default=RESULTS / "fl_schedule.md")
    ap.add_argument(
        "--fedavg-via",
        choices=["local", "nvflare"],
        default="local",
        help="FedAvg through the job's site code in one process (local) or the real job in NVFlare's simulator",
    )
    ap.add_argument(
        "--extend",
        action="store_true",
        help="keep the results already in --out's .json (same --cases/--size/--fedavg-via) and run only what is "
        "missing: add budgets or seeds to a table without re-running it",
    )
    ap.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the table's notes (e.g. what else ran on the machine); --extend keeps earlier notes",
    )
    ap.add_argument(
        "--extra-test",
        type=int,
        default=0,
        metavar="N",
        help="also score every kept model on N more held-out subjects per site (same synthetic sites, never in the "
        "federation: fetalseg.data.federation.write_more_cases); the goal is then judged on all held-out cases",
    )
    ap.add_argument(
        "--redo",
        choices=["centralized", "fedavg", "all"],
        help="with --extend: train the planned runs of this method again even if the table has them (their rows "
        "are replaced and a note says whether the test Dice was reproduced), e.g. to keep the models of runs from "
        "before models were kept",
    )
    ap.add_argument(
        "--drop-note",
        action="append",
        default=[],
        metavar="TEXT",
        help="with --extend: drop the earlier notes that contain TEXT (e.g. one about a row --redo replaces)",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    bench_fl._setup_environment()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_fl_schedule_"))
    data_root = work / "federation"
    if args.one:
        print(json.dumps(train_one(json.loads(args.one), data_root)), flush=True)
        return

    import torch

    from fetalseg.data.federation import write_federation, write_more_cases
    from fetalseg.data.loaders import load_dataset

    if not data_root.exists():
        edge = args.size
        write_federation(data_root, n_sites=3, cases_per_site=args.cases, shape=(edge, edge, edge), seed=0)
    extra: list = []
    if args.extra_test:
        extra_root = work / f"extra_test_{args.extra_test}"
        if not extra_root.exists():
            write_more_cases(data_root, extra_root, n_cases=args.extra_test)
        extra = [c for site in bench_fl.SITES for c in load_dataset(extra_root / site, site=site)]
    runs = plan(
        [int(b) for b in args.budgets.split(",")],
        [int(e) for e in args.local_epochs.split(",")],
        [int(s) for s in args.seeds.split(",")],
        via=args.fedavg_via,
    )
    previous = load_previous(args) if args.extend else []
    earlier = _previous_notes(args) if args.extend else []
    notes = [n for n in earlier if not any(text in n for text in args.drop_note)] + list(args.note)
    runs, previous, redone = select_runs(runs, previous, redo=args.redo)
    splits = bench_fl.site_splits(data_root)
    counts = f"{len(splits[0].train)} train / {len(splits[0].val)} validation / {len(splits[0].test)} test"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    test = [c for s in splits for c in s.test]
    n_test = len(test)
    started = time.perf_counter()
    results: list[dict[str, Any]] = list(previous)

    def save(finished: int) -> None:
        # rows being redone keep their old result until the new one is in: an interrupted --redo loses nothing
        new = {_key(r) for r in results}
        rows = results + [old for key, old in redone.items() if key not in new]
        if extra:
            missing = score_heldout(rows, work, test, extra)
            if missing:
                print(f"[bench_fl_schedule] no kept model (not scored on the extra cases): {', '.join(missing)}")
        now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        progress = f"{finished} of {len(runs)}" if finished < len(runs) else f"{len(runs)}"
        lines = [
            "# FedAvg vs centralized by training budget (synthetic 3-site federation)",
            "",
            f"{now}, {device}, torch {torch.__version__}, {args.parallel} training(s) at once; "
            f"{args.size}³ volumes, {args.cases} cases per site ({counts} at site-1); "
            + (f"{len(previous)} trainings kept from earlier runs (--extend), " if previous else "")
            + (
                f"this run {progress} trainings in {(time.perf_counter() - started) / 60:.1f} min. "
                if runs
                else "this run trained nothing (table re-rendered from the kept results). "
            )
            + f"Test mean Dice over the 7 tissues on the {n_test} held-out cases "
            "of all sites; models chosen on validation Dice. "
            + (
                "FedAvg = the real NVFlare job in the simulator (`bench_fl.run_fl`; its best global model, "
                "`fetal_brain_best.pt`, chosen by the job's server on validation Dice)."
                if args.fedavg_via == "nvflare"
                else "FedAvg = the job's site code and weighted average without NVFlare (`bench_fl.run_local`)."
            ),
            "",
            *table(rows),
            "",
            *(
                [
                    f"All held-out = the {n_test} test cases above + {len(extra)} more subjects "
                    f"({args.extra_test} per site) from the same synthetic sites, never in the federation "
                    "(`--extra-test`, `fetalseg.data.federation.write_more_cases`): never trained on nor used to "
                    "choose a model. When both models of a pair were scored on them, the goal is judged on all "
                    "held-out cases; a row without them had no kept model.",
                    "",
                ]
                if extra
                else []
            ),
            f"Host: {platform.machine()}. Seconds are wall-clock with {args.parallel} trainings sharing the machine.",
            *(f"Note: {n}" for n in notes),
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(
            json.dumps({"args": vars(args), "notes": notes, "results": rows}, default=str, indent=1)
        )

    finished = 0
    pending = list(runs)
    active: list[tuple[dict[str, Any], subprocess.Popen]] = []
    while pending or active:
        while pending and len(active) < max(args.parallel, 1):
            run = pending.pop(0) | {"threads": args.threads}
            cmd = [sys.executable, __file__, "--one", json.dumps(run), "--work", str(work)]
            active.append((run, subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)))
        run, proc = active.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"training {run} failed (exit {proc.returncode})")
        r = json.loads(out.strip().splitlines()[-1])
        r["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        old = redone.get(_key(r))
        if old is not None:
            r["previous_dice"] = old["dice"]
            same = "reproduced" if abs(old["dice"] - r["dice"]) < 5e-5 else "NOT reproduced"
            notes.append(
                f"{run_name(r)} trained again (--redo, to keep its model): test Dice {old['dice']:.4f} before, "
                f"{r['dice']:.4f} now ({same}); the table shows the new run"
            )
        results.append(r)
        print(f"[bench_fl_schedule] {r['method']} {r['budget']} passes le={r['local_epochs']}: {r['dice']:.4f}")
        finished += 1
        save(finished)  # after every training: an interrupted run keeps what it measured (resume with --extend)
    if not runs:
        save(0)


if __name__ == "__main__":
    main()
