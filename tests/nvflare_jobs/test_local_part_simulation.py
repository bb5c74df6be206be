"""A real NVFlare simulator job with ``local.parameters = "norm"`` and a local fine-tune: the keys of every update
the server receives are recorded at the server, and none is a local key; each site's state folder holds its local
part with exactly the local keys, fine-tuned on the job's FINAL global model (the one the server persisted after the
last round and sent in the final evaluation), whose shared weights' hash it records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fetalseg.bundle import Bundle
from fetalseg.local_part import NEVER_SENT, read_local_part
from fetalseg.subspace import parameter_names
from nvflare_jobs.config import ENV_SITE_STATE
from nvflare_jobs.fetal_brain.job import build_recipe
from tests.nvflare_jobs.conftest import SITES, TINY_OVERRIDES
from tests.nvflare_jobs.received import ReceivedRecorder, read_received

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def job(tmp_path_factory, make_config, fl_env: dict) -> tuple[Path, list[dict], Path]:
    from nvflare.recipe import SimEnv

    tmp = tmp_path_factory.mktemp("local")
    config = make_config(
        name="local_part",
        num_rounds=2,
        min_clients=3,
        cross_site_eval=True,
        local={"parameters": "norm", "fine_tune_epochs": 1},
    )
    received = tmp / "received.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_SITE_STATE, str(tmp / "state"))
        recipe = build_recipe(config, command=f"{sys.executable} -u")
        recipe.add_server_input_filter(ReceivedRecorder(str(received)), tasks=["train"])
        recipe.run(SimEnv(clients=SITES, num_threads=len(SITES), workspace_root=str(tmp / "sim")))
    rows = read_received(received, updates_only=True)
    return tmp / "state", rows, tmp / "sim"


def _local_names() -> list[str]:
    return parameter_names(Bundle("common", overrides=TINY_OVERRIDES).network(), "norm")


def test_no_update_the_server_received_holds_a_local_key(job) -> None:
    _, rows, _ = job
    local = {f"net.{n}" for n in _local_names()}
    assert len(rows) == 2 * len(SITES) and {r["site"] for r in rows} == set(SITES)
    for row in rows:
        assert row["keys"] and not set(row["keys"]) & local, row["site"]


def test_every_site_keeps_its_local_part_with_exactly_the_local_keys(job) -> None:
    state, _, _ = job
    for site in SITES:
        (path,) = state.glob(f"local_{site}_*.pt")
        tensors, info = read_local_part(path)
        assert set(tensors) == set(_local_names())
        assert info["sharing"] == NEVER_SENT and info["site"] == site and info["final"] is True
        assert info["round"] == 1 and info["global_round"] == 2 and info["fine_tune_epochs"] == 1


def test_each_local_part_was_fine_tuned_on_the_final_global_model(job) -> None:
    import torch

    from fetalseg.local_part import check_matches_global, shared_part_hash

    state, _, sim = job
    (final_file,) = sim.rglob("FL_global_model.pt")  # what the server persisted after the last round
    final = {k: torch.as_tensor(v) for k, v in torch.load(final_file, weights_only=False)["model"].items()}
    local = [f"net.{n}" for n in _local_names()]
    want = shared_part_hash(final, local, prefix="net.")
    bundle_state = {k.removeprefix("net."): v for k, v in final.items()}
    for site in SITES:
        (path,) = state.glob(f"local_{site}_*.pt")
        tensors, info = read_local_part(path)
        assert info["global_model_sha256"] == want, site
        assert info["fine_tuned_on"] == "the job's final global model"
        # the app's check accepts this pair (the final global model of the same job) ...
        check_matches_global(tensors, info, global_state=bundle_state, global_info={"job_id": info["job_id"]})
