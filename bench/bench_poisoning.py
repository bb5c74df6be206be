"""One poisoning site against FedAvg's mean and the robust aggregations of ``server.aggregation`` (issue 19 item 5).

Why: with secure aggregation off, the server sees every site's weight DIFF and can combine them robustly. This
benchmark trains the job's own site code (``SiteTrainer`` of ``nvflare_jobs.fetal_brain.client``, as
``bench_fl.run_local`` does: no NVFlare processes, so several runs fit in minutes) on a synthetic federation of
``--sites`` sites, and combines each round's DIFFs with ``nvflare_jobs.robust_aggregation.combine`` (the function
the job's ``RobustAggregator`` calls; ``mean`` is NVFlare's step-weighted FedAvg arithmetic), after
``clip_update`` when ``--clip`` is given. Each method is trained twice: every site honest ("clean"), and with the
last site poisoning ("attacked"): it trains honestly, then sends its DIFF sign-flipped (``flip``) or multiplied
(``scale``) and rescaled to L2 norm ``--attack-norm``, which stays below the job's ``max_update_norm`` (1000), so the
UpdateGuard does not catch it. Every training starts from the same warm model (``--pretrain-epochs`` epochs of
``fetalseg.training.fit`` on a separate synthetic "public" site, as a job's ``initial_checkpoint`` would: from
fresh weights a few rounds leave Dice near 0 with or without an attacker, which shows nothing). The final global
model is scored on the held-out test cases of the HONEST sites
(``fetalseg.evaluation``, mean foreground Dice). The reference is the clean run of FedAvg's mean (issue 19: "within
0.02 of the clean run"); every robust method is also trained without the attacker (what robustness costs when
nobody attacks; ``--clean mean`` skips that).

    python bench/bench_poisoning.py     # 10 sites, 32³, warm start + 6 trainings: ~5 min on 2 idle cores (58 loaded)
    python bench/bench_poisoning.py --clip 5 --out bench/results/poisoning_clip.md    # with norm bounding
    python bench/bench_poisoning.py --sites 5 --rounds 3 --methods mean,median      # a smoke run

Writes bench/results/poisoning.md (+ .json). Goal (issue 19): with one attacker of 10 sites the robust option's
Dice is within 0.02 of the clean run (and the mean's is not, or the attack is too weak to matter).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RESULTS = HERE / "results"
TINY = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}
GOAL = 0.02  # robust Dice with the attacker within this of the clean FedAvg run (issue 19)
MAX_UPDATE_NORM = 1000.0  # the job's default UpdateGuard limit: an attack above it would simply be rejected


def method_label(method: str, trim_fraction: float, clip: float | None) -> str:
    label = f"trimmed_mean({trim_fraction:g})" if method == "trimmed_mean" else method
    return label + (f" + clip {clip:g}" if clip is not None else "")


def poison(diff: dict[str, Any], kind: str, norm: float) -> dict[str, Any]:
    """The attacker's DIFF: its honest one, sign-flipped (``flip``) or not (``scale``), rescaled to L2 ``norm``."""
    current = math.sqrt(sum(float(v.double().pow(2).sum()) for v in diff.values()))
    scale = (norm / current if current > 0 else 0.0) * (-1.0 if kind == "flip" else 1.0)
    return {k: (v.double() * scale).to(v.dtype) for k, v in diff.items()}


def pretrain(public_root: Path, overrides: dict[str, Any], epochs: int, seed: int) -> dict[str, Any]:
    """The warm start: the job's network (``net.`` keys) fitted for ``epochs`` on the public site's cases (a fixed
    count, not a time budget, so the start does not depend on the machine's load)."""
    from fetalseg.baseline import split_site
    from fetalseg.bundle import Bundle
    from fetalseg.data.loaders import load_dataset
    from fetalseg.training import fit
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    split = split_site(load_dataset(public_root, site="public"), seed=seed)
    model = FetalBrainNet(overrides, init_seed=0)
    bundle = Bundle("train", overrides=overrides)
    _, result = fit(bundle, split.train, split.val or split.train, max_epochs=epochs,
                    network=model.net, seed=seed)  # fmt: skip
    print(
        f"[bench_poisoning] public pretraining: {result.epochs_run} epochs, best val Dice {result.best_mean_dice:.3f}"
    )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    cfg_dict: dict[str, Any],
    *,
    initial: dict[str, Any],
    method: str,
    trim_fraction: float,
    clip: float | None,
    attacker: str | None,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One federated training; returns the final global state and what happened (norms, clipping, seconds)."""
    import numpy as np
    import torch

    from nvflare_jobs.config import JobConfig
    from nvflare_jobs.fetal_brain.client import SiteTrainer
    from nvflare_jobs.robust_aggregation import clip_update, combine

    cfg = JobConfig.from_dict(cfg_dict)
    start = time.perf_counter()
    trainers = [SiteTrainer(cfg, site, job_id="bench_poisoning", device="cpu") for site in cfg.sites]
    state = {k: v.clone() for k, v in initial.items()}
    honest_norms, attack_norms, clipped = [], [], 0
    for _ in range(cfg.num_rounds):
        updates, weights = [], []
        for trainer in trainers:
            base = trainer.load_global(state)
            stats = trainer.train_round()
            diff = trainer.weight_diff(base)
            if trainer.site == attacker:
                diff = poison(diff, args.attack, args.attack_norm)
            update = {k: v.detach().cpu().numpy() for k, v in diff.items()}
            update, norm, scale = clip_update(update, clip)
            (attack_norms if trainer.site == attacker else honest_norms).append(norm)
            clipped += scale < 1.0
            updates.append(update)
            weights.append(stats.steps)
        aggregated = combine(updates, weights, method=method, trim_fraction=trim_fraction)
        state = {k: v + torch.as_tensor(np.asarray(aggregated[k])).to(v.dtype) if k in aggregated else v
                 for k, v in state.items()}  # fmt: skip
    info = {
        "seconds": time.perf_counter() - start,
        "honest_norm_median": float(np.median(honest_norms)),
        "attack_norm": float(np.median(attack_norms)) if attack_norms else None,
        "clipped_updates": int(clipped),
    }
    return state, info


def score(state: dict[str, Any], cases: list, overrides: dict[str, Any]) -> float:
    import torch

    from fetalseg.bundle import Bundle
    from fetalseg.evaluation import evaluate_cases
    from fetalseg.metrics import nanmean
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    model = FetalBrainNet(overrides, init_seed=None)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()})
    scores = evaluate_cases(model, cases, bundle=Bundle("common", overrides=overrides), with_hd95=False)
    return float(nanmean(s.mean_dice for s in scores))


def table(rows: list[dict[str, Any]], reference: float) -> list[str]:
    lines = [
        "| aggregation | Dice clean | Dice attacked | attacked − clean FedAvg | updates clipped | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        clean = f"{r['clean']:.3f}" if r.get("clean") is not None else "–"
        lines.append(
            f"| {r['label']} | {clean} | {r['attacked']:.3f} | {r['attacked'] - reference:+.3f} | "
            f"{r['clipped']} | {r['seconds'] / 60:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=10, help="sites in the federation; the last one attacks")
    parser.add_argument("--cases", type=int, default=4, help="cases per site (split train / validation / test)")
    parser.add_argument("--size", type=int, default=32, help="volume edge in voxels (the bundle at 4 mm for 32)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--methods", default="mean,trimmed_mean,median", help="comma-separated aggregations")
    parser.add_argument("--trim-fraction", type=float, default=0.1, help="for trimmed_mean (0.1 of 10 sites = 1)")
    parser.add_argument("--clip", type=float, default=None, help="clip_update_norm for every method (default none)")
    parser.add_argument("--attack", choices=["flip", "scale"], default="flip")
    parser.add_argument("--attack-norm", type=float, default=100.0, help=f"below the guard's {MAX_UPDATE_NORM:g}")
    parser.add_argument("--clean", choices=["mean", "all"], default="all", help="which methods also train clean")
    parser.add_argument("--pretrain-epochs", type=int, default=100, help="epochs of public warm-start training")
    parser.add_argument("--public-cases", type=int, default=8, help="cases of the public site")
    parser.add_argument("--seed", type=int, default=0, help="federation and split seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--work", type=Path, help="keep the synthetic federation here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS / "poisoning.md")
    args = parser.parse_args()
    if not 0 < args.attack_norm < MAX_UPDATE_NORM:
        parser.error(f"--attack-norm must be in (0, {MAX_UPDATE_NORM:g}): above it the UpdateGuard rejects the update")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "mean" not in methods:
        parser.error("--methods must include mean: its clean run is the reference")
    methods = ["mean", *(m for m in methods if m != "mean")]

    import torch

    torch.set_num_threads(args.threads)
    from fetalseg.baseline import split_site
    from fetalseg.data.federation import write_federation
    from fetalseg.data.loaders import load_dataset
    from nvflare_jobs.config import ENV_SITE_STATE, JobConfig

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_poisoning_"))
    os.environ[ENV_SITE_STATE] = str(work / "site_state")
    data_root = work / "federation"
    sites = [f"site-{i + 1}" for i in range(args.sites)]
    if not data_root.exists():
        shape = (args.size,) * 3
        write_federation(data_root, n_sites=args.sites, cases_per_site=args.cases, shape=shape, seed=args.seed)
    overrides = TINY if args.size == 32 else {"pixdim": [128.0 / args.size] * 3, "patch_size": [args.size] * 3}
    public_root = work / "public"
    if not public_root.exists():
        shape = (args.size,) * 3
        write_federation(public_root, n_sites=1, cases_per_site=args.public_cases, shape=shape, seed=args.seed + 101)
    attacker = sites[-1]
    held_out = [c for s in sites[:-1] for c in split_site(load_dataset(data_root / s, site=s), seed=args.seed).test]

    def config(method: str) -> dict[str, Any]:
        aggregation: dict[str, Any] = {"method": method}
        if method == "trimmed_mean":
            aggregation["trim_fraction"] = args.trim_fraction
        if args.clip is not None:
            aggregation["clip_update_norm"] = args.clip
        cfg = {
            "name": "bench_poisoning",
            "num_rounds": args.rounds,
            "min_clients": len(sites),
            "sites": sites,
            "bundle_overrides": overrides,
            "data": {"root": str(data_root), "split_seed": args.seed},
            "training": {"local_epochs": args.local_epochs, "seed": args.seed},
            "server": {"max_update_norm": MAX_UPDATE_NORM, "aggregation": aggregation},
            "cross_site_eval": False,
            "runtime": {"external_process": False, "init_seed": 0},
        }
        JobConfig.from_dict(cfg)  # the same validation a job export does (e.g. a trim that trims nobody)
        return cfg

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    warm = work / f"warm_start_{args.size}_{args.public_cases}cases_{args.pretrain_epochs}epochs_seed{args.seed}.pt"
    if args.pretrain_epochs > 0 and warm.exists():  # a --work folder keeps the warm start for the next run
        initial = torch.load(warm, weights_only=True)
    elif args.pretrain_epochs > 0:
        initial = pretrain(public_root / "site-1", overrides, args.pretrain_epochs, args.seed)
        torch.save(initial, warm)
    else:
        from nvflare_jobs.fetal_brain.model import FetalBrainNet

        initial = FetalBrainNet(overrides, init_seed=0).state_dict()
    initial_dice = score(initial, held_out, overrides)
    print(f"[bench_poisoning] initial (warm) model: Dice {initial_dice:.4f}", flush=True)
    rows: list[dict[str, Any]] = []
    for method in methods:
        cfg = config(method)
        label = method_label(method, args.trim_fraction, args.clip)
        row: dict[str, Any] = {"method": method, "label": label, "seconds": 0.0, "clean": None, "clipped": 0}
        runs = [("clean", None)] if method == "mean" or args.clean == "all" else []
        for kind, bad in [*runs, ("attacked", attacker)]:
            kwargs = {"method": method, "trim_fraction": args.trim_fraction if method == "trimmed_mean" else 0.0}
            state, info = train(cfg, initial=initial, clip=args.clip, attacker=bad, args=args, **kwargs)
            row[kind] = score(state, held_out, overrides)
            row["clipped"] += info["clipped_updates"]
            row[f"{kind}_info"] = info
            row["seconds"] += info["seconds"]
            print(f"[bench_poisoning] {label} {kind}: Dice {row[kind]:.4f} {info}", flush=True)
        rows.append(row)
    total_s = time.perf_counter() - started

    reference = rows[0]["clean"]  # FedAvg's mean without the attacker
    honest = rows[0]["clean_info"]["honest_norm_median"]
    lines = [
        "# Poisoning: one attacking site against FedAvg's mean and the robust aggregations",
        "",
        f"{args.sites} sites ({args.cases} synthetic cases each, {args.size}³), {args.rounds} rounds × "
        f"{args.local_epochs} local epoch(s), seed {args.seed}, from a warm start ({args.pretrain_epochs} epochs on "
        f"{args.public_cases} public cases; its Dice {initial_dice:.3f}). Attacker: {attacker} sends its honest DIFF "
        f"{'sign-flipped' if args.attack == 'flip' else 'scaled'} to L2 norm {args.attack_norm:g} every round (honest "
        f"updates: median norm {honest:.3g}; the guard's limit {MAX_UPDATE_NORM:g} lets it through). Dice: mean "
        f"foreground Dice of the final global model on the {len(held_out)} held-out test cases of the honest sites. "
        f"trimmed_mean drops floor(fraction × n) values per side per weight; median and trimmed_mean are unweighted, "
        f"mean is step-weighted (NVFlare's FedAvg). Updates clipped: all runs of the row, all rounds.",
        "",
        *table(rows, reference),
        "",
        f"Goal: a robust option's attacked Dice within {GOAL} of the clean FedAvg run. Site code without NVFlare "
        "(the aggregation functions are the job's); the simulator test "
        "`tests/nvflare_jobs/test_robust_aggregation.py` checks the same median inside a real NVFlare job.",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load {load_before:.1f} at start, {total_s / 60:.1f} min in all, torch threads "
        f"{args.threads}.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    result = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "attacker": attacker,
        "held_out_cases": len(held_out),
        "goal": GOAL,
        "reference": reference,
        "initial_dice": initial_dice,
        "rows": rows,
        "total_s": total_s,
        "load_at_start": load_before,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
