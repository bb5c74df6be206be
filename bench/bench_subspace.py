"""Capacity screen WITHOUT privacy: how much of non-private FedAvg's gain over the public model each small trained
subspace recovers (issue 24 item 2, the decision input for which weights a private federation trains).

Why: under patient-level DP the noise grows with the number of trained weights (≈√d) while the signal does not,
so a private federation must train a small set. Before paying for noise, this measures what each candidate set can
learn at all: the structural groups of ``fetalseg.subspace`` (norm, norm+bias, norm+bias+head), low-rank adapters
on every convolution (``lora:<r>``) and a gradient subspace estimated from PUBLIC data only (``pgrad:<k>``), each
against training every weight.

Set-up (as ``bench/bench_privacy_utility.py --starts public``): a synthetic federation of ``--sites`` sites of
``--cases`` volumes at ``--size``³ plus one more site whose cases are public (not in the federation, not scored);
the public model is pretrained non-privately on it (or loaded with ``--pretrained``). The pgrad basis is estimated
at the public model from ``--views`` augmented views (the bundle's train transforms) of every public case and
written next to the pretrained checkpoint with its provenance. FedAvg runs in one process with the client's code
path (``fetalseg.subspace.trainable_view`` → ``fetalseg.training.train_epoch`` → ``merge_back`` → average of the
bundle keys), the same rounds × steps for every subspace. The learning rate of each subspace is chosen on the
sites' VALIDATION cases (pooled mean Dice) from a small grid; the chosen model is then scored once on the held-out
TEST cases, which choose nothing.

Prints a Markdown table and writes bench/results/subspace_capacity.md (+ .json), rewritten after every run so an
interrupted screen keeps what it measured.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:  # run as a script from anywhere
        sys.path.insert(0, str(p))

from fedavg_in_process import fedavg_rounds, pretrain, score, set_lr  # noqa: E402
from monai.utils import set_determinism  # noqa: E402

from fetalseg.baseline import SiteSplit, split_site  # noqa: E402
from fetalseg.bundle import Bundle, load_checkpoint_file  # noqa: E402
from fetalseg.data.federation import write_federation  # noqa: E402
from fetalseg.data.loaders import load_dataset  # noqa: E402
from fetalseg.subspace import gradient_basis, load_basis, save_basis, trainable_view  # noqa: E402
from fetalseg.training import build_train_dataset, build_train_loader, train_epoch  # noqa: E402

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench_subspace")

# Learning-rate grid per subspace family (AdamW, the bundle's optimizer; bundle default 3e-3). Few weights or
# orthonormal-basis coefficients need larger steps than all weights: the grids are shifted accordingly.
DEFAULT_GRID = {
    "all": [3e-3],
    "norm": [1e-2, 3e-2],
    "norm+bias": [1e-2, 3e-2],
    "norm+bias+head": [1e-2, 3e-2],
    "lora": [3e-3, 1e-2],
    "pgrad": [1e-2, 3e-2, 1e-1],
}
DEFAULT_SPECS = ["all", "norm", "norm+bias", "norm+bias+head", "lora:4", "lora:8", "pgrad:16", "pgrad:64", "pgrad:256"]


def grid_for(spec: str, overrides: dict[str, list[float]]) -> list[float]:
    family = spec.split(":", 1)[0]
    return overrides.get(spec) or overrides.get(family) or DEFAULT_GRID.get(spec) or DEFAULT_GRID[family]


def fedavg(
    bundle: Bundle,
    splits: list[SiteSplit],
    datasets: dict[str, Any],
    *,
    spec: str,
    basis: dict | None,
    rounds: int,
    batch: int,
    lr: float,
    init_state: dict[str, torch.Tensor],
    seed: int,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """FedAvg training only ``spec``; sites send merged bundle keys (what ``SiteTrainer.weight_diff`` sends)."""
    set_determinism(seed=seed)
    global_state = {k: v.detach().clone() for k, v in init_state.items()}
    sites = []
    for split in splits:
        net = bundle.network()
        net.load_state_dict(global_state)
        view = trainable_view(net, spec, basis=basis, seed=seed)
        optimizer = bundle.optimizer(view.parameters())
        set_lr(optimizer, lr)
        loader = build_train_loader(bundle, dataset=datasets[split.site], batch_size=batch)
        sites.append((split, net, view, optimizer, loader, bundle.loss()))
    trained_keys = set(sites[0][2].names)
    losses: list[float] = []

    def local_update(i: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _, net, view, optimizer, loader, loss_fn = sites[i]
        net.load_state_dict(state)
        losses.append(train_epoch(view.module, loader, optimizer, loss_fn).loss)
        merged = view.merge_back()  # adapter folded into the bundle keys, reset to zero
        diff = {k: merged[k].detach() - state[k] for k in merged}  # what the site would send
        assert set(diff) == trained_keys
        return {k: state[k] + diff.get(k, 0.0) for k in state}

    weights = [len(split.train) for split, *_ in sites]
    global_state = fedavg_rounds(global_state, rounds=rounds, weights=weights, local_update=local_update)
    global_net = bundle.network()
    global_net.load_state_dict(global_state)
    global_net.eval()
    set_determinism(seed=None)
    view = sites[0][2]
    return global_net, {
        "trained_weights": view.n_trained,
        "sent_keys": len(view.names),
        "final_local_loss": sum(losses[-len(sites) :]) / len(sites),
    }


def estimate_basis(
    bundle: Bundle, init_state: dict, public: list, *, k: int, views: int, seed: int, provenance: dict
) -> dict:
    """Per-case gradients at the public model on ``views`` augmented views of every PUBLIC case, top-k directions."""
    set_determinism(seed=seed)
    net = bundle.network()
    net.load_state_dict(init_state)
    dataset = build_train_dataset(bundle, public)
    loss_fn = bundle.loss()

    def samples():
        for _ in range(views):
            for i in range(len(dataset)):
                item = dataset[i]
                item = item[0] if isinstance(item, list) else item  # crop transforms return a list of samples
                yield item["image"].unsqueeze(0), item["label"].unsqueeze(0)

    record = gradient_basis(net, loss_fn, samples(), k, seed=seed, provenance=provenance)
    set_determinism(seed=None)
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--cases", type=int, default=96, help="cases per site (split: 25 %% test, 20 %% of the rest val)")
    ap.add_argument("--public-cases", type=int, default=96)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pretrain-epochs", type=int, default=60)
    ap.add_argument(
        "--pretrained", type=Path, default=None, help="public checkpoint: loaded if it exists, else written"
    )
    ap.add_argument("--views", type=int, default=4, help="augmented views per public case for the pgrad basis")
    ap.add_argument("--specs", nargs="+", default=DEFAULT_SPECS)
    ap.add_argument("--grid", type=str, default="{}", help="JSON {spec or family: [lr, ...]} overriding the grids")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--max-minutes", type=float, default=60.0, help="skip the runs left after this much time")
    ap.add_argument("--out", type=Path, default=RESULTS / "subspace_capacity.md")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    grid_overrides = json.loads(args.grid)
    start = time.perf_counter()
    load_before = os.getloadavg()
    bundle = Bundle("train", overrides={"pixdim": [128.0 / args.size] * 3, "patch_size": [args.size] * 3})
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    context: dict[str, Any] = {}
    for seed in args.seeds:
        root = Path(tempfile.mkdtemp(prefix="subspace-"))
        dirs = write_federation(
            root, n_sites=args.sites + 1, cases_per_site=max(args.cases, args.public_cases), shape=(args.size,) * 3,
            seed=seed + 11,
        )  # fmt: skip
        splits = [split_site(load_dataset(d)[: args.cases], seed=seed) for d in dirs[: args.sites]]
        public = load_dataset(dirs[args.sites])[: args.public_cases]
        datasets = {s.site: build_train_dataset(bundle, s.train) for s in splits}
        ckpt = args.pretrained if args.pretrained is not None else root / f"public_seed{seed}.pt"
        if len(args.seeds) > 1 and args.pretrained is not None:
            ckpt = ckpt.with_name(f"{ckpt.stem}_seed{seed}{ckpt.suffix}")
        t = time.perf_counter()
        cached = ckpt.exists()
        if cached:
            init = load_checkpoint_file(ckpt)
        else:
            init = pretrain(bundle, public, epochs=args.pretrain_epochs, batch=args.batch, seed=seed)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            torch.save(init, ckpt)
        pretrain_min = (time.perf_counter() - t) / 60
        public_net = bundle.network()
        public_net.load_state_dict(init)
        public_net.eval()
        public_val, public_test = score(bundle, public_net, splits, "val"), score(bundle, public_net, splits, "test")
        print(f"seed {seed}: public model val {public_val['all']:.3f} test {public_test['all']:.3f}", file=sys.stderr)

        basis = None
        ks = [int(s.split(":")[1]) for s in args.specs if s.startswith("pgrad:")]
        basis_info: dict[str, Any] = {}
        if ks:
            basis_path = ckpt.with_suffix(".pgrad.pt")
            sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:16]
            if basis_path.exists() and load_basis(basis_path)["provenance"].get("checkpoint_sha256_prefix") == sha:
                basis = load_basis(basis_path)
            else:
                t = time.perf_counter()
                provenance = {
                    "checkpoint": ckpt.name,
                    "checkpoint_sha256_prefix": sha,
                    "data": f"public site only: {len(public)} cases × {args.views} augmented views (train transforms)",
                    "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
                    "epsilon_cost": 0.0,
                }
                basis = estimate_basis(
                    bundle, init, public, k=max(ks), views=args.views, seed=seed, provenance=provenance
                )
                basis["provenance"]["minutes"] = (time.perf_counter() - t) / 60
                save_basis(basis, basis_path)
            s = basis["singular_values"]
            basis_info = {
                "file": str(basis_path),
                "provenance": basis["provenance"],
                "singular_values_head": [round(x, 4) for x in s[:5]],
                "singular_value_k": {k: s[k - 1] for k in ks},
            }
        context[str(seed)] = {
            "public_val": public_val,
            "public_test": public_test,
            "checkpoint": str(ckpt),
            "checkpoint_cached": cached,
            "pretrain_minutes": pretrain_min,
            "n_train": [len(s.train) for s in splits],
            "n_val": [len(s.val) for s in splits],
            "n_test": [len(s.test) for s in splits],
            "basis": basis_info,
        }
        for spec in args.specs:
            tried = []
            for lr in grid_for(spec, grid_overrides):
                if (time.perf_counter() - start) / 60 > args.max_minutes:
                    skipped.append(f"seed {seed} {spec} lr {lr:g}")
                    continue
                t = time.perf_counter()
                net, info = fedavg(
                    bundle, splits, datasets, spec=spec, basis=basis, rounds=args.rounds, batch=args.batch, lr=lr,
                    init_state=init, seed=seed,
                )  # fmt: skip
                val = score(bundle, net, splits, "val")
                tried.append({"lr": lr, "val": val, "net": net, "minutes": (time.perf_counter() - t) / 60, **info})
                print(f"seed {seed} {spec} lr {lr:g}: val {val['all']:.4f}", file=sys.stderr, flush=True)
            if not tried:
                continue
            best = max(tried, key=lambda r: r["val"]["all"])
            test = score(bundle, best["net"], splits, "test")
            rows.append(
                {
                    "seed": seed,
                    "spec": spec,
                    "lr": best["lr"],
                    "lr_grid": {f"{r['lr']:g}": r["val"]["all"] for r in tried},
                    "val": best["val"],
                    "test": test,
                    "trained_weights": best["trained_weights"],
                    "sent_keys": best["sent_keys"],
                    "final_local_loss": best["final_local_loss"],
                    "minutes": sum(r["minutes"] for r in tried),
                }
            )
            print(f"seed {seed} {spec}: lr {best['lr']:g} test {test['all']:.4f}", file=sys.stderr, flush=True)
            write(args, rows, skipped, context, load_before, (time.perf_counter() - start) / 60)
    write(args, rows, skipped, context, load_before, (time.perf_counter() - start) / 60, final=True)


def _fraction(row: dict, ref: dict | None, public: dict, key: str) -> float:
    if ref is None:
        return float("nan")
    gain = ref["test"][key] - public[key]
    return (row["test"][key] - public[key]) / gain if abs(gain) > 1e-9 else float("nan")


def _mean_ci(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "–"
    m = sum(values) / len(values)
    if len(values) < 2:
        return f"{m:.3f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    from scipy import stats

    half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
    return f"{m:.3f} ± {half:.3f}"


def decide(rows: list[dict], context: dict, threshold: float = 0.8) -> str:
    """The smallest subspace (by trained weights) whose mean pooled gain fraction reaches ``threshold``."""
    specs = {r["spec"] for r in rows}
    fracs: dict[str, list[float]] = {}
    for spec in specs:
        for r in rows:
            if r["spec"] != spec:
                continue
            ref = next((x for x in rows if x["spec"] == "all" and x["seed"] == r["seed"]), None)
            fracs.setdefault(spec, []).append(_fraction(r, ref, context[str(r["seed"])]["public_test"], "all"))
    sizes = {r["spec"]: r["trained_weights"] for r in rows}
    ok = sorted(
        (s for s in fracs if s != "all" and fracs[s] and sum(fracs[s]) / len(fracs[s]) >= threshold),
        key=lambda s: sizes[s],
    )
    if "all" not in specs:
        return "no decision: the all-weights reference did not run"
    if not ok:
        best = max((s for s in fracs if s != "all"), key=lambda s: sum(fracs[s]) / len(fracs[s]), default=None)
        return f"no subspace reached {threshold:.0%} of the all-weights gain" + (
            f"; the best was {best} ({sum(fracs[best]) / len(fracs[best]):.0%})" if best else ""
        )
    s = ok[0]
    return (
        f"**{s}** ({sizes[s]:,} trained weights) is the smallest set reaching ≥{threshold:.0%} of the all-weights "
        f"gain over the public model (mean pooled fraction {sum(fracs[s]) / len(fracs[s]):.0%})"
    )


def write(args, rows, skipped, context, load_before, minutes, *, final: bool = False) -> None:
    seeds = sorted({r["seed"] for r in rows})
    sites = [k for k in (rows[0]["test"] if rows else {}) if k != "all"]
    first = context[str(args.seeds[0])]
    lines = [
        "# Subspace capacity screen (no privacy): which trained weights recover the all-weights FedAvg gain",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores (shared "
        f"machine; load average before/now {load_before[0]:.1f}/{os.getloadavg()[0]:.1f}); {minutes:.1f} min"
        f"{'' if final else ' so far (INCOMPLETE: the screen was still running)'}. Seeds: {seeds}. Command: "
        f"`OMP_NUM_THREADS=1 python bench/bench_subspace.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.sites} synthetic sites × {args.cases} cases at {args.size}³, split by `fetalseg.baseline.split_site`: "
        f"train {first['n_train']}, validation {first['n_val']} (choose the learning rate), held-out test "
        f"{first['n_test']} (scored once per subspace, choose nothing). Public model: {args.public_cases} cases of "
        f"one more synthetic site, {args.pretrain_epochs} epochs non-private (like `privacy_utility_public96`). "
        f"FedAvg in one process with the client's code path, {args.rounds} rounds × 1 local epoch × "
        f"ceil(N/{args.batch}) steps of batch {args.batch} per site, the bundle's AdamW; sites send the merged "
        "DIFF of the trained bundle keys only. No DP: this is the capacity of each subspace, not a private result.",
        "",
        "Fraction of gain = (Dice − public) / (Dice of all weights − public), held-out test cases, pooled (per site "
        "in its own columns). lora:r: ΔW = B·A on every convolution. pgrad:k: θ = θ0 + U·c with U the top-k "
        "directions of per-case gradients at the public model on public cases only "
        f"({args.views} augmented views each; costs no ε).",
        "",
    ]
    for seed in seeds:
        ctx = context[str(seed)]
        pub = ctx["public_test"]
        ref = next((r for r in rows if r["spec"] == "all" and r["seed"] == seed), None)
        lines += [
            f"## Seed {seed}" + (" (public checkpoint loaded from cache)" if ctx["checkpoint_cached"] else ""),
            "",
            f"Public model alone: test Dice {pub['all']:.3f} ("
            + ", ".join(f"{s} {pub[s]:.3f}" for s in sites)
            + f"); validation {ctx['public_val']['all']:.3f}.",
            "",
            "| trained | weights trained | lr (grid: val Dice) | val Dice | test Dice | "
            + " | ".join(sites)
            + " | fraction of gain | "
            + " | ".join(f"fraction {s}" for s in sites)
            + " | minutes |",
            "|---|---:|---|---:|---:|" + "---:|" * len(sites) + "---:|" + "---:|" * len(sites) + "---:|",
        ]
        for r in (r for r in rows if r["seed"] == seed):
            grid = ", ".join(f"{k}: {v:.3f}" for k, v in r["lr_grid"].items())
            lines.append(
                f"| {r['spec']} | {r['trained_weights']:,} | {r['lr']:g} ({grid}) | {r['val']['all']:.3f} | "
                f"{r['test']['all']:.3f} | "
                + " | ".join(f"{r['test'][s]:.3f}" for s in sites)
                + f" | {_fraction(r, ref, pub, 'all'):.2f} | "
                + " | ".join(f"{_fraction(r, ref, pub, s):.2f}" for s in sites)
                + f" | {r['minutes']:.1f} |"
            )
        if ctx["basis"]:
            b = ctx["basis"]
            lines += [
                "",
                f"pgrad basis: {b['provenance']['samples']} public gradient samples, singular values "
                f"{b['singular_values_head']} … (σ_k: "
                + ", ".join(f"k={k}: {v:.3g}" for k, v in b["singular_value_k"].items())
                + f"); provenance {json.dumps(b['provenance'])}",
            ]
        lines.append("")
    if len(seeds) > 1:
        lines += [
            "## Over seeds (mean ± 95 % t-interval)",
            "",
            "| trained | test Dice | fraction of gain |",
            "|---|---:|---:|",
        ]
        for spec in dict.fromkeys(r["spec"] for r in rows):
            mine = [r for r in rows if r["spec"] == spec]
            fr = []
            for r in mine:
                ref = next((x for x in rows if x["spec"] == "all" and x["seed"] == r["seed"]), None)
                fr.append(_fraction(r, ref, context[str(r["seed"])]["public_test"], "all"))
            lines.append(f"| {spec} | {_mean_ci([r['test']['all'] for r in mine])} | {_mean_ci(fr)} |")
        lines.append("")
    if skipped:
        lines += [f"Not run (over the {args.max_minutes:g}-minute budget): {', '.join(skipped)}.", ""]
    lines += ["## Decision", "", decide(rows, context) + ".", ""]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    record = {
        "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "complete": final,
        "args": {k: str(v) for k, v in vars(args).items()},
        "seeds": seeds,
        "context": context,
        "rows": rows,
        "skipped": skipped,
        "decision": decide(rows, context),
        "minutes": minutes,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    if final:
        print(text)


if __name__ == "__main__":
    main()
