"""The HE option in POC mode for real (``nvflare poc prepare -he``: TenSEAL contexts provisioned by NVFlare's
HEBuilder, signed like every startup file), all on 127.0.0.1: one short HE job completes, the server receives only
CKKS ciphertext, and the final global model, decrypted with a site's key, equals plain FedAvg of the same config run
in the same federation within CKKS tolerance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nvflare_jobs.deploy import PocFederation, allow_project_components, running
from nvflare_jobs.fetal_brain.job import export_job
from nvflare_jobs.secure_aggregation.he import CLIENT_CONTEXT, SERVER_CONTEXT, add_he_builder, decrypt_global_model

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(900)]

SITES = ["site-1", "site-2", "site-3"]
HE = {"secure_aggregation": {"enabled": True, "method": "he"}}
# CKKS at scale 2^40 with one rescale (the 1/Σw multiply): ~1e-7 absolute noise per value; sums over 3 sites and
# float32 rounding of the plain job keep the difference far below this
TOLERANCE = 1e-4


class HEPocFederation(PocFederation):
    """POC whose project file carries NVFlare's HEBuilder (``poc prepare -i`` ignores ``-he``); the kits' allow
    lists also admit NVFlare's HE classes."""

    def run(self, args, **kwargs):
        if list(args[:2]) == ["poc", "prepare"]:
            add_he_builder(self.project_file)
        return super().run(args, **kwargs)

    def prepare(self) -> None:
        super().prepare()
        for name in (self.server_name, *self.sites):
            allow_project_components(self.kit(name), ["nvflare.app_opt.he."])


@pytest.fixture(scope="module")
def poc(tmp_path_factory: pytest.TempPathFactory, federation: Path, fl_env: dict) -> Iterator[PocFederation]:
    env = {**fl_env, "FETALFL_DATA_ROOT": str(federation)}
    fed = HEPocFederation(tmp_path_factory.mktemp("he_poc"), sites=SITES, env=env)
    with running(fed) as started:
        yield started
    assert fed.processes() == [], "processes of the POC system survived poc stop"


@pytest.fixture(scope="module")
def jobs(poc: PocFederation, make_config) -> dict[str, tuple[str, str, Path]]:
    """Per job: id, final status, and what ``nvflare job download`` brought back (the server's job workspace is
    moved into the job store when the job ends)."""
    out = {}
    for name, server in (("he", HE), ("plain", {})):
        config = make_config(name=f"poc_{name}", num_rounds=1, cross_site_eval=False, tracking=None, server=server)
        job_id = poc.submit(export_job(config, poc.workspace / "jobs"))
        status = poc.wait(job_id, timeout=500)
        out[name] = (job_id, status, poc.download(job_id, poc.workspace / "download" / name))
    return out


def test_contexts_are_provisioned_and_only_sites_hold_the_secret_key(poc: PocFederation) -> None:
    import tenseal as ts

    server = ts.context_from((poc.kit(poc.server_name) / "startup" / SERVER_CONTEXT).read_bytes())
    assert not server.has_secret_key()
    keys = {(poc.kit(site) / "startup" / CLIENT_CONTEXT).read_bytes() for site in SITES}
    assert len(keys) == 1  # every site holds the same context, secret key included
    assert ts.context_from(keys.pop()).has_secret_key()


def test_he_job_completes_with_only_ciphertext_at_the_server(poc: PocFederation, jobs: dict) -> None:
    _, status, result = jobs["he"]
    assert status == "FINISHED:COMPLETED"
    log = "\n".join(p.read_text(errors="replace") for p in result.rglob("log*.txt"))
    for site in SITES:
        assert f"HE check: {site} sent 46 of 46 tensors as CKKS ciphertext" in log, site
    assert "in the clear" not in log


def test_decrypted_global_model_equals_plain_fedavg(poc: PocFederation, jobs: dict) -> None:
    import torch

    assert jobs["plain"][1] == "FINISHED:COMPLETED"
    (he_file,) = jobs["he"][2].rglob("FL_global_model.pt")
    (plain_file,) = jobs["plain"][2].rglob("FL_global_model.pt")
    raw = torch.load(he_file, weights_only=False)["model"]
    assert all(isinstance(v, bytes) for v in raw.values())  # what the server stored is ciphertext
    he = decrypt_global_model(he_file, poc.kit("site-1") / "startup" / CLIENT_CONTEXT)
    plain = torch.load(plain_file, weights_only=False)["model"]
    assert set(he) == set(plain)
    diff = max(float(np.max(np.abs(he[k] - np.asarray(v, dtype=np.float64).ravel()))) for k, v in plain.items())
    moved = max(float(np.max(np.abs(np.asarray(v, dtype=np.float64)))) for v in plain.values())
    assert moved > 0 and diff < TOLERANCE, diff
