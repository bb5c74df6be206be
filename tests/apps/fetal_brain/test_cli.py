"""``fetal-fl app ...`` sub-commands, through the ``register`` hook the project's entry point calls."""

import argparse
import json
import shlex

import numpy as np
import pytest

from apps.fetal_brain.cli import UVICORN_APP, register
from fetalseg.data.io import write_nifti
from tests.conftest import sphere_case

COMMANDS = ("serve", "install-model", "export-cases", "model-info")


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fetal-fl")
    register(parser.add_subparsers(dest="command"))
    return parser


@pytest.mark.parametrize("command", COMMANDS)
def test_every_sub_command_has_help(parser, capsys, command):
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["app", command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"fetal-fl app {command}" in text and len(text.splitlines()) > 5


def test_serve_dryrun_prints_the_monailabel_command(parser, capsys, tmp_path):
    args = parser.parse_args(["app", "serve", "--studies", str(tmp_path), "--conf", "variant", "tiny", "--dryrun"])
    assert args.handler(args) == 0
    argv = shlex.split(capsys.readouterr().out)
    assert argv[1:4] == ["-m", "monailabel.main", "start_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--uvicorn_app") + 1] == UVICORN_APP
    assert argv[argv.index("--conf") + 1 : argv.index("--conf") + 3] == ["variant", "tiny"]


def test_model_info_and_export(parser, capsys, tmp_path):
    args = parser.parse_args(["app", "model-info", "--model-path", str(tmp_path / "m.pt"), "--conf", "variant", "tiny"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["trained"] is False

    image, label, affine = sphere_case(shape=(12, 12, 12))
    write_nifti(image, affine, tmp_path / "studies" / "c1.nii.gz")
    write_nifti(label, affine, tmp_path / "studies" / "labels" / "final" / "c1.nii.gz", dtype=np.uint8)
    args = parser.parse_args(
        ["app", "export-cases", "--studies", str(tmp_path / "studies"), "--out", str(tmp_path / "x")]
    )
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["exported"] == 1
    assert (tmp_path / "x" / "labels" / "c1.nii.gz").is_file()


def test_export_of_a_missing_folder_is_a_clear_error(parser, tmp_path):
    args = parser.parse_args(["app", "export-cases", "--studies", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        args.handler(args)
