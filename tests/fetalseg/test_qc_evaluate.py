"""``fetal-fl evaluate`` draws the growth chart (predicted volumes vs GA against the published curve)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from fetal_fl.cli import main
from fetalseg.bundle import Bundle, save_checkpoint
from fetalseg.data.federation import write_federation
from fetalseg.data.loaders import GA_COLUMNS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[list[Path], Path]:
    root = tmp_path_factory.mktemp("qc_eval")
    sites = write_federation(root / "fed", n_sites=1, cases_per_site=4, shape=(32, 32, 32), seed=3)
    ckpt = save_checkpoint(Bundle("train", variant="tiny").network(), root / "model.pt")
    return sites, ckpt


def test_evaluate_writes_the_growth_chart_and_checks(tiny, tmp_path, capsys):
    sites, ckpt = tiny
    args = ["evaluate", "--data", *map(str, sites), "--variant", "tiny", "--checkpoint", str(ckpt), "--no-hd95"]
    assert main([*args, "--out", str(tmp_path / "out"), "--qc-plot", str(tmp_path / "chart.png")]) == 0
    assert "growth chart:" in capsys.readouterr().out
    assert (tmp_path / "chart.png").read_bytes()[:4] == b"\x89PNG"
    checks = json.loads((tmp_path / "out" / "qc.json").read_text())
    assert checks and all(c["ga_weeks"] is not None and len(c["volumes_ml"]) == 7 for c in checks.values())
    assert all(c["ga_source"] == "participants.tsv" for c in checks.values())
    cerebellum = [next(t for t in c["tissues"] if t["tissue"] == "cerebellum") for c in checks.values()]
    assert all("expected_ml" in t or t["status"] == "outside reference GA range" for t in cerebellum)


def test_absurd_ga_in_participants_is_a_clear_error(tiny, tmp_path, capsys):
    sites, ckpt = tiny
    copy = tmp_path / sites[0].name
    shutil.copytree(sites[0], copy)
    tsv = copy / "participants.tsv"
    rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    column = next(i for i, name in enumerate(rows[0]) if name in GA_COLUMNS)
    for row in rows[1:]:
        row[column] = "61"  # every case, so whichever is held out carries it
    tsv.write_text("\n".join("\t".join(row) for row in rows) + "\n")
    code = main(["evaluate", "--data", str(copy), "--variant", "tiny", "--checkpoint", str(ckpt), "--no-hd95"])
    err = capsys.readouterr().err
    assert code == 2 and "not a plausible gestational age" in err and "Traceback" not in err
