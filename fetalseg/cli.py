"""Core sub-commands of ``fetal-fl``: synthesize data, validate it, train/evaluate the centralized baseline."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_SIZE = 64


def register(subparsers: Any) -> None:
    """Add the core sub-commands to the ``fetal-fl`` parser."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic multi-site fetal brain federation (FeTA BIDS layout)",
        description="Write N site folders, each a FeTA-layout BIDS dataset of synthetic T2w phantoms with labels "
        "0..7 and per-site acquisition differences (contrast, noise, blur, spacing, orientation, age).",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create the site-1..site-N folders in")
    p.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    p.add_argument("--cases", type=int, default=8, help="cases per site (default 8)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="volume size in voxels per axis (256 = FeTA-like)")
    p.add_argument("--fov-mm", type=float, default=128.0, help="field of view in mm (128 at 256³ = 0.5 mm voxels)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same data)")
    p.add_argument("--overwrite", action="store_true", help="replace existing site folders")
    p.set_defaults(handler=_synth)

    p = subparsers.add_parser(
        "validate",
        help="check dataset folders (FeTA BIDS or image/label folders) before training",
        description="Check every image and label: readable, 3D, labels 0..7 on the image's grid. Lists all problems.",
    )
    p.add_argument("folders", nargs="+", type=Path, help="dataset folders (one per site)")
    p.add_argument("--allow-unlabelled", action="store_true", help="images without labels are not an error")
    p.set_defaults(handler=_validate)

    p = subparsers.add_parser(
        "train",
        help="train the centralized baseline (pooled sites) or a single-site model",
        description="Train the bundle's network on the training cases of the given sites and score it on the "
        "held-out cases of every site (per-tissue Dice and HD95). Writes metrics.json, metrics.md and a checkpoint.",
    )
    _add_data_args(p)
    p.add_argument("--out", type=Path, default=Path("runs/centralized"), help="folder for metrics and checkpoint")
    p.add_argument("--only-site", help="train on this site alone (single-site model); default: all sites pooled")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: train.json's max_epochs)")
    p.add_argument("--minutes", type=float, help="stop after this much training time")
    p.add_argument("--checkpoint", type=Path, help="where to write the model (default: <out>/model.pt)")
    p.add_argument("--install", action="store_true", help="also install the model as the bundle's models/model.pt")
    p.set_defaults(handler=_train)

    p = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint on the held-out cases of each site",
        description="Per-site × per-tissue Dice and HD95 of a checkpoint on every site's held-out cases.",
    )
    _add_data_args(p)
    p.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint (.pt)")
    p.add_argument("--out", type=Path, help="write metrics.json / metrics.md (and growth_qc.png, qc.json) here")
    p.add_argument(
        "--qc-plot",
        type=Path,
        help="draw predicted tissue volume vs gestational age against the published curve (PNG; default with "
        "--out: <out>/growth_qc.png); see docs/quality_control.md",
    )
    p.set_defaults(handler=_evaluate)

    p = subparsers.add_parser(
        "segment",
        help="segment one volume (NIfTI/NRRD) with a checkpoint",
        description="Segment one T2w volume; the label map is written on the input's own grid.",
    )
    p.add_argument("image", type=Path, help="input volume")
    p.add_argument("--checkpoint", type=Path, help="model checkpoint (default: the bundle's models/model.pt)")
    p.add_argument("--out", type=Path, required=True, help="output label file (.nii.gz)")
    p.add_argument("--variant", help="bundle variant overlay (tiny, feta)")
    p.set_defaults(handler=_segment)

    p = subparsers.add_parser(
        "bundle",
        help="show the model definition: labels, colours, patch size, variants, checkpoint",
        description="Print what the MONAI bundle defines (the project's single model definition).",
    )
    p.add_argument("--variant", help="bundle variant overlay (tiny, feta)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_bundle)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", nargs="+", type=Path, required=True, help="dataset folders, one per site")
    p.add_argument("--variant", help="bundle variant overlay: 'tiny' for 32³ test data, 'feta' for 256³ FeTA data")
    p.add_argument("--seed", type=int, default=0, help="seed for the split and training")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")


def _synth(args: argparse.Namespace) -> int:
    from fetalseg.data.federation import write_federation

    if args.sites < 1 or args.cases < 1:
        raise ValueError("--sites and --cases must be at least 1")
    if args.size < 16:
        raise ValueError("--size must be at least 16 voxels")
    sites = write_federation(
        args.out,
        n_sites=args.sites,
        cases_per_site=args.cases,
        shape=(args.size,) * 3,
        seed=args.seed,
        fov_mm=args.fov_mm,
        progress=True,
        overwrite=args.overwrite,
    )
    for site in sites:
        print(site)
    return 0


def _validate(args: argparse.Namespace) -> int:
    from fetalseg.data.loaders import load_dataset
    from fetalseg.data.validation import validate_cases

    failed = 0
    for folder in args.folders:
        try:
            cases = load_dataset(folder, validate=False)
        except ValueError as exc:
            print(f"FAIL {folder}: {exc}")
            failed += 1
            continue
        report = validate_cases(cases, require_labels=not args.allow_unlabelled)
        if report.ok:
            print(f"OK   {folder}: {report.checked} cases")
        else:
            failed += 1
            print(f"FAIL {folder}: {len(report.problems)} problem(s) in {report.checked} cases")
            for problem in report.problems:
                print(f"     - {problem}")
    return 1 if failed else 0


def _train(args: argparse.Namespace) -> int:
    from fetalseg.baseline import load_sites, train_and_evaluate, write_report
    from fetalseg.bundle import Bundle, save_checkpoint
    from fetalseg.metrics import format_table

    bundle = Bundle("train", variant=args.variant)
    splits = load_sites(args.data, seed=args.seed)
    sites = [args.only_site] if args.only_site else [s.site for s in splits]
    name = f"single-site ({args.only_site})" if args.only_site else "centralized"
    checkpoint = args.checkpoint or args.out / "model.pt"
    result = train_and_evaluate(
        splits,
        train_sites=sites,
        name=name,
        bundle=bundle,
        max_epochs=args.epochs,
        time_budget_s=args.minutes * 60 if args.minutes else None,
        checkpoint=checkpoint,
        seed=args.seed,
        progress=True,
        with_hd95=not args.no_hd95,
    )
    json_path, md_path = write_report(result, args.out)
    print(format_table(result.summary, metric="dice"))
    print(f"\nmetrics: {json_path}\ntable:   {md_path}\nmodel:   {checkpoint}")
    if args.install:
        from fetalseg.bundle import load_checkpoint

        net = bundle.network()
        info = load_checkpoint(net, checkpoint)
        save_checkpoint(net, bundle.checkpoint_path, **info)
        print(f"installed: {bundle.checkpoint_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fetalseg import qc
    from fetalseg.baseline import load_sites
    from fetalseg.bundle import Bundle, load_checkpoint
    from fetalseg.evaluation import evaluate_cases
    from fetalseg.metrics import format_table, summarize

    bundle = Bundle("common", variant=args.variant)
    net = bundle.network()
    load_checkpoint(net, args.checkpoint)
    splits = load_sites(args.data, seed=args.seed)
    test = [c for s in splits for c in s.test]
    for case in test:  # an absurd GA in participants.tsv is refused before any work
        qc.parse_ga(case.ga_weeks, source=f"{case.case_id} GA")
    points: list[qc.CasePoint] = []
    scores = evaluate_cases(net, test, bundle=bundle, with_hd95=not args.no_hd95, progress=True, qc_points=points)
    summary = summarize(scores)
    print(format_table(summary, metric="dice"))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "metrics.json").write_text(json.dumps({"summary": summary}, indent=2, default=float))
        (args.out / "metrics.md").write_text(format_table(summary) + "\n\n" + format_table(summary, metric="hd95"))
        checks = {
            p.case_id: qc.assess(p.volumes_ml, p.ga_weeks, ga_source="participants.tsv" if p.ga_weeks else None)
            for p in points
        }
        (args.out / "qc.json").write_text(json.dumps(checks, indent=2))
    plot = args.qc_plot or (args.out / "growth_qc.png" if args.out else None)
    if plot is not None:
        qc.plot_growth(points, plot, title=f"Predicted tissue volumes vs GA ({args.checkpoint.name})")
        flagged = sum(qc.assess(p.volumes_ml, p.ga_weeks)["flagged"] for p in points)
        print(f"growth chart: {plot} ({flagged} of {len(points)} case(s) flagged)")
    return 0


def _segment(args: argparse.Namespace) -> int:
    import numpy as np

    from fetalseg.bundle import Bundle, load_checkpoint
    from fetalseg.data.io import write_nifti
    from fetalseg.data.validation import load_checked_volume
    from fetalseg.inference import Segmenter

    load_checked_volume(args.image)
    bundle = Bundle("inference", variant=args.variant)  # the inference sliding-window defaults
    checkpoint = args.checkpoint or bundle.checkpoint_path
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint}; train one with 'fetal-fl train' or pass --checkpoint")
    net = bundle.network()
    load_checkpoint(net, checkpoint)
    seg = Segmenter(net, bundle=bundle).segment(args.image)
    write_nifti(seg.label, seg.affine, args.out, dtype=np.uint8)
    print(args.out)
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from fetalseg.bundle import Bundle, variants
    from fetalseg.labels import all_labels

    bundle = Bundle("train", variant=args.variant)
    net = bundle.network()
    info = {
        "bundle": str(bundle.root),
        "version": bundle.version,
        "variant": args.variant,
        "variants": variants(bundle.root),
        "network": type(net).__name__,
        "parameters": sum(p.numel() for p in net.parameters()),
        "pixdim_mm": list(bundle.pixdim),
        "patch_size": list(bundle.patch_size),
        "labels": [{"value": lab.value, "name": lab.display_name, "color": list(lab.color)} for lab in all_labels()],
        "checkpoint": str(bundle.checkpoint_path),
        "checkpoint_exists": bundle.checkpoint_path.is_file(),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key != "labels":
            print(f"{key:18s} {value}")
    print("labels:")
    for lab in info["labels"]:
        print(f"  {lab['value']}  {lab['name']:18s} rgb{tuple(lab['color'])}")
    return 0
