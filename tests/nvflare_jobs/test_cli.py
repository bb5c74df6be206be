"""`fetal-fl fl ...` sub-commands (fast ones; `fl run` is what the simulator and POC tests exercise)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from nvflare_jobs.cli import DEFAULT_CONFIG, register


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fetal-fl")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.handler(args)


@pytest.mark.parametrize("argv", [["fl"], ["fl", "run"], ["fl", "export"], ["fl", "check"], ["fl", "kit"]])
def test_every_sub_command_has_help(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        _run([*argv, "--help"])
    assert exc.value.code == 0 and "usage: fetal-fl" in capsys.readouterr().out


def test_check_summarises_per_site_privacy(capsys: pytest.CaptureFixture) -> None:
    svt = DEFAULT_CONFIG.parent / "configs" / "svt.json"
    assert _run(["fl", "check", str(svt)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["filters"] == {"site-1": [], "site-2": ["svt"], "site-3": []}


def test_check_validates_and_shows_the_initial_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fetalseg.bundle import save_checkpoint
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    save_checkpoint(FetalBrainNet({}, init_seed=1).net, tmp_path / "public.pt", origin="public pretraining")
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["initial_checkpoint"] = str(tmp_path / "public.pt")
    (tmp_path / "job.json").write_text(json.dumps(cfg))
    assert _run(["fl", "check", str(tmp_path / "job.json")]) == 0
    shown = json.loads(capsys.readouterr().out)["initial_checkpoint"]
    assert shown["file"] == "public.pt" and shown["info"] == {"origin": "public pretraining"}
    (tmp_path / "public.pt").write_bytes(b"truncated")
    with pytest.raises(ValueError, match="does not fit"):
        _run(["fl", "check", str(tmp_path / "job.json")])


def test_export_writes_a_submittable_job_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert _run(["fl", "export", "--out", str(tmp_path)]) == 0
    job = Path(capsys.readouterr().out.strip())
    assert job == tmp_path / "fetal_brain_fedavg" and (job / "meta.json").is_file()
    # the relative data root of the shipped config was made absolute for the sites
    config = json.loads((job / "app_site-1" / "custom" / "fetal_fl_job.json").read_text())
    assert Path(config["data"]["root"]).is_absolute()


def test_kit_configures_allow_list_and_policy(tmp_path: Path) -> None:
    (tmp_path / "startup").mkdir()
    (tmp_path / "local").mkdir()
    policy = DEFAULT_CONFIG.parents[1] / "sites" / "site-2" / "privacy.json"
    assert _run(["fl", "kit", str(tmp_path), "--policy", str(policy)]) == 0
    assert "nvflare_jobs." in json.loads((tmp_path / "local" / "resources.json").read_text())["class_allow_list"]
    assert (tmp_path / "local" / "privacy.json").read_text() == policy.read_text()
    with pytest.raises(FileNotFoundError):
        _run(["fl", "kit", str(tmp_path / "nope")])


def test_importing_the_cli_leaves_nvflares_export_flags_alone() -> None:
    """fetal-fl imports every part's cli before parsing; NVFlare's recipe module must not be imported then."""
    import subprocess

    code = "import sys; import nvflare_jobs.cli; print('nvflare.recipe' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=DEFAULT_CONFIG.parents[2]
    )
    assert out.stdout.strip() == "False"
