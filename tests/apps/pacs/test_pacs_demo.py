"""``fetal-fl app pacs-demo --check``: the user's one-command PACS round trip, run as the user runs it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from apps.fetal_brain import orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # the CLI starts Orthanc and the app


def test_pacs_demo_check_round_trip(tmp_path):
    reason = orthanc.missing()
    if reason:
        pytest.skip(f"skipped: the PACS demo needs {reason}")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fetal_fl.cli",
            "app",
            "pacs-demo",
            "--check",
            "--cases",
            "1",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"^DICOM SEG series in the PACS\s+2$", done.stdout, re.M), done.stdout
    assert "Fetal brain tissues (correction)" in done.stdout and "Fetal brain tissues (model result)" in done.stdout
    assert not any(p.name.endswith(".json") and p.stat().st_mode & 0o077 for p in tmp_path.glob("*.json"))
