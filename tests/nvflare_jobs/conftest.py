"""Shared fixtures: a tiny synthetic 3-site federation, a fast job config, and an environment for NVFlare's
own processes (simulator clients, POC and provisioned servers) that finds this checkout's packages."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fetalseg.site_env import SITE_VARIABLES

REPO = Path(__file__).resolve().parents[2]
SITES = ["site-1", "site-2", "site-3"]
TINY_OVERRIDES = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}


@pytest.fixture(scope="session")
def federation(tiny_federation: list[Path]) -> Path:
    """Root of the shared tiny federation (``site-1`` .. ``site-3``, 4 cases of 32³ each; read-only)."""
    root = tiny_federation[0].parent
    assert sorted(p.name for p in tiny_federation) == SITES
    return root


def tiny_config(data_root: Path, **changes: Any) -> dict[str, Any]:
    """A job config that runs in seconds per round on 2 shared cores."""
    cfg: dict[str, Any] = {
        "name": "fetal_test",
        "algorithm": "fedavg",
        "num_rounds": 2,
        "min_clients": 2,
        "sites": list(SITES),
        "bundle_overrides": dict(TINY_OVERRIDES),
        "data": {"root": str(data_root), "split_seed": 0},
        "training": {"local_epochs": 1, "max_steps_per_epoch": 2, "batch_size": 1, "seed": 0},
        "privacy": {"filters": [], "dp_sgd": None},
        "server": {"max_update_norm": 1000.0, "straggler_wait_s": 5, "task_timeout_s": 0},
        "tracking": "tensorboard",
        "cross_site_eval": True,
        "runtime": {"external_process": True, "torch_threads": 1, "init_seed": 0},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = copy.deepcopy(value)
    return cfg


@pytest.fixture(scope="session")
def make_config(federation: Path):
    """``make_config(**changes)``: :func:`tiny_config` on the shared federation."""
    return lambda **changes: tiny_config(federation, **changes)


@pytest.fixture(scope="module")
def fl_env() -> Iterator[dict[str, str]]:
    """Environment for processes NVFlare starts: this interpreter as ``python3``, the checkout importable,
    one thread per process (several sites share 2 cores), no site data variables leaking in."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in [str(REPO), os.environ.get("PYTHONPATH", "")] if p)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", path)
        mp.setenv("PYTHONPATH", pythonpath)
        mp.setenv("OMP_NUM_THREADS", "1")
        for var in SITE_VARIABLES:  # new names and their deprecated aliases
            mp.delenv(var, raising=False)
        yield {"PATH": path, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def check_downloaded_job(result: Path, job_id: str, *, rounds: int) -> dict[str, Any]:
    """What ``nvflare job download`` brought back holds the job's best model in the bundle's format (finite, with
    its provenance) and the cross-site evaluation of every site; return the checkpoint's provenance."""
    import json

    import torch

    from fetalseg.bundle import Bundle, load_checkpoint
    from nvflare_jobs.checkpoint import BEST_CHECKPOINT_NAME

    (checkpoint,) = result.rglob(BEST_CHECKPOINT_NAME)
    net = Bundle("common", overrides=TINY_OVERRIDES).network()
    info = load_checkpoint(net, checkpoint)
    assert info["origin"] == "nvflare" and info["job_id"] == job_id and info["round"] == rounds
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
    (cse,) = result.rglob("cross_val_results.json")
    assert sorted(json.loads(cse.read_text())) == SITES
    return info


@pytest.fixture(scope="session")
def downloaded_job():
    """``downloaded_job(result_folder, job_id, rounds=N)``: :func:`check_downloaded_job`."""
    return check_downloaded_job
