"""``fetal-fl fl stats ...``: plan, run (simulator or local POC), export and show the federated statistics job.

NVFlare is imported only inside the handlers (importing ``nvflare.recipe`` rewrites ``sys.argv``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    """Add ``stats`` and its sub-commands under ``fetal-fl fl``."""
    from nvflare_jobs.statistics.config import DEFAULT_CONFIG

    p = sub.add_parser(
        "stats",
        help="federated statistics before training (DP, charged to the site ledgers)",
        description="How the sites differ (case counts, gestational age, voxel size, orientation, intensities), "
        "computed with NVFlare's federated statistics workflow; every released value is noised (Gaussian "
        "mechanism, one patient = the privacy unit) and its ε charged to each site's privacy ledger, the same "
        "ledger training charges. See docs/federated_statistics.md.",
    )
    stats = p.add_subparsers(dest="stats_command", metavar="<stats command>")
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    plan = stats.add_parser("plan", help="print what a request releases and its ε (no data read)")
    plan.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="statistics config (JSON)")
    plan.set_defaults(handler=_plan)

    run = stats.add_parser("run", help="run the job: NVFlare simulator (--sim) or a local POC system (--poc)")
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sim", action="store_true", help="NVFlare simulator (one client per site)")
    mode.add_argument("--poc", action="store_true", help="local POC system on 127.0.0.1 (submit, wait, download)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="statistics config (JSON)")
    run.add_argument("--workspace", type=Path, required=True, help="folder for the run (created)")
    data = run.add_mutually_exclusive_group()
    data.add_argument("--data-root", type=Path, help="folder holding <site>/ data folders (overrides data.root)")
    data.add_argument(
        "--synthetic", type=int, metavar="N", help="write a synthetic federation (N cases per site, 32³) first"
    )
    run.add_argument("--ledger", type=Path, help="the sites' privacy ledger (created beforehand by the site admin)")
    run.add_argument(
        "--no-ledger", action="store_true", help="simulations only: release without a ledger (ε reported, not charged)"
    )
    run.set_defaults(handler=_run)

    export = stats.add_parser("export", help="write the job folder that `nvflare job submit -j` takes")
    export.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="statistics config (JSON)")
    export.add_argument("--out", type=Path, required=True, help="folder receiving <job name>/")
    export.set_defaults(handler=_export)

    show = stats.add_parser("show", help="print the table (and write the plots) of a statistics result")
    show.add_argument("result", type=Path, help="the job's statistics/<name>.json")
    show.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="the statistics config it ran with")
    show.add_argument("--plots", type=Path, help="folder for one PNG per feature")
    show.set_defaults(handler=_show)


def _plan(args: argparse.Namespace) -> int:
    from nvflare_jobs.statistics.config import load_stats_config

    cfg = load_stats_config(args.config)
    r = cfg.request
    releases = {f"stage {s}": [f"{a}:{b}" for a, b in r.releases(s)] for s in (1, 2)}
    print(
        json.dumps(
            {
                "name": cfg.name,
                "sites": list(cfg.sites),
                "releases": releases,
                "noise_multiplier": r.sigma,
                "epsilon": r.planned_epsilon,
                "delta": r.delta,
                "accountant": r.accountant,
                "privacy_unit": "one patient (add/remove)",
            },
            indent=2,
        )
    )
    return 0


def _config_for_run(args: argparse.Namespace) -> Any:
    from nvflare_jobs.statistics.config import load_stats_config

    cfg = load_stats_config(args.config)
    # every refusal before anything is written
    if args.no_ledger and args.poc:
        raise ValueError("--no-ledger is for simulations only: a POC site releases statistics only with its ledger")
    if args.ledger is not None:
        from privacy.ledger import SiteLedger

        SiteLedger(args.ledger)  # missing or corrupt: fail now rather than at every site
    args.workspace.mkdir(parents=True, exist_ok=True)
    if args.synthetic is not None:
        from fetalseg.data.federation import write_federation

        if args.synthetic < 1:
            raise ValueError(f"--synthetic needs at least 1 case per site, got {args.synthetic}")
        root = args.workspace / "federation"
        dirs = write_federation(root, n_sites=len(cfg.sites), cases_per_site=args.synthetic, shape=(32, 32, 32))
        if sorted(d.name for d in dirs) != sorted(cfg.sites):
            raise ValueError(f"the synthetic federation's sites {[d.name for d in dirs]} are not {list(cfg.sites)}")
        cfg = cfg.with_changes(data_root=str(root.resolve()))
    elif args.data_root is not None:
        cfg = cfg.with_changes(data_root=str(args.data_root.resolve()))
    elif cfg.data_root and not Path(cfg.data_root).is_absolute():
        cfg = cfg.with_changes(data_root=str(Path(cfg.data_root).resolve()))
    if args.no_ledger:
        cfg = cfg.with_changes(require_ledger=False)
    return cfg


def _run(args: argparse.Namespace) -> int:
    from fetalseg.site_env import ENV_PRIVACY_LEDGER
    from nvflare_jobs.statistics.job import StatisticsJobFailed
    from nvflare_jobs.statistics.report import format_table, load_result, plot, privacy_line

    cfg = _config_for_run(args)
    # the simulator's sites read the ledger from this process's environment: set it for the job only, so a caller
    # that runs more than one command in one process (the tests, a notebook) is not left charging this ledger
    saved = os.environ.get(ENV_PRIVACY_LEDGER)
    if args.ledger is not None:
        os.environ[ENV_PRIVACY_LEDGER] = str(args.ledger.resolve())
    try:
        result_path, status = _run_job(args, cfg)
    except StatisticsJobFailed as e:  # refused at the sites (over budget, policy, data): said plainly, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if saved is None:
            os.environ.pop(ENV_PRIVACY_LEDGER, None)
        else:
            os.environ[ENV_PRIVACY_LEDGER] = saved
    result = load_result(result_path)
    plots = plot(result, cfg, args.workspace / "plots")
    print(privacy_line(cfg))
    print()
    print(format_table(result, cfg))
    print()
    print(json.dumps({"status": status, "result": str(result_path), "plots": [str(p) for p in plots]}, indent=2))
    return 0 if status == "FINISHED:COMPLETED" else 1


def _run_job(args: argparse.Namespace, cfg: Any) -> tuple[Path, str]:
    """Run the job in the simulator or on a local POC system: the result file and NVFlare's final status."""
    from fetalseg.site_env import ENV_PRIVACY_LEDGER
    from nvflare_jobs.statistics.job import StatisticsJobFailed, export_job, find_result, run_simulation, site_errors

    if args.sim:
        return run_simulation(cfg, args.workspace.resolve() / "sim"), "FINISHED:COMPLETED"
    from fetalseg.site_env import ENV_DATA_ROOT
    from nvflare_jobs.deploy import SITES_DIR, PocFederation, running

    env = {ENV_DATA_ROOT: cfg.data_root} if cfg.data_root else {}
    if args.ledger is not None:
        env[ENV_PRIVACY_LEDGER] = str(args.ledger.resolve())
    # the demo site policies: their 'statistics' scope checks the request (LimitStatistics) before any task
    policies = {s: SITES_DIR / s / "privacy.json" for s in cfg.sites if (SITES_DIR / s / "privacy.json").is_file()}
    federation = PocFederation(args.workspace / "poc_run", sites=list(cfg.sites), env=env, site_policies=policies)
    with running(federation) as fed:
        job_id = fed.submit(export_job(cfg, args.workspace / "jobs"))
        status = fed.wait(job_id)
        downloaded = fed.download(job_id, args.workspace / "result")
    try:
        return find_result(downloaded, cfg), status
    except FileNotFoundError:
        reasons = site_errors(args.workspace / "poc_run")
        raise StatisticsJobFailed(f"statistics job {job_id} ended {status} without a result; {reasons}") from None


def _export(args: argparse.Namespace) -> int:
    from nvflare_jobs.statistics.config import load_stats_config
    from nvflare_jobs.statistics.job import export_job

    print(export_job(load_stats_config(args.config), args.out))
    return 0


def _show(args: argparse.Namespace) -> int:
    from nvflare_jobs.statistics.config import load_stats_config
    from nvflare_jobs.statistics.report import format_table, load_result, plot, privacy_line

    cfg = load_stats_config(args.config)
    result = load_result(args.result)
    print(privacy_line(cfg))
    print()
    print(format_table(result, cfg))
    if args.plots:
        for p in plot(result, cfg, args.plots):
            print(p)
    return 0
