"""Public model alone, before and after domain randomization: held-out Dice on the federation's sites.

The federation's public model is trained on one more synthetic site (its own acquisition profile) and must then
serve sites it has never seen. Domain randomization (``train.json``: ``domain_randomization`` and
``domain_randomization_transforms``, SynthSeg-style: per-tissue contrast remap, blur, low resolution, bias field,
gamma, Rician noise) costs no privacy budget; this measures what it buys. Each run trains the public model with
the same public cases, epochs and seed twice — plain augmentation (before) and with domain randomization (after)
— and scores both on every site's held-out test cases (per site and pooled; mean Dice over the 7 tissues).

Two settings:
- ``demo``: exactly the demo's public pretraining (``fetal_fl.demo.pretrain_public``: the public site is the
  federation's next site profile, ``public_cases`` cases, ``public_epochs`` epochs, best epoch by validation),
  the demo's federation (``write_federation`` + ``load_sites``, ``--demo-size``³, ``--demo-cases`` per site).
- ``large``: a larger public set as ``bench_privacy_utility.py --public-cases 96`` (its ``pretrain``: all
  public cases train, fixed epochs, batch ``--batch``), scored on the 3 sites' held-out cases (``score``).

Each (setting, seed, arm) is stored as soon as it finishes in bench/results/public_pretraining.json (several
processes may run different settings or seeds at once: the file is updated under a lock), and
bench/results/public_pretraining.md is rewritten from every stored run: mean and 95% t-interval over seeds, and
the paired difference after − before per seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
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

from bench_privacy_utility import pretrain, score  # noqa: E402

from fetal_fl.demo import SIZES, pretrain_public  # noqa: E402
from fetalseg.baseline import load_sites, split_site  # noqa: E402
from fetalseg.bundle import Bundle, load_checkpoint  # noqa: E402
from fetalseg.data.federation import site_seed, write_federation, write_site  # noqa: E402
from fetalseg.data.loaders import load_dataset  # noqa: E402
from fetalseg.data.phantom import site_profiles  # noqa: E402
from fetalseg.plumbing import atomic_write_text, file_lock  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ARMS = {False: "before (plain augmentation)", True: "after (domain randomization)"}
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_demo(args: argparse.Namespace, seed: int, dr: bool, work: Path) -> dict[str, Any]:
    """The demo's public pretraining on the demo's federation (its public site: the next profile)."""
    size = dataclasses.replace(
        SIZES["default"], shape=args.demo_size, cases=args.demo_cases, public_cases=args.demo_public_cases,
        public_epochs=args.demo_epochs,
    )  # fmt: skip
    variant = None if args.demo_size == 64 else "tiny" if args.demo_size == 32 else None
    overrides = {} if args.demo_size in (32, 64) else {"pixdim": [128.0 / args.demo_size] * 3}
    bundle = Bundle("train", variant=variant, overrides={**overrides, **(args.dr_overrides if dr else {})})
    sites = write_federation(
        work / "data", n_sites=args.sites, cases_per_site=args.demo_cases, shape=(args.demo_size,) * 3, seed=seed,
        overwrite=True,
    )  # fmt: skip
    splits = load_sites(sites, seed=seed)
    t0 = time.perf_counter()
    public = pretrain_public(size, work, n_sites=args.sites, seed=seed, bundle=bundle, domain_randomization=dr)
    seconds = time.perf_counter() - t0
    net = bundle.network()
    info = load_checkpoint(net, public.checkpoint)
    net.eval()
    return {
        "dice": score(bundle, net, splits),
        "train_seconds": seconds,
        "best_epoch": info.get("epoch"),
        "val_mean_dice": info.get("val_mean_dice"),
        "public_profile": public.site,
        "held_out": {s.site: len(s.test) for s in splits},
        "settings": {
            "size": args.demo_size, "cases_per_site": args.demo_cases, "public_cases": args.demo_public_cases,
            "epochs": args.demo_epochs, "batch": bundle.get("batch_size"), "patch": list(bundle.patch_size),
            "pixdim": list(bundle.pixdim),
        },
    }  # fmt: skip


def run_large(args: argparse.Namespace, seed: int, dr: bool, work: Path) -> dict[str, Any]:
    """``bench_privacy_utility``'s public start: ``--large-public-cases`` public cases, fixed epochs."""
    overrides = {"pixdim": [128.0 / args.large_size] * 3, "patch_size": [args.large_size] * 3}
    bundle = Bundle("train", overrides=overrides)
    shape = (args.large_size,) * 3
    dirs = write_federation(work, n_sites=args.sites, cases_per_site=args.large_cases, shape=shape, seed=seed + 11)
    splits = [split_site(load_dataset(d), seed=seed) for d in dirs]
    # the public site exactly as bench_privacy_utility writes it (site index n_sites of the same federation seed)
    profile = site_profiles(args.sites + 1, seed=seed + 11)[args.sites]
    public_dir = write_site(
        work / f"site-{args.sites + 1}", profile, n_cases=args.large_public_cases, shape=shape,
        seed=site_seed(seed + 11, args.sites),
    )  # fmt: skip
    public = load_dataset(public_dir)
    dr_overrides = {**overrides, **args.dr_overrides, "domain_randomization": True}
    train_bundle = Bundle("train", overrides=dr_overrides) if dr else bundle
    t0 = time.perf_counter()
    state = pretrain(train_bundle, public, epochs=args.large_epochs, batch=args.batch, seed=seed)
    seconds = time.perf_counter() - t0
    net = bundle.network()
    net.load_state_dict(state)
    net.eval()
    return {
        "dice": score(bundle, net, splits),
        "train_seconds": seconds,
        "held_out": {s.site: len(s.test) for s in splits},
        "settings": {
            "size": args.large_size, "cases_per_site": args.large_cases, "public_cases": len(public),
            "epochs": args.large_epochs, "batch": args.batch, "patch": list(bundle.patch_size),
            "pixdim": list(bundle.pixdim),
        },
    }  # fmt: skip


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval (NaN half-width for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, T975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def fmt(values: list[float], *, signed: bool = False) -> str:
    mean, half = interval(values)
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text if math.isnan(half) else f"{text} ± {half:.3f}"


def store(path: Path, key: str | None, record: dict[str, Any] | None, note: str = "") -> dict[str, Any]:
    """Add one run (and the note, if any) to the result file under a lock; return every stored run."""
    with file_lock(path.with_suffix(".lock")):
        data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
        if key is not None:
            data["runs"][key] = record
        if note:
            data["note"] = note
        data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        data["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, torch threads 1"
        atomic_write_text(path, json.dumps(data, indent=1, default=str))
    return data


def report(data: dict[str, Any], note: str) -> str:
    runs = data["runs"].values()
    lines = [
        "# Public pretraining before and after domain randomization (public model alone, no site data)",
        "",
        f"Updated {data['updated']}; machine: {data['machine']} (shared with other workers: timings are loaded "
        "wall-clock). Produced by `bench/bench_public_pretraining.py` (commands below). Mean Dice: 7 tissues, "
        "every site's held-out test cases (per site, and pooled over all held-out cases); mean ± 95% t-interval "
        "over seeds; Δ: after − before on the same seed (paired).",
    ]
    if note:
        lines += ["", note]
    for setting in ("demo", "large"):
        rows = [r for r in runs if r["setting"] == setting]
        if not rows:
            continue
        seeds = sorted({r["seed"] for r in rows})
        paired = [s for s in seeds if {r["dr"] for r in rows if r["seed"] == s} == {False, True}]
        sites = sorted(rows[0]["dice"])
        sites = [s for s in sites if s != "all"] + ["all"]
        st = rows[0]["settings"]
        lines += [
            "",
            f"## {setting}: {st['size']}³ at {st['pixdim'][0]:g} mm, {st['public_cases']} public cases, "
            f"{st['epochs']} epochs, batch {st['batch']}, patch {st['patch'][0]}³; {st['cases_per_site']} cases per "
            f"site, held-out {rows[0]['held_out']}",
            "",
            f"Seeds: {seeds} (paired: {paired}). Commands: "
            + "; ".join(sorted({f"`{r['command'].split(' --note ')[0]}`" for r in rows})),
            "",
            "| public model | seeds | " + " | ".join("pooled" if s == "all" else s for s in sites) + " | train min |",
            "|---|---:|" + "---:|" * len(sites) + "---:|",
        ]
        arms = sorted({(r["dr"], r.get("dr_overrides", "")) for r in rows})
        by = {(r["seed"], r["dr"], r.get("dr_overrides", "")): r for r in rows}
        for dr, variant in arms:
            arm = [r for r in rows if (r["dr"], r.get("dr_overrides", "")) == (dr, variant)]
            cells = " | ".join(fmt([r["dice"][s] for r in arm]) for s in sites)
            minutes = fmt([r["train_seconds"] / 60 for r in arm])
            name = ARMS[dr] + (f", overrides `{variant}`" if variant else "")
            lines.append(f"| {name} | {len(arm)} | {cells} | {minutes} |")
        for dr, variant in arms:
            pair = [s for s in seeds if (s, False, "") in by and (s, dr, variant) in by]
            if not dr or not pair:
                continue
            cells = " | ".join(
                fmt([by[(s, dr, variant)]["dice"][k] - by[(s, False, "")]["dice"][k] for s in pair], signed=True)
                for k in sites
            )
            name = "Δ after − before (paired)" + (f", overrides `{variant}`" if variant else "")
            lines.append(f"| {name} | {len(pair)} | {cells} | |")
        lines += ["", "Per run (pooled Dice): " + "; ".join(
            f"seed {r['seed']} {ARMS[r['dr']]}{' ' + r['dr_overrides'] if r.get('dr_overrides') else ''}: "
            f"{r['dice']['all']:.3f}"
            for r in sorted(rows, key=lambda r: (r["seed"], r["dr"], r.get("dr_overrides", "")))
        ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", nargs="+", default=["demo", "large"], choices=["demo", "large"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--demo-size", type=int, default=64, help="the demo's 64³ (32: the tiny variant)")
    ap.add_argument("--demo-cases", type=int, default=SIZES["default"].cases)
    ap.add_argument("--demo-public-cases", type=int, default=SIZES["default"].public_cases)
    ap.add_argument("--demo-epochs", type=int, default=SIZES["default"].public_epochs)
    ap.add_argument("--large-size", type=int, default=32)
    ap.add_argument("--large-cases", type=int, default=96, help="cases per federation site (25 %% held out)")
    ap.add_argument("--large-public-cases", type=int, default=96)
    ap.add_argument("--large-epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8, help="batch of the large setting (bench_privacy_utility's)")
    ap.add_argument(
        "--dr-overrides",
        type=json.loads,
        default={},
        help="bundle overrides for the DR arm only, as JSON, e.g. '{\"domain_randomization_transforms#0#prob\": 0.3}'",
    )
    ap.add_argument("--note", default="", help="a line for the result file (e.g. what was reduced)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the stored runs")
    ap.add_argument("--out", type=Path, default=RESULTS / "public_pretraining.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out_json = args.out.with_suffix(".json")
    if args.report_only:
        data = json.loads(out_json.read_text())
    else:
        command = "python bench/bench_public_pretraining.py " + " ".join(sys.argv[1:])
        for setting in args.settings:
            for seed in args.seeds:
                for dr in [arm == "after" for arm in args.arms]:
                    t0 = time.perf_counter()
                    load = os.getloadavg()[0]
                    with tempfile.TemporaryDirectory(prefix=f"public-dr-{setting}-") as tmp:
                        fn = run_demo if setting == "demo" else run_large
                        record = fn(args, seed, dr, Path(tmp))
                    variant = json.dumps(args.dr_overrides, sort_keys=True) if dr and args.dr_overrides else ""
                    record.update(
                        setting=setting, seed=seed, dr=dr, dr_overrides=variant, command=command, load_before=load,
                        load_after=os.getloadavg()[0], total_seconds=time.perf_counter() - t0,
                        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    )  # fmt: skip
                    key = f"{setting}/seed{seed}/{'dr' + variant if dr else 'plain'}"
                    data = store(out_json, key, record, args.note)
                    print(
                        f"{setting} seed {seed} {ARMS[dr]}: pooled Dice {record['dice']['all']:.3f} "
                        f"{ {k: round(v, 3) for k, v in record['dice'].items()} } "
                        f"({record['train_seconds'] / 60:.1f} min training)",
                        flush=True,
                    )
    if args.note:
        data = store(out_json, None, None, args.note)
    text = report(data, data.get("note", ""))
    print(text)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
