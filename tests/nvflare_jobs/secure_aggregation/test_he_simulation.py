"""The HE option in NVFlare's simulator (which NVFlare's own HE recipe refuses): with both TenSEAL contexts in the
simulator workspace's ``startup/``, one round completes, the server receives only ciphertext and saves the global
model encrypted; decrypted, it has moved from the initial model and is finite."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from tests.nvflare_jobs.conftest import SITES, tiny_config

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]


def test_one_he_round_in_the_simulator(tmp_path: Path, federation: Path, fl_env: dict) -> None:
    import torch
    from nvflare.recipe import SimEnv

    from nvflare_jobs.fetal_brain.job import build_recipe
    from nvflare_jobs.fetal_brain.model import FetalBrainNet
    from nvflare_jobs.secure_aggregation.he import CLIENT_CONTEXT, decrypt_global_model, prepare_simulator_workspace

    cfg = tiny_config(federation, name="he_sim", num_rounds=1, cross_site_eval=False, tracking=None,
                      server={"secure_aggregation": {"enabled": True, "method": "he"}})  # fmt: skip
    startup = prepare_simulator_workspace(tmp_path, cfg["name"])
    recipe = build_recipe(cfg, command=f"{sys.executable} -u")
    recipe.run(SimEnv(clients=list(SITES), num_threads=len(SITES), workspace_root=str(tmp_path)))
    job = tmp_path / cfg["name"]
    log = (job / "server" / "log.txt").read_text()
    for site in SITES:
        assert f"HE check: {site} sent 46 of 46 tensors as CKKS ciphertext" in log, site
    (model,) = (job / "server").rglob("FL_global_model.pt")
    assert all(isinstance(v, bytes) for v in torch.load(model, weights_only=False)["model"].values())
    final = decrypt_global_model(model, startup / CLIENT_CONTEXT)
    initial = {
        k: v.numpy().ravel() for k, v in FetalBrainNet(cfg["bundle_overrides"], init_seed=0).state_dict().items()
    }
    assert set(final) == set(initial)
    assert all(np.all(np.isfinite(v)) for v in final.values())
    assert max(float(np.max(np.abs(final[k] - initial[k]))) for k in initial) > 1e-4
