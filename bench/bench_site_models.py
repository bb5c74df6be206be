"""The model each site serves: DP global + the site's local part, against FedAvg and against the site alone.

Issue 24's second goal asks whether the model a site's radiologists use — the federated DP global model plus a
local part the site fine-tunes on its own cases without DP and never sends — is within 0.02 of non-private FedAvg on
that site's held-out cases, and better than the site training alone. This script answers it on the synthetic
federation of ``bench/bench_privacy_utility.py`` (same generator, same ``--seed``, same split), from global models
that script wrote with ``--save-models``:

* ``public``: the public model alone (no site data);
* for every ``--global NAME=PATH``: that global model as the federation made it, and that model + the site's local
  part (``--local-parameters``, default the demo's ``norm+bias+head``) fine-tuned on the site's training cases;
* ``site alone``: the site fine-tunes from the public model on its own training cases, (a) only the local part and
  (b) every weight — what a hospital gets without joining the federation.

Every fine-tune keeps the epoch (0 included: the starting model) that scores best on the site's own validation
cases, as the NVFlare client's ``fine_tune_local`` does; every model is scored once on the site's held-out test
cases. Prints a Markdown table, writes bench/results/site_models.md (+ .json). Only what this run measured is in it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monai.utils import set_determinism

from fetalseg import subspace
from fetalseg.baseline import SiteSplit, split_site
from fetalseg.bundle import Bundle, load_checkpoint_file
from fetalseg.data.federation import write_federation
from fetalseg.data.loaders import load_dataset
from fetalseg.evaluation import evaluate_cases
from fetalseg.metrics import nanmean
from fetalseg.training import build_train_dataset, build_train_loader, train_epoch

RESULTS = Path(__file__).resolve().parent / "results"


def mean_dice(bundle: Bundle, net: torch.nn.Module, cases: list) -> tuple[float, list[float]]:
    """Mean Dice (7 tissues) over ``cases`` and the per-case values (for pooling across sites)."""
    net.eval()
    per_case = [c.mean_dice for c in evaluate_cases(net, cases, bundle=bundle, with_hd95=False)]
    return nanmean(per_case), per_case


def fine_tune(
    bundle: Bundle,
    start: dict[str, torch.Tensor],
    split: SiteSplit,
    dataset: Any,
    *,
    trained: str,
    epochs: int,
    batch: int,
    val_every: int,
    seed: int,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Fine-tune ``trained`` (a ``fetalseg.subspace`` spec) from ``start`` on the site's training cases, without DP;
    keep the epoch (0 = ``start``) that scores best on the site's validation cases."""
    set_determinism(seed=seed)
    net = bundle.network()
    net.load_state_dict(start)
    params = subspace.freeze_except(net, subspace.parameter_names(net, trained))
    optimizer = bundle.optimizer(params)
    loader = build_train_loader(bundle, dataset=dataset, batch_size=batch)
    loss_fn = bundle.loss()
    best_dice, _ = mean_dice(bundle, net, split.val)
    best_epoch, best = 0, {k: v.detach().clone() for k, v in net.state_dict().items()}
    for epoch in range(1, epochs + 1):
        net.train()
        train_epoch(net, loader, optimizer, loss_fn)
        if epoch % val_every == 0 or epoch == epochs:
            dice, _ = mean_dice(bundle, net, split.val)
            if dice > best_dice:
                best_dice, best_epoch = dice, epoch
                best = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best)
    set_determinism(seed=None)
    return net, {"epoch_selected": best_epoch, "val_dice": best_dice, "weights_trained": sum(p.numel() for p in params)}


def parse_global(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--global takes NAME=PATH, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--global {name}: no file {path}")
    return name, Path(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--cases", type=int, default=96, help="cases per site (as bench_privacy_utility --cases)")
    ap.add_argument("--public-cases", type=int, default=96, help="as bench_privacy_utility --public-cases")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0, help="the federation's seed (as bench_privacy_utility --seed)")
    ap.add_argument(
        "--public", type=Path, default=None,
        help="the public model (bench_privacy_utility --pretrained); without it: pretrained here (--pretrain-epochs)",
    )  # fmt: skip
    ap.add_argument("--pretrain-epochs", type=int, default=60, help="public pretraining when --public is not given")
    ap.add_argument(
        "--fedavg", default=None, help="the --global NAME that is non-private FedAvg (the goal's yardstick)"
    )
    ap.add_argument("--global", dest="globals", type=parse_global, action="append", default=[], metavar="NAME=PATH")
    ap.add_argument("--local-parameters", default=None, help="the local part (default: the demo's)")
    ap.add_argument("--local-epochs", type=int, default=20, help="local-part fine-tune epochs (the demo: 20)")
    ap.add_argument("--alone-epochs", type=int, default=20, help="site alone, every weight: epochs")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=2)
    ap.add_argument("--no-alone-all", action="store_true", help="skip the site-alone every-weight fine-tune")
    ap.add_argument("--out", type=Path, default=RESULTS / "site_models.md")
    args = ap.parse_args()
    if args.local_parameters is None:
        from fetal_fl.demo import LOCAL_PARAMETERS

        args.local_parameters = LOCAL_PARAMETERS
    subspace.validate_spec(args.local_parameters)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    bundle = Bundle("train", overrides={"pixdim": [128.0 / args.size] * 3, "patch_size": [args.size] * 3})
    root = Path(tempfile.mkdtemp(prefix="site-models-"))
    dirs = write_federation(
        root,
        n_sites=args.sites + 1,
        cases_per_site=max(args.cases, args.public_cases),
        shape=(args.size,) * 3,
        seed=args.seed + 11,
    )  # fmt: skip  (the generator call of bench_privacy_utility: the same federation for the same --seed)
    splits = [split_site(load_dataset(d)[: args.cases], seed=args.seed) for d in dirs[: args.sites]]
    datasets = {s.site: build_train_dataset(bundle, s.train) for s in splits}
    if args.public is not None:
        public = load_checkpoint_file(args.public)
    else:  # the public site is the federation's next one (bench_privacy_utility's layout)
        from fedavg_in_process import pretrain

        public_cases = load_dataset(dirs[args.sites])[: args.public_cases]
        public = pretrain(bundle, public_cases, epochs=args.pretrain_epochs, batch=args.batch, seed=args.seed)
    if args.fedavg is not None and args.fedavg not in dict(args.globals):
        ap.error(f"--fedavg {args.fedavg!r} is not one of the --global names")
    starts = {"public": public} | {name: load_checkpoint_file(path) for name, path in args.globals}

    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, site: str, net: torch.nn.Module, split: SiteSplit, **info: Any) -> None:
        dice, per_case = mean_dice(bundle, net, split.test)
        row = rows.setdefault(name, {"run": name, "sites": {}, "per_case": []})
        row["sites"][site] = {"dice": dice, **info}
        row["per_case"].extend(per_case)
        print(f"{name} @ {site}: test Dice {dice:.3f} {info}", file=sys.stderr, flush=True)

    for i, split in enumerate(splits):
        for name, state in starts.items():
            net = bundle.network()
            net.load_state_dict(state)
            record(name if name == "public" else f"{name} (global only)", split.site, net, split)
            t = time.perf_counter()
            label = "site alone: local part from public" if name == "public" else f"{name} + local part"
            net, info = fine_tune(
                bundle, state, split, datasets[split.site], trained=args.local_parameters, epochs=args.local_epochs,
                batch=args.batch, val_every=args.val_every, seed=args.seed + i,
            )  # fmt: skip
            record(label, split.site, net, split, minutes=(time.perf_counter() - t) / 60, **info)
        if not args.no_alone_all:
            t = time.perf_counter()
            net, info = fine_tune(
                bundle, public, split, datasets[split.site], trained="all", epochs=args.alone_epochs,
                batch=args.batch, val_every=args.val_every, seed=args.seed + i,
            )  # fmt: skip
            record("site alone: every weight from public", split.site, net, split, **info,
                   minutes=(time.perf_counter() - t) / 60)  # fmt: skip

    for row in rows.values():
        row["pooled"] = nanmean(row.pop("per_case"))
    minutes = (time.perf_counter() - t0) / 60
    text = report(args, splits, list(rows.values()), load_before, minutes)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    record_json = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": list(rows.values()),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "minutes": minutes,
    }
    args.out.with_suffix(".json").write_text(json.dumps(record_json, indent=1, default=str))


def report(args: argparse.Namespace, splits: list[SiteSplit], rows: list[dict], load_before, minutes: float) -> str:
    sites = [s.site for s in splits]
    cmd = " ".join(["python", "bench/bench_site_models.py", *sys.argv[1:]])
    lines = [
        "# The model each site serves: DP global + local part vs FedAvg vs the site alone",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores; load average "
        f"before/after {load_before[0]:.1f}/{os.getloadavg()[0]:.1f} (shared machine); {minutes:.1f} min. "
        f"Command: `{cmd}`",
        "",
        f"{args.sites} synthetic sites × {args.cases} cases at {args.size}³ (bench_privacy_utility's generator and "
        f"`fetalseg.baseline.split_site`, seed {args.seed}): training {[len(s.train) for s in splits]}, validation "
        f"{[len(s.val) for s in splits]} (picks the fine-tune epoch, 0 included), held-out test "
        f"{[len(s.test) for s in splits]} (scored once). Local part: `{args.local_parameters}`, fine-tuned without "
        f"DP for ≤ {args.local_epochs} epochs on the site's own training cases (never sent: it protects nothing and "
        f"needs no ε because it stays in the hospital). Site alone, every weight: ≤ {args.alone_epochs} epochs from "
        "the public model"
        + (f" ({args.public})" if args.public else f" (pretrained here: {args.pretrain_epochs} epochs)")
        + ". Global models: "
        + (", ".join(f"`{n}` = {p}" for n, p in args.globals) or "none")
        + (f"; non-private FedAvg is `{args.fedavg}`" if args.fedavg else "")
        + ". One seed: no interval.",
        "",
        "| model | pooled | " + " | ".join(sites) + " |",
        "|---|---:|" + "---:|" * len(sites),
    ]
    for row in rows:
        cells = [f"{row['sites'][s]['dice']:.3f}" if s in row["sites"] else "–" for s in sites]
        lines.append(f"| {row['run']} | {row['pooled']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
