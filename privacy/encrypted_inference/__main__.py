"""``python -m privacy.encrypted_inference serve|segment|dealer``: the same commands as ``fetal-fl private-infer``,
without importing the other parts' command lines (faster start for the three processes)."""

from __future__ import annotations

import argparse
import sys

from privacy.encrypted_inference.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m privacy.encrypted_inference")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    register(sub)
    args = parser.parse_args(["private-infer", *(sys.argv[1:] if argv is None else argv)])
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
