"""``fetal-fl privacy ...``: the site ledger (init, show, set-budget, check, release) and ε / noise calculators.

For site admins (who set and read budgets) and ML engineers (who pick the noise for a target ε).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from privacy.ledger import LedgerError, PrivacyBudgetExceeded, SiteLedger

ACCOUNTANTS = ("rdp", "prv")  # privacy.accounting.ACCOUNTANTS; imported lazily (Opacus is slow to import)

EXIT_ERROR = 2
EXIT_OVER_BUDGET = 1


def register(subparsers: Any) -> None:
    """Add ``privacy`` and its sub-commands to the ``fetal-fl`` parser."""
    p = subparsers.add_parser(
        "privacy",
        help="privacy ledger and ε calculators (DP-SGD per site)",
        description="Manage a site's privacy ledger (ε spent per dataset across jobs) and compute ε or noise for "
        "DP-SGD. See docs/privacy.md for what ε means here.",
    )
    sub = p.add_subparsers(dest="privacy_command", metavar="<privacy command>")
    p.set_defaults(handler=lambda args: _help(p))

    ledger = sub.add_parser(
        "ledger",
        help="the site's privacy ledger: init, show, set-budget, check, release",
        description="The ledger records the ε each dataset of this site has spent in every job; a job whose plan "
        "would exceed the budget is refused before training.",
    )
    lsub = ledger.add_subparsers(dest="ledger_command", metavar="<ledger command>")
    ledger.set_defaults(handler=lambda args: _help(ledger))

    q = lsub.add_parser(
        "init",
        help="create a new ledger with a default per-dataset budget (never overwrites)",
        description="Create the ledger file once, with the (ε, δ) budget every dataset of this site may spend over "
        "all jobs. Refuses if the file exists: spent ε is never reset.",
    )
    q.add_argument("path", type=Path, help="ledger file (JSON Lines), e.g. /secure/site-1/privacy_ledger.jsonl")
    q.add_argument("--epsilon", type=float, required=True, help="ε budget per dataset over all jobs (e.g. 10)")
    q.add_argument("--delta", type=float, required=True, help="δ budget per dataset over all jobs (e.g. 1e-4)")
    q.add_argument("--site", default="", help="site name shown in the ledger")
    q.set_defaults(handler=_ledger_init)

    q = lsub.add_parser(
        "show",
        help="print budget, spent, reserved and remaining ε per dataset, reservations, and each job's spend",
        description="Print the ledger as Markdown tables (or JSON with --json). Fails on a missing or corrupt file.",
    )
    q.add_argument("path", type=Path, help="ledger file")
    q.add_argument("--json", action="store_true", help="print the raw records as JSON instead of tables")
    q.set_defaults(handler=_ledger_show)

    q = lsub.add_parser(
        "set-budget",
        help="change one dataset's budget (appended with time and user; history is kept)",
        description="Set the (ε, δ) budget of one dataset. The change is appended to the ledger, never rewritten.",
    )
    q.add_argument("path", type=Path, help="ledger file")
    q.add_argument("--dataset", required=True, help="dataset id (as the jobs record it)")
    q.add_argument("--epsilon", type=float, required=True, help="new ε budget of that dataset")
    q.add_argument("--delta", type=float, required=True, help="new δ budget of that dataset")
    q.add_argument("--note", default="", help="why (kept in the ledger)")
    q.set_defaults(handler=_ledger_set_budget)

    q = lsub.add_parser(
        "check",
        help="would a job planning ε fit? (exit 0 yes, 1 no)",
        description="Check a planned ε against a dataset's remaining budget (budget − spent − reserved by "
        "running jobs) without recording or reserving anything.",
    )
    q.add_argument("path", type=Path, help="ledger file")
    q.add_argument("--dataset", required=True, help="dataset id")
    q.add_argument("--epsilon", type=float, required=True, help="planned ε of the job")
    q.add_argument("--delta", type=float, required=True, help="δ of the job")
    q.set_defaults(handler=_ledger_check)

    q = lsub.add_parser(
        "release",
        help="release a crashed job's reservation (its unspent ε; what it spent stays counted)",
        description="A job reserves its planned ε before training and releases the unspent part when it ends "
        "cleanly. A job that crashed keeps its reservation, which counts against the budget until an admin "
        "releases it here. Make sure the job is not running (see host and pid in `ledger show`): what a job "
        "spends after its release still counts, but it is no longer held for it.",
    )
    q.add_argument("path", type=Path, help="ledger file")
    q.add_argument("--dataset", required=True, help="dataset id of the reservation")
    q.add_argument("--job", required=True, help="job id of the reservation")
    q.add_argument("--note", default="", help="why (kept in the ledger)")
    q.set_defaults(handler=_ledger_release)

    q = sub.add_parser(
        "epsilon",
        help="ε of DP-SGD for a noise multiplier, sample rate and number of steps",
        description="ε after STEPS steps of the Poisson-subsampled Gaussian mechanism (Opacus's RDP or PRV).",
    )
    _add_mechanism_args(q)
    q.add_argument("--noise", type=float, required=True, help="noise multiplier σ (noise std ÷ clip norm)")
    q.set_defaults(handler=_epsilon)

    q = sub.add_parser(
        "noise",
        help="noise multiplier needed for a target ε",
        description="Smallest noise multiplier σ whose ε after STEPS steps is at most the target.",
    )
    _add_mechanism_args(q)
    q.add_argument("--target-epsilon", type=float, required=True, help="ε to reach at the end of the job")
    q.set_defaults(handler=_noise)

    q = sub.add_parser(
        "clip-from-public",
        help="recommended clip norm C from per-case gradient norms on PUBLIC cases (costs no ε)",
        description="Per-case gradient norms of the bundle loss at the public model, on public cases, over the "
        "parameters the job trains and with K augmented views averaged per case (as DP-SGD clips them); prints "
        "the chosen quantile (default the median) as the recommended max_grad_norm. Never run it on private cases.",
    )
    q.add_argument("public_dir", type=Path, help="folder of PUBLIC labelled cases (any layout load_dataset reads)")
    q.add_argument("--weights", type=Path, default=None, help="the public model's checkpoint (default: bundle init)")
    q.add_argument("--trained-parameters", default="all", help="parameter groups the job trains, e.g. norm+bias+head")
    q.add_argument("--multiplicity", type=int, default=1, help="augmented views averaged per case (K)")
    q.add_argument("--quantile", type=float, default=0.5, help="quantile of the per-case norms (default the median)")
    q.add_argument("--cases", type=int, default=None, help="use only the first N public cases")
    q.add_argument("--size", type=int, default=None, help="patch size in voxels (bundle override, e.g. 32 at 4 mm)")
    q.add_argument("--seed", type=int, default=0, help="seed of the random views (public data: reproducible)")
    q.add_argument("--json", action="store_true", help="print the norms and the recommendation as JSON")
    q.set_defaults(handler=_clip_from_public)

    from privacy.encrypted_inference.cli import register as register_private_infer

    register_private_infer(subparsers)  # `fetal-fl private-infer serve|segment|dealer`


def _add_mechanism_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--sample-rate", type=float, required=True, help="Poisson sample rate q = 1 / ceil(N / batch)")
    q.add_argument("--steps", type=int, required=True, help="DP steps in the whole job (rounds × epochs × 1/q)")
    q.add_argument("--delta", type=float, required=True, help="δ (well below 1/N)")
    q.add_argument("--accountant", choices=ACCOUNTANTS, default="prv", help="accountant (default prv)")


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_ERROR


def _fail(exc: Exception) -> int:
    print(f"fetal-fl privacy: error: {exc}", file=sys.stderr)
    return EXIT_ERROR


def _ledger_init(args: argparse.Namespace) -> int:
    try:
        ledger = SiteLedger.init(args.path, epsilon_budget=args.epsilon, delta_budget=args.delta, site=args.site)
    except (LedgerError, ValueError) as exc:
        return _fail(exc)
    print(ledger.format_table())
    return 0


def _ledger_show(args: argparse.Namespace) -> int:
    try:
        ledger = SiteLedger(args.path)
    except LedgerError as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(ledger.records, indent=1))
    else:
        print(ledger.format_table())
    return 0


def _ledger_set_budget(args: argparse.Namespace) -> int:
    try:
        ledger = SiteLedger(args.path)
        ledger.set_budget(dataset_id=args.dataset, epsilon_budget=args.epsilon, delta_budget=args.delta, note=args.note)
    except (LedgerError, ValueError) as exc:
        return _fail(exc)
    print(ledger.format_table())
    return 0


def _ledger_release(args: argparse.Namespace) -> int:
    try:
        ledger = SiteLedger(args.path)
        freed = ledger.release(job_id=args.job, dataset_id=args.dataset, admin=True, note=args.note)
    except (LedgerError, ValueError) as exc:
        return _fail(exc)
    print(f"released job {args.job}'s reservation on {args.dataset}: unspent ε={freed:.4g} given back")
    print(ledger.format_table())
    return 0


def _ledger_check(args: argparse.Namespace) -> int:
    try:
        ledger = SiteLedger(args.path)
        status = ledger.check_budget(dataset_id=args.dataset, planned_epsilon=args.epsilon, delta=args.delta)
    except PrivacyBudgetExceeded as exc:
        print(f"REFUSED: {exc}")
        return EXIT_OVER_BUDGET
    except (LedgerError, ValueError) as exc:
        return _fail(exc)
    print(
        f"OK: dataset {args.dataset} budget ε={status.budget.epsilon:.4g}, spent {status.spent.epsilon:.4g}, "
        f"reserved by running jobs {status.reserved_epsilon:.4g}, job plans {args.epsilon:.4g}, "
        f"left after the job {status.remaining_epsilon - args.epsilon:.4g}"
    )
    return 0


def _epsilon(args: argparse.Namespace) -> int:
    from privacy.accounting import epsilon

    try:
        eps = epsilon(
            noise_multiplier=args.noise,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
    except ValueError as exc:
        return _fail(exc)
    print(
        f"ε = {eps:.4f} (δ={args.delta:g}, σ={args.noise:g}, q={args.sample_rate:g}, {args.steps} steps, "
        f"{args.accountant}; sample-level DP, per site)"
    )
    return 0


def _noise(args: argparse.Namespace) -> int:
    from privacy.accounting import epsilon, noise_multiplier_for_epsilon

    try:
        sigma = noise_multiplier_for_epsilon(
            target_epsilon=args.target_epsilon,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
        eps = epsilon(
            noise_multiplier=sigma,
            sample_rate=args.sample_rate,
            steps=args.steps,
            delta=args.delta,
            accountant=args.accountant,
        )
    except ValueError as exc:
        return _fail(exc)
    print(
        f"σ = {sigma:.4f} gives ε = {eps:.4f} ≤ {args.target_epsilon:g} (δ={args.delta:g}, q={args.sample_rate:g}, "
        f"{args.steps} steps, {args.accountant})"
    )
    return 0


def _clip_from_public(args: argparse.Namespace) -> int:
    from fetalseg.bundle import Bundle, load_checkpoint_file
    from fetalseg.data.loaders import load_dataset
    from privacy.public_clip import clip_from_public

    try:
        overrides = {} if args.size is None else {"pixdim": [128.0 / args.size] * 3, "patch_size": [args.size] * 3}
        bundle = Bundle("train", overrides=overrides)
        cases = load_dataset(args.public_dir)[: args.cases]
        weights = None
        if args.weights is not None:
            ckpt = load_checkpoint_file(args.weights)
            weights = ckpt["model"] if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) else ckpt
        rec = clip_from_public(
            bundle,
            cases,
            weights=weights,
            trained_parameters=args.trained_parameters,
            views=args.multiplicity,
            quantile=args.quantile,
            seed=args.seed,
        )
    except (ValueError, OSError, RuntimeError) as exc:
        return _fail(exc)
    if args.json:
        print(json.dumps(rec.to_dict(), indent=1))
        return 0
    norms = sorted(rec.norms)
    print(
        f"max_grad_norm = {rec.max_grad_norm:.4g} (quantile {rec.quantile:g} of {len(norms)} public cases' gradient "
        f"norms; {rec.views} view(s) per case; {rec.trained_parameters}: {rec.trained_weights:,} weights; "
        f"min {norms[0]:.3g}, max {norms[-1]:.3g}). Public data: costs no ε."
    )
    return 0
