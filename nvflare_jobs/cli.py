"""``fetal-fl fl ...``: run, export and deploy the federated job from the command line.

NVFlare is imported only inside the handlers: importing ``nvflare.recipe`` rewrites ``sys.argv`` (it consumes
``--export``/``--export-dir``), which must not happen while ``fetal-fl`` is still parsing its own arguments.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parent / "fetal_brain" / "config.json"


def register(subparsers: Any) -> None:
    """Add ``fl`` and its sub-commands to the ``fetal-fl`` parser."""
    p = subparsers.add_parser(
        "fl",
        help="federated training with NVFlare: simulate, export, POC, site kits",
        description="Federated training of the fetal brain bundle with NVFlare (see docs/site_admin.md). Every "
        "knob lives in one job config file (nvflare_jobs/fetal_brain/config.json and configs/*.json).",
    )
    sub = p.add_subparsers(dest="fl_command", metavar="<fl command>")
    p.set_defaults(handler=lambda args: _help(p))

    run = sub.add_parser(
        "run",
        help="run a job: in NVFlare's simulator (--sim) or on a local POC system (--poc)",
        description="--sim: one simulated client per site of the config (fast). --poc: nvflare poc prepare + start "
        "on 127.0.0.1 with the demo site policies, job submit, wait, download, poc stop.",
    )
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sim", action="store_true", help="NVFlare simulator")
    mode.add_argument("--poc", action="store_true", help="local POC system (server + sites, mutual TLS, loopback)")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job config (JSON/YAML)")
    run.add_argument("--workspace", type=Path, required=True, help="folder for the run (created)")
    run.add_argument("--data-root", type=Path, help="folder holding <site>/ data folders (overrides data.root)")
    run.add_argument("--no-site-policies", action="store_true", help="POC: do not install the demo privacy.json")
    run.set_defaults(handler=_run)

    export = sub.add_parser(
        "export",
        help="write the job folder that `nvflare job submit -j` takes",
        description="Same as `python -m nvflare_jobs.fetal_brain.job --config C --export --export-dir DIR`.",
    )
    export.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job config (JSON/YAML)")
    export.add_argument("--out", type=Path, required=True, help="folder receiving <job name>/")
    export.set_defaults(handler=_export)

    check = sub.add_parser(
        "check", help="validate a job config and print what it will do", description="Validate a job config."
    )
    check.add_argument("config", type=Path, help="job config (JSON/YAML)")
    check.set_defaults(handler=_check)

    audit = sub.add_parser(
        "audit",
        help="show what left a site (or what the server received): one line per update",
        description="Print a site's audit file (<site workspace>/audit/updates.jsonl: job, round, time, filter chain "
        "with parameters, epsilon after the round, bytes, sha256 of the payload) or the server's "
        "(<server workspace>/audit/received.jsonl). Compare the sha256 columns to check that the server received "
        "exactly what the site sent.",
    )
    audit.add_argument("file", type=Path, help="audit file (updates.jsonl or received.jsonl)")
    audit.add_argument("--job", help="only this job id")
    audit.add_argument("--json", action="store_true", help="the full records as JSON lines")
    audit.set_defaults(handler=_audit)

    kit = sub.add_parser(
        "kit",
        help="prepare a startup kit for this project (allow list, site privacy policy)",
        description="What a site admin does once to an NVFlare startup kit: allow this project's component "
        "classes in local/resources.json and, for a hospital, install its privacy.json (named scopes).",
    )
    kit.add_argument("kit", type=Path, help="the participant's startup kit folder (contains startup/ and local/)")
    kit.add_argument(
        "--policy", type=Path, help="privacy.json to install (e.g. nvflare_jobs/sites/site-1/privacy.json)"
    )
    kit.set_defaults(handler=_kit)

    from nvflare_jobs.statistics.cli import register as register_stats  # `fetal-fl fl stats ...`

    register_stats(sub)

    from nvflare_jobs.resume import register_cli as register_resume  # `fetal-fl fl resume <job id>`

    register_resume(sub)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _config(path: Path, data_root: Path | None = None) -> Any:
    from nvflare_jobs.config import load_config

    config = load_config(path)
    if data_root is not None:
        config = config.with_changes(data={"root": str(data_root.resolve())})
    elif config.data_root and not Path(config.data_root).is_absolute():
        config = config.with_changes(data={"root": str(Path(config.data_root).resolve())})
    if config.initial_checkpoint and Path(config.initial_checkpoint).is_file():
        from nvflare_jobs.checkpoint import refuse_local_parts

        refuse_local_parts(config.initial_checkpoint)  # every exit of a job (run, export, check) goes through here
    return config


def _run(args: argparse.Namespace) -> int:
    config = _config(args.config, args.data_root)
    args.workspace.mkdir(parents=True, exist_ok=True)
    if args.sim:
        from nvflare_jobs.fetal_brain.job import run_simulation

        result = run_simulation(config, args.workspace)
        print(json.dumps({"mode": "simulator", "job": config.name, "workspace": str(result)}, indent=2))
        return 0
    from fetalseg.site_env import ENV_DATA_ROOT
    from nvflare_jobs.deploy import SITES_DIR, PocFederation, running
    from nvflare_jobs.fetal_brain.job import export_job

    policies = {} if args.no_site_policies else {s: SITES_DIR / s / "privacy.json" for s in config.sites}
    policies = {s: p for s, p in policies.items() if p.is_file()}
    env = {ENV_DATA_ROOT: config.data_root} if config.data_root else {}
    federation = PocFederation(args.workspace, sites=config.sites, env=env, site_policies=policies)
    with running(federation) as fed:
        job_id = fed.submit(export_job(config, args.workspace / "jobs"))
        status = fed.wait(job_id)
        result = fed.download(job_id, args.workspace / "result")
    print(json.dumps({"mode": "poc", "job_id": job_id, "status": status, "result": str(result)}, indent=2))
    return 0 if status == "FINISHED:COMPLETED" else 1


def _export(args: argparse.Namespace) -> int:
    from nvflare_jobs.fetal_brain.job import export_job

    print(export_job(_config(args.config), args.out))
    return 0


def _check(args: argparse.Namespace) -> int:
    config = _config(args.config)
    summary = {
        "name": config.name,
        "algorithm": config.algorithm,
        "rounds": config.num_rounds,
        "sites": list(config.sites),
        "min_clients": config.min_clients,
        "scope": config.scope,
        "filters": {site: [f.type for f in config.filters_for(site)] for site in config.sites},
        "dp_sgd": {site: config.dp_sgd_for(site) for site in config.sites},
        "data_root": config.data_root,
        # the site-local part: never sent, kept in each site's FETAL_FL_SITE_STATE folder
        "local": {"parameters": config.local_parameters, "fine_tune_epochs": config.local_fine_tune_epochs},
        "initial_checkpoint": None,
    }
    if config.initial_checkpoint:  # checked as the job build checks it: a bad start fails here, not at a site
        import tempfile

        from nvflare_jobs.fetal_brain.model import write_initial_model

        with tempfile.TemporaryDirectory() as tmp:
            summary["initial_checkpoint"] = {
                "path": config.initial_checkpoint,
                **write_initial_model(
                    config.initial_checkpoint, Path(tmp) / "initial.pt", bundle_overrides=config.bundle_overrides
                ),
            }
    print(json.dumps(summary, indent=2))
    return 0


def _audit(args: argparse.Namespace) -> int:
    from nvflare_jobs.audit import format_records, read_records

    if not args.file.is_file():
        raise FileNotFoundError(f"audit file {args.file} does not exist")
    rows = read_records(args.file, job=args.job)
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    else:
        for line in format_records(rows):
            print(line)
        print(f"{len(rows)} record(s)" + (f" of job {args.job}" if args.job else ""))
    return 0


def _kit(args: argparse.Namespace) -> int:
    from nvflare_jobs.deploy import allow_project_components, install_site_policy

    if not (args.kit / "startup").is_dir():
        raise FileNotFoundError(f"{args.kit} is not a startup kit (no startup/ folder)")
    print(allow_project_components(args.kit))
    if args.policy:
        print(install_site_policy(args.kit, args.policy))
    return 0
