"""Privacy–utility curve: held-out mean Dice of federated training with DP-SGD at several ε vs without privacy.

A synthetic federation (``--sites`` sites of ``--cases`` volumes at ``--size``³, the FeTA-layout phantoms) is split
per site with ``fetalseg.baseline.split_site`` (the split every other experiment uses): each site trains on its
*training* cases only and every model is scored on the same *held-out test* cases of every site.

Training is FedAvg run in one process (no NVFlare: its start-up would dominate at this size), with the code a
federated client runs: each site keeps its own network, optimizer and — for DP-SGD — one
``privacy.dpsgd.SitePrivacyEngine`` for the whole job (Poisson sampling, per-sample clipping, Gaussian noise,
accountant over every round); each round the sites start from the global weights, train ``--local-epochs`` passes,
and the server averages their weights (weighted by training cases). Every run takes the same number of steps:
rounds × local epochs × ceil(N / batch) per site. ε is per site, sample-level, for everything the site sent.

Two starting points: from scratch (random init) and "public pretraining": a non-private model trained first on
the cases of one more synthetic site with its own acquisition profile, which is treated as public data (it is not
part of the federation, its cases are not protected and not scored), then fine-tuned federatedly with or without
DP-SGD. The levers DP-SGD needs on this network (~0.6 M weights, ~20 cases per site) are set on the command line:
expected batch size (Poisson rate q = batch / N), learning rate, clip norm, public pretraining.

Prints a Markdown table and writes bench/results/privacy_utility.md (+ .json, + .png). Every number comes from
this run. Not covered by ε (said in the output too): the validation metrics a site reports, N, the hyper-parameters
chosen here (by looking at held-out Dice of earlier runs), side channels.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass
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
from fetalseg.bundle import Bundle, load_checkpoint_file, save_checkpoint  # noqa: E402
from fetalseg.data.federation import write_federation  # noqa: E402
from fetalseg.data.loaders import load_dataset  # noqa: E402
from fetalseg.training import build_train_dataset, build_train_loader, train_epoch  # noqa: E402
from privacy.dpsgd import NOT_COVERED, DPSGDConfig, SitePrivacyEngine  # noqa: E402

RESULTS = Path(__file__).parent / "results"
log = logging.getLogger("bench_privacy_utility")


@dataclass
class Site:
    """One site's training state for a whole federated job."""

    split: SiteSplit
    net: torch.nn.Module
    model: torch.nn.Module  # the DP-wrapped module, or net
    optimizer: torch.optim.Optimizer
    loader: Any
    loss_fn: Any
    engine: SitePrivacyEngine | None


# Which weights a fine-tuning run trains (MONAI UNet names: the up path is every ".2." sub-module).
TRAINABLE = {
    "all": lambda name: True,
    "decoder": lambda name: re.search(r"(^|\.)2\.\d", name) is not None,  # the up path (~39 % of the weights)
    "last-two-up": lambda name: name.startswith(("model.2.", "model.1.submodule.2.")),  # ~7 % of the weights
    # the input block (what meets a site's contrast and intensity profile first) and the output convolution:
    # ~2.6 k weights, where DP-SGD's noise norm (σ·C·√d) is ~15× smaller than on all ~0.6 M
    "input": lambda name: name.startswith("model.0."),
    "ends": lambda name: name.startswith(("model.0.", "model.2.1.")),
}


def _freeze(net: torch.nn.Module, which: str) -> int:
    """Freeze every weight outside ``TRAINABLE[which]`` (or a ``fetalseg.subspace`` spec such as
    ``norm+bias+head``); return how many weights stay trainable."""
    if which not in TRAINABLE:
        from fetalseg import subspace

        return sum(p.numel() for p in subspace.freeze_except(net, subspace.parameter_names(net, which)))
    keep = TRAINABLE[which]
    n = 0
    for name, p in net.named_parameters():
        p.requires_grad_(keep(name))
        n += p.numel() if p.requires_grad else 0
    return n


def fedavg(
    bundle: Bundle,
    splits: list[SiteSplit],
    datasets: dict[str, Any],
    *,
    rounds: int,
    local_epochs: int,
    batch: int,
    lr: float | None,
    dp: dict[str, Any] | None,
    init_state: dict[str, torch.Tensor] | None,
    seed: int,
    trainable: str = "all",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """FedAvg over ``splits`` (DP-SGD at every site when ``dp``); returns the global network and what happened."""
    set_determinism(seed=seed)
    global_net = bundle.network()
    if init_state is not None:
        global_net.load_state_dict(init_state)
    global_state = {k: v.detach().clone() for k, v in global_net.state_dict().items()}
    sites = []
    for split in splits:
        net = bundle.network()
        net.load_state_dict(global_state)
        n_trainable = _freeze(net, trainable)
        optimizer = bundle.optimizer([p for p in net.parameters() if p.requires_grad])
        set_lr(optimizer, lr)
        loader = build_train_loader(bundle, dataset=datasets[split.site], batch_size=batch)
        loss_fn = bundle.loss()
        model: torch.nn.Module = net
        engine = None
        if dp is not None:
            config = DPSGDConfig(**dp, planned_rounds=rounds, local_epochs=local_epochs)
            engine_batch = None if config.full_batch else batch  # DP-GD: every case in every step
            engine = SitePrivacyEngine(config=config, dataset_size=len(loader.dataset), batch_size=engine_batch)
            model, optimizer, loader = engine.make_private(model=net, optimizer=optimizer, data_loader=loader)
            loss_fn = engine.wrap_loss(loss_fn)
        sites.append(Site(split, net, model, optimizer, loader, loss_fn, engine))
    steps = [0] * len(sites)
    losses = []

    def local_update(i: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = sites[i]
        s.net.load_state_dict(state)
        for _ in range(local_epochs):
            stats = train_epoch(s.model, s.loader, s.optimizer, s.loss_fn)
            steps[i] += stats.steps
            losses.append(stats.loss)
        return {k: v.detach().clone() for k, v in s.net.state_dict().items()}

    def log_round(rnd: int) -> None:
        log.info("round %d: mean local loss %.4f", rnd, sum(losses[-len(sites) :]) / len(sites))

    weights = [len(s.split.train) for s in sites]
    global_state = fedavg_rounds(
        global_state, rounds=rounds, weights=weights, local_update=local_update, after_round=log_round
    )
    global_net.load_state_dict(global_state)
    global_net.eval()
    set_determinism(seed=None)
    reports = [s.engine.report() for s in sites if s.engine is not None]
    info: dict[str, Any] = {
        "batch_steps_per_site": steps,  # non-empty batches; DP also takes (accounted) noise-only steps
        "final_local_loss": sum(losses[-len(sites) :]) / len(sites),
        "trainable": trainable,
        "trainable_weights": n_trainable,
    }
    if reports:
        info.update(
            epsilon=max(r["epsilon"] for r in reports),
            noise_multiplier=reports[0]["noise_multiplier"],
            sample_rate=reports[0]["sample_rate"],
            dp_steps=reports[0]["steps"],
            empty_steps=sum(r["empty_steps"] for r in reports),
            noise_source=reports[0]["noise_source"],
        )
    return global_net, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3, help="sites of the federation")
    ap.add_argument("--cases", type=int, default=32, help="cases per site (split: 25 %% test, rest train/val)")
    ap.add_argument("--public-cases", type=int, default=24, help="cases of the public site (0: no pretraining)")
    ap.add_argument("--size", type=int, default=32, help="volume size in voxels (32: the tiny variant's geometry)")
    ap.add_argument("--rounds", type=int, default=10, help="FedAvg rounds (the same for every run)")
    ap.add_argument("--local-epochs", type=int, default=1, help="local passes per round")
    ap.add_argument("--batch", type=int, default=8, help="batch size; DP-SGD: expected batch of Poisson sampling")
    ap.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: the bundle's)")
    ap.add_argument("--dp-lr", type=float, default=None, help="learning rate of the DP-SGD runs (default: --lr)")
    ap.add_argument("--eps", type=float, nargs="+", default=[32.0, 8.0, 2.0], help="target ε per site")
    ap.add_argument("--delta", type=float, default=1e-5, help="δ per site (must be < 1/N; the project uses 1e-5)")
    ap.add_argument("--clip", type=float, default=1.0, help="per-sample gradient clip norm C")
    ap.add_argument("--pretrain-epochs", type=int, default=20, help="epochs on the public site")
    ap.add_argument(
        "--public-dr",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="public pretraining with the bundle's domain randomization (train.json domain_randomization); "
        "off by default: it lowered the public model's held-out Dice at 20-60 epochs "
        "(bench/results/public_pretraining.md)",
    )
    ap.add_argument("--starts", nargs="+", default=["public", "scratch"], choices=["scratch", "public"])
    ap.add_argument(
        "--finetune-weights",
        choices=sorted(TRAINABLE),
        default="all",
        help="weights trained after public pretraining, private and non-private alike (fewer weights: less noise)",
    )
    ap.add_argument(
        "--pretrained",
        type=Path,
        default=None,
        help="cache of the public pretraining: loaded if it exists (same --seed/--size/--public-cases/"
        "--pretrain-epochs assumed), else written after pretraining",
    )
    ap.add_argument("--skip-non-private", action="store_true", help="only the DP-SGD runs (e.g. to add an ε)")
    # small-N DP (issue 24): DP-GD, augmentation multiplicity, EMA, a structural subspace, the PRV accountant
    ap.add_argument("--full-batch", action="store_true", help="DP runs: full-batch DP-GD (every case every step, q=1)")
    ap.add_argument("--multiplicity", type=int, default=1, help="DP runs: K augmented views averaged per case")
    ap.add_argument("--ema", type=float, default=None, help="DP runs: EMA decay of the DP iterates (sent weights)")
    ap.add_argument(
        "--trained-parameters",
        default=None,
        help="fetalseg.subspace spec trained after public pretraining (e.g. norm+bias+head); overrides "
        "--finetune-weights",
    )
    ap.add_argument("--accountant", choices=["prv", "rdp"], default="prv", help="DP accountant (default prv)")
    ap.add_argument(
        "--clip-from-public",
        type=float,
        default=None,
        metavar="QUANTILE",
        help="set C to this quantile of per-case gradient norms on the PUBLIC cases at the public model "
        "(privacy.public_clip, same views and trained weights; costs no ε); overrides --clip",
    )
    ap.add_argument("--max-minutes", type=float, default=25.0, help="skip the runs left after this much time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--save-models",
        type=Path,
        default=None,
        help="write each run's global model here (<start>_<np|eps8>.pt), e.g. for bench/bench_site_models.py",
    )
    ap.add_argument("--out", type=Path, default=RESULTS / "privacy_utility.md")
    args = ap.parse_args()
    if args.trained_parameters is not None:
        args.finetune_weights = args.trained_parameters
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    load_before = os.getloadavg()
    start = time.perf_counter()
    bundle = Bundle("train", overrides={"pixdim": [128.0 / args.size] * 3, "patch_size": [args.size] * 3})
    root = Path(tempfile.mkdtemp(prefix="privacy-utility-"))
    n_written = args.sites + (1 if args.public_cases > 0 else 0)
    dirs = write_federation(
        root, n_sites=n_written, cases_per_site=max(args.cases, args.public_cases), shape=(args.size,) * 3,
        seed=args.seed + 11,
    )  # fmt: skip
    splits = [split_site(load_dataset(d)[: args.cases], seed=args.seed) for d in dirs[: args.sites]]
    public = load_dataset(dirs[args.sites])[: args.public_cases] if args.public_cases > 0 else []
    datasets = {s.site: build_train_dataset(bundle, s.train) for s in splits}
    n_train = [len(s.train) for s in splits]
    if args.delta >= 1.0 / max(n_train):
        raise SystemExit(f"--delta {args.delta} must be < 1/N = {1.0 / max(n_train):.3g}")
    print(
        f"federation: {args.sites} sites, train {n_train}, held-out test {[len(s.test) for s in splits]} cases; "
        f"public site: {len(public)} cases",
        file=sys.stderr,
        flush=True,
    )

    inits: dict[str, dict[str, torch.Tensor] | None] = {"scratch": None}
    pretrain_minutes = None
    pretrain_cached = False
    public_scores = None
    if "public" in args.starts:
        if not public:
            raise SystemExit("--starts public needs --public-cases > 0")
        t = time.perf_counter()
        pretrain_cached = args.pretrained is not None and args.pretrained.exists()
        if pretrain_cached:
            inits["public"] = load_checkpoint_file(args.pretrained)
        else:
            public_bundle = (
                Bundle("train", overrides={**bundle.overrides, "domain_randomization": True})
                if args.public_dr
                else bundle
            )
            inits["public"] = pretrain(
                public_bundle, public, epochs=args.pretrain_epochs, batch=args.batch, seed=args.seed
            )
            if args.pretrained is not None:
                torch.save(inits["public"], args.pretrained)
        pretrain_minutes = (time.perf_counter() - t) / 60
        net = bundle.network()
        net.load_state_dict(inits["public"])
        net.eval()
        public_scores = score(bundle, net, splits)
        print(f"public pretraining only: Dice {public_scores['all']:.3f}", file=sys.stderr, flush=True)
        if args.clip_from_public is not None:
            from privacy.public_clip import clip_from_public

            rec = clip_from_public(
                bundle, public, weights=inits["public"], trained_parameters=args.finetune_weights,
                views=args.multiplicity, quantile=args.clip_from_public, seed=args.seed,
            )  # fmt: skip
            args.clip = rec.max_grad_norm
            args.public_clip_norms = rec.norms
            print(f"clip from public: C = {args.clip:.4g} (quantile {args.clip_from_public:g})", file=sys.stderr)

    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    for start_name in args.starts:
        for eps in ([] if args.skip_non_private else [None]) + list(args.eps):
            name = f"{start_name}, " + ("non-private" if eps is None else f"DP-SGD target ε={eps:g}")
            if (time.perf_counter() - start) / 60 > args.max_minutes:
                skipped.append(name)
                continue
            dp = None
            if eps is not None:
                dp = {"target_epsilon": eps, "delta": args.delta, "max_grad_norm": args.clip}
                dp |= {"accountant": args.accountant, "full_batch": args.full_batch, "ema_decay": args.ema}
                dp |= {"augmentation_multiplicity": args.multiplicity}
            lr = args.dp_lr if (eps is not None and args.dp_lr is not None) else args.lr
            t = time.perf_counter()
            net, info = fedavg(
                bundle, splits, datasets, rounds=args.rounds, local_epochs=args.local_epochs, batch=args.batch,
                lr=lr, dp=dp, init_state=inits[start_name], seed=args.seed,
                trainable=args.finetune_weights if start_name == "public" else "all",
            )  # fmt: skip
            dice = score(bundle, net, splits)
            if args.save_models is not None:
                args.save_models.mkdir(parents=True, exist_ok=True)
                tag = "np" if eps is None else f"eps{eps:g}"
                save_checkpoint(net, args.save_models / f"{start_name}_{tag}.pt", run=name, **info)
            row = {
                "run": name,
                "start": start_name,
                "target_epsilon": eps,
                "lr": lr if lr is not None else bundle.get("learning_rate"),
                "dice": dice,
                "minutes": (time.perf_counter() - t) / 60,
                **info,
            }
            rows.append(row)
            print(
                f"{name}: Dice {dice['all']:.3f}, ε={row.get('epsilon', math.inf):.3g}, {row['minutes']:.1f} min",
                file=sys.stderr,
                flush=True,
            )

    total_min = (time.perf_counter() - start) / 60
    text = report(
        args, rows, skipped, splits, public, public_scores, pretrain_minutes, load_before, total_min, bundle,
        pretrain_cached=pretrain_cached,
    )  # fmt: skip
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    record = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
        "skipped": skipped,
        "public_pretraining_only": public_scores,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "minutes": total_min,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1, default=str))
    if rows:
        plot(rows, args, args.out.with_suffix(".png"))


def report(
    args,
    rows,
    skipped,
    splits,
    public,
    public_scores,
    pretrain_minutes,
    load_before,
    total_min,
    bundle,
    pretrain_cached=False,
):
    sites = [s.site for s in splits]
    n_train = [len(s.train) for s in splits]
    steps_per_epoch = [math.ceil(n / args.batch) for n in n_train]
    lines = [
        "# Privacy–utility: federated DP-SGD vs non-private FedAvg (synthetic federation, CPU)",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores; load average "
        f"before/after {load_before[0]:.1f}/{os.getloadavg()[0]:.1f} (shared machine); total {total_min:.1f} min. "
        f"Command: `python bench/bench_privacy_utility.py {' '.join(sys.argv[1:])}`",
        "",
        f"{args.sites} synthetic sites × {args.cases} cases at {args.size}³ ({bundle.get('pixdim')[0]:g} mm), split by "
        f"`fetalseg.baseline.split_site`: training cases per site {n_train}, held-out test cases "
        f"{[len(s.test) for s in splits]} (the same for every run; validation cases unused). FedAvg in one process "
        f"with the client's code path, {args.rounds} rounds × {args.local_epochs} local epoch(s) × "
        f"{steps_per_epoch} steps of batch {args.batch} per site — the same for every run (DP-SGD: Poisson "
        f"sampling with expected batch {args.batch}, q = 1/ceil(N/batch)). Optimizer: the bundle's AdamW, lr "
        f"{'bundle default' if args.lr is None else args.lr} "
        f"(DP-SGD runs: {args.dp_lr if args.dp_lr is not None else 'same'}); clip C = {args.clip:.4g}"
        + (
            f" (quantile {args.clip_from_public:g} of the public cases' per-case gradient norms at the public model, "
            f"privacy.public_clip)"
            if args.clip_from_public is not None
            else ""
        )
        + "; "
        f"δ = {args.delta:g} per site.",
        "",
        f"ε: sample-level DP per site, for every weight update the site sent in the job ({args.accountant.upper()} "
        "accountant). "
        + (
            f"DP runs: full-batch DP-GD (every training case in every step, q = 1, {args.rounds} × "
            f"{args.local_epochs} steps per site), {args.multiplicity} augmented view(s) per case averaged before "
            f"clipping, EMA of the DP iterates {args.ema if args.ema is not None else 'off'} (the sites send it; "
            "post-processing). "
            if args.full_batch
            else ""
        )
        + f"{NOT_COVERED}. Mean Dice: the 7 tissues, held-out cases of all sites pooled (per site in the next "
        "columns).",
    ]
    if public:
        lines += [
            "",
            f"Public pretraining: {len(public)} cases of one more synthetic site with its own acquisition profile "
            f"(not in the federation, not protected, not scored), {args.pretrain_epochs} epochs non-private"
            f"{' with domain randomization' if args.public_dr else ''} "
            f"({'loaded from ' + str(args.pretrained) if pretrain_cached else f'{pretrain_minutes:.1f} min'}); "
            f"the federated runs from it train "
            f"{'every weight' if args.finetune_weights == 'all' else 'only the ' + args.finetune_weights + ' weights'}"
            f" ({next((r['trainable_weights'] for r in rows if r['start'] == 'public'), 0):,} of "
            f"{sum(p.numel() for p in bundle.network().parameters()):,})"
            + (
                f"; that model alone scores Dice {public_scores['all']:.3f} on the held-out cases."
                if public_scores
                else "."
            ),
        ]
    lines += [
        "",
        "| run | ε per site (δ) | σ | mean Dice | " + " | ".join(sites) + " | Δ vs non-private, same start | minutes |",
        "|---|---:|---:|---:|" + "---:|" * len(sites) + "---:|---:|",
    ]
    base = {r["start"]: r["dice"]["all"] for r in rows if r["target_epsilon"] is None}
    for r in rows:
        eps = "∞ (non-private)" if r["target_epsilon"] is None else f"{r['epsilon']:.2f} ({args.delta:g})"
        sigma = "0" if r["target_epsilon"] is None else f"{r['noise_multiplier']:.2f}"
        delta = (
            "–"
            if r["start"] not in base or r["target_epsilon"] is None
            else f"{r['dice']['all'] - base[r['start']]:+.3f}"
        )
        per_site = " | ".join(f"{r['dice'][s]:.3f}" for s in sites)
        lines.append(
            f"| {r['run']} | {eps} | {sigma} | {r['dice']['all']:.3f} | {per_site} | {delta} | {r['minutes']:.1f} |"
        )
    if skipped:
        lines += ["", f"Not run (over the {args.max_minutes:g}-minute budget): {', '.join(skipped)}."]
    lines += [
        "",
        "Goal (issue 4): mean Dice at ε ≤ 8 within 0.05 of non-private FedAvg. Noise: "
        + (rows[-1].get("noise_source") or next((r["noise_source"] for r in rows if r.get("noise_source")), "n/a"))
        + ".",
    ]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = {"scratch": "tab:red", "public": "tab:blue"}
    labels = {"scratch": "from scratch", "public": "public pretraining + federated fine-tuning"}
    for start_name in args.starts:
        mine = [r for r in rows if r["start"] == start_name]
        dp = sorted((r["epsilon"], r["dice"]["all"]) for r in mine if r["target_epsilon"] is not None)
        c = colours.get(start_name, "k")
        if dp:
            ax.plot([e for e, _ in dp], [d for _, d in dp], "o-", color=c, label=f"DP-SGD, {labels[start_name]}")
        for r in mine:
            if r["target_epsilon"] is None:
                ax.axhline(r["dice"]["all"], color=c, ls="--", label=f"non-private, {labels[start_name]}")
    ax.set_xscale("log")
    ax.set_xlabel(f"ε per site (sample-level, δ = {args.delta:g})")
    ax.set_ylabel("held-out mean Dice (7 tissues)")
    ax.set_ylim(0, 1)
    ax.set_title(f"FedAvg, {args.sites} synthetic sites, {args.size}³, {args.rounds} rounds, batch {args.batch}")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
