"""``fetal-fl demo --quick`` end to end: report contents, installed model, a real server, real next-step commands.

One demo run (module fixture, ~3 minutes on 2 shared cores) in a subprocess exactly as a user runs it; the checks
read what it wrote and printed. No NVFlare or MONAI Label piece is mocked.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fetalseg.plumbing import free_port
from fetalseg.site_env import SITE_VARIABLES

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = ["site-1", "site-2", "site-3"]


def _env(tmp: Path) -> dict[str, str]:
    """This interpreter's scripts first on PATH, the checkout importable, MONAI Label state kept in tmp."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), env.get("PYTHONPATH", "")] if p)
    env.update(
        MONAI_LABEL_TRACKING_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        MONAI_LABEL_SESSION_PATH=str(tmp / "sessions"),
        OMP_NUM_THREADS="1",
    )
    for var in SITE_VARIABLES:  # new names and their deprecated aliases
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    port = free_port()
    env = _env(out)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "fetal-fl"), "demo", "--quick", "--out", str(out), "--port", str(port)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    print(f"fetal-fl demo --quick: {seconds:.0f} s")
    summary = json.loads((out / "demo_summary.json").read_text())
    return {"out": out, "stdout": proc.stdout, "summary": summary, "env": env, "port": port}


def test_progress_is_shown_per_round_with_epsilon_per_site(demo: dict) -> None:
    rounds = re.findall(r"round (\d+)/(\d+): (\d)/3 sites done(.*)", demo["stdout"])
    assert rounds and rounds[-1][0] == rounds[-1][1], demo["stdout"]
    for _, _, done, rest in rounds:
        assert done == "3" and all(site in rest for site in SITES) and rest.count("ε") == 3


def test_report_has_every_table_with_dice_in_range(demo: dict) -> None:
    report = (demo["out"] / "report" / "report.md").read_text()
    for heading in ("federated+privacy: Dice", "centralized: Dice", "centralized: HD95", "Privacy, per site"):
        assert heading in report, heading
    for site in SITES:
        assert f"single-site {site}: Dice" in report
    assert "NOT differential privacy" in report or "Not differential privacy" in report
    assert "## Benchmarks" in report
    results = json.loads((demo["out"] / "report" / "results.json").read_text())
    assert {"federated+privacy", "centralized", *(f"single-site {s}" for s in SITES)} <= set(results["experiments"])
    for name, exp in results["experiments"].items():
        for site in [*SITES, "all"]:
            for tissue, values in exp["summary"][site].items():
                assert 0.0 <= values["dice"] <= 1.0, (name, site, tissue)


def test_report_shows_the_federation_before_training(demo: dict) -> None:
    """The sites' federated statistics (NVFlare's statistics workflow, DP noised) are in the report: a row per site
    and the federation, the ε they cost, and their plots."""
    report = (demo["out"] / "report" / "report.md").read_text()
    assert "## The federation before training" in report
    section = report.split("## The federation before training")[1].split("\n## ")[0]
    assert "Not available" not in section, section
    assert all(f"| {site} |" in section for site in SITES) and "**all sites**" in section
    assert "ε=" in section and "not charged" in section
    assert (demo["out"] / "report" / "stats_orientation.png").stat().st_size > 1000


def test_epsilon_is_finite_and_positive_for_every_site(demo: dict) -> None:
    results = json.loads((demo["out"] / "report" / "results.json").read_text())
    eps = results["experiments"]["federated+privacy"]["epsilon"]
    assert sorted(eps) == SITES
    assert all(math.isfinite(v) and v > 0 for v in eps.values()), eps
    for row in results["rounds_private"]:
        assert all(math.isfinite(m["dp_epsilon"]) and m["dp_epsilon"] > 0 for m in row["sites"].values())


def test_figures_are_written_and_not_empty(demo: dict) -> None:
    folder = demo["out"] / "report"
    for name in ("epsilon_per_round.png", "privacy_utility.png"):
        assert (folder / name).stat().st_size > 1000, name
    # the --quick demo runs DP-SGD only: its sites withhold validation Dice (docs/privacy.md, "Metrics a site sends")
    val, report = folder / "val_dice_per_round.png", (folder / "report.md").read_text()
    assert (val.is_file() and val.stat().st_size > 1000) or "withheld by the DP-SGD sites" in report
    cases = sorted(folder.glob("case_*.png"))
    assert {p.name.split("_")[1] for p in cases} == set(SITES)
    assert all(p.stat().st_size > 1000 for p in cases)
    for png in folder.glob("*.png"):
        assert f"]({png.name})" in report, png.name


def test_the_best_global_model_is_installed_with_its_origin(demo: dict) -> None:
    import torch

    model = Path(demo["summary"]["installed_model"])
    assert model.is_file() and model.stat().st_size > 0
    ckpt = torch.load(model, map_location="cpu", weights_only=False)
    assert "model" in ckpt and ckpt.get("origin") == "nvflare", {k: v for k, v in ckpt.items() if k != "model"}


def _next_commands(demo: dict) -> list[list[str]]:
    return [shlex.split(line.strip()) for line in demo["summary"]["next_steps"] if line.strip().startswith("fetal-fl ")]


def test_printed_next_steps_are_real_commands(demo: dict) -> None:
    commands = _next_commands(demo)
    assert commands and commands[0] == demo["summary"]["server_command"]
    for line in demo["summary"]["next_steps"]:
        assert line in demo["stdout"]
    for cmd in commands:
        sub = [c for c in cmd[1:] if not c.startswith("-")][:2]  # e.g. ["app", "serve"]
        help_run = subprocess.run(
            [str(BIN / "fetal-fl"), *sub, "--help"], cwd=REPO, env=demo["env"], capture_output=True, text=True
        )
        assert help_run.returncode == 0, (cmd, help_run.stderr)
    info = subprocess.run(
        [str(BIN / "fetal-fl"), *commands[-1][1:]], cwd=REPO, env=demo["env"], capture_output=True, text=True
    )
    assert info.returncode == 0 and "nvflare" in info.stdout, info.stderr


@pytest.fixture
def served(demo: dict) -> Iterator[str]:
    """The server started with exactly the printed command (stopped afterwards, also on failure)."""
    cmd = demo["summary"]["server_command"]
    assert cmd[0] == "fetal-fl" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    log = (demo["out"] / "server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "fetal-fl"), *cmd[1:]],
        cwd=demo["out"],
        env=demo["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{demo['port']}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"server exited ({proc.returncode}):\n{(demo['out'] / 'server.log').read_text()}")
            try:
                if requests.get(url + "/info/", timeout=5).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("server did not answer /info/ within 180 s")
            time.sleep(1)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


def test_server_from_the_printed_command_serves_infer_with_the_installed_model(demo: dict, served: str) -> None:
    info = requests.get(served + "/info/", timeout=30).json()
    model = next(iter(info["models"]))
    image = sorted((demo["out"] / "studies").glob("*.nii.gz"))[0].name.removesuffix(".nii.gz")
    response = requests.post(f"{served}/infer/{model}", params={"image": image, "output": "image"}, timeout=300)
    assert response.status_code == 200, response.text[:500]
    assert len(response.content) > 100
    described = json.dumps(info)
    assert "nvflare" in described, "the server does not report the installed federated model"


def test_serve_uses_this_installations_cli_without_an_activated_environment() -> None:
    """``demo --serve`` must not depend on PATH: it once failed with "No such file or directory: 'fetal-fl'"."""
    from fetal_fl.demo import this_cli

    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = "/usr/bin:/bin"  # no .venv/bin
    proc = subprocess.run([*this_cli(), "app", "serve", "--help"], env=env, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "--studies" in proc.stdout


def test_every_model_starts_from_the_public_pretraining(demo: dict) -> None:
    """The federated jobs start from the public model (NVFlare's initial checkpoint), the installed model says
    so, its Dice before any site data is reported, and the report says what the public data is and is not."""
    import hashlib

    import torch

    public = demo["out"] / "public" / "model.pt"
    assert public.is_file()
    results = json.loads((demo["out"] / "report" / "results.json").read_text())
    assert "public pretraining only" in results["experiments"]
    installed = torch.load(Path(demo["summary"]["installed_model"]), map_location="cpu", weights_only=False)
    assert installed["initialized_from"]["file"] == public.name
    assert installed["initialized_from"]["sha256_prefix"] == hashlib.sha256(public.read_bytes()).hexdigest()[:16]
    report = (demo["out"] / "report" / "report.md").read_text()
    assert "costs no ε" in report and "| public pretraining only |" in report
    assert "public pretraining" in demo["stdout"]
