"""The ``fetal-fl`` command: --help everywhere, clear errors, and the core flow end to end at tiny size."""

import json
import subprocess
import sys

import pytest

from fetal_fl.cli import build_parser, main


def _subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_core_subcommands_present():
    assert {"synth", "validate", "train", "evaluate", "segment", "bundle"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fetal-fl" in out and len(out.splitlines()) > 3


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "synth" in capsys.readouterr().out


def test_clear_error_for_missing_data(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--variant", "tiny"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "does not exist" in err and "Traceback" not in err


def test_validate_reports_problems(tmp_path, write_case, capsys):
    write_case("good", folder=tmp_path / "ok")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nii.gz").write_bytes(b"not an image")
    assert main(["validate", str(tmp_path / "ok")]) == 0
    assert main(["validate", str(tmp_path / "ok"), str(tmp_path / "bad")]) == 1
    out = capsys.readouterr().out
    assert "OK" in out and "FAIL" in out and "cannot be read" in out


def test_bundle_json(capsys):
    assert main(["bundle", "--json", "--variant", "tiny"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["patch_size"] == [32, 32, 32] and len(info["labels"]) == 8


@pytest.mark.slow
def test_synth_train_evaluate_segment_end_to_end(tmp_path):
    """The installed console script runs the core flow on a fresh tiny federation."""
    exe = [sys.executable, "-m", "fetal_fl.cli"]

    def run(*args):
        proc = subprocess.run([*exe, *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    sites = run("synth", "--out", str(tmp_path / "fed"), "--sites", "2", "--cases", "3", "--size", "32").split()
    assert len(sites) == 2
    run("validate", *sites)
    out = run("train", "--data", *sites, "--variant", "tiny", "--epochs", "2", "--out", str(tmp_path / "run"))
    assert "| all |" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and set(metrics["summary"]) == {"site-1", "site-2", "all"}
    ckpt = tmp_path / "run" / "model.pt"
    run("evaluate", "--data", *sites, "--variant", "tiny", "--checkpoint", str(ckpt), "--no-hd95")
    image = next((tmp_path / "fed" / "site-1").glob("sub-*/anat/*_T2w.nii.gz"))
    run("segment", str(image), "--variant", "tiny", "--checkpoint", str(ckpt), "--out", str(tmp_path / "seg.nii.gz"))
    assert (tmp_path / "seg.nii.gz").stat().st_size > 0
    # refusing to overwrite a federation is a clear error, not a traceback
    again = [*exe, "synth", "--out", str(tmp_path / "fed"), "--sites", "2", "--cases", "3", "--size", "32"]
    proc = subprocess.run(again, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error:" in proc.stderr and "Traceback" not in proc.stderr
