"""``fetal-fl``: the project's one command line.

Each part contributes its sub-commands through a ``register(subparsers)`` function in its own ``cli`` module, so
the core package never imports the MONAI Label app or NVFlare; this front door is the only place that knows them
all. A part that cannot be imported (e.g. a missing optional dependency) is skipped with a note in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from fetalseg.data.validation import DataValidationError

PARTS = ("fetalseg.cli", "privacy.cli", "nvflare_jobs.cli", "apps.fetal_brain.cli", "fetal_fl.demo")


class CliError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fetal-fl",
        description="Federated, privacy-preserving fetal brain MRI segmentation (FeTA tissues).",
        epilog="Run 'fetal-fl <command> --help' for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    unavailable = []
    for name in PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name.split(".")[0]):
                continue  # that part is not in this checkout yet
            unavailable.append(f"{name} ({exc})")
            continue
        module.register(subparsers)
    if unavailable:
        parser.epilog = (parser.epilog or "") + "\nUnavailable parts: " + "; ".join(unavailable)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        result = args.handler(args)
    except (CliError, DataValidationError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"fetal-fl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
