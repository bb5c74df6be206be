"""``fetal-fl private-infer serve|segment|dealer`` is wired through ``privacy.cli.register`` (as fetal_fl/cli.py
loads each part), and bad ``--set`` values are refused with a clear message."""

from __future__ import annotations

import argparse

import pytest

from privacy import cli as privacy_cli
from privacy.encrypted_inference import cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fetal-fl")
    privacy_cli.register(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize(
    ("argv", "handler"),
    [
        (["private-infer", "serve", "--weights", "m.pt", "--port", "7470"], cli._serve),
        (["private-infer", "dealer", "--server", "127.0.0.1:7470"], cli._dealer),
        (["private-infer", "segment", "a.nii.gz", "--server", "h:1", "--out", "s.nii.gz"], cli._segment),
    ],
)
def test_commands_are_registered(argv, handler):
    assert _parser().parse_args(argv).handler is handler


def test_overrides_are_json():
    assert cli._overrides(["patch_size=[16,16,16]", "sw_overlap=0.5"]) == {
        "patch_size": [16, 16, 16],
        "sw_overlap": 0.5,
    }
    with pytest.raises(ValueError, match="KEY=JSON"):
        cli._overrides(["patch_size"])
    with pytest.raises(ValueError, match="not JSON"):
        cli._overrides(["patch_size=[16,"])
