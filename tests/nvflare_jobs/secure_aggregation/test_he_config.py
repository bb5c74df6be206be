"""The HE option's configuration (no NVFlare run): what needs plaintext at the server is refused, the exported job
places the encryptor after every other result filter, and a job that would filter after encryption is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nvflare_jobs.config import ConfigError, JobConfig
from nvflare_jobs.secure_aggregation.he import ENCRYPTOR, check_encryptor_last, check_exported_job
from tests.nvflare_jobs.conftest import tiny_config

HE = {"secure_aggregation": {"enabled": True, "method": "he"}}


def he_config(**changes) -> dict:
    return tiny_config(Path("/nonexistent"), **{"cross_site_eval": False, "server": HE, **changes})


def test_method_defaults_to_masking_and_he_is_parsed() -> None:
    masked = JobConfig.from_dict(tiny_config(Path("/x"), server={"secure_aggregation": {"enabled": True}}))
    assert masked.secagg_method == "masking" and masked.secagg_threshold == 2
    he = JobConfig.from_dict(he_config())
    # one site colluding with the server decrypts everything under HE: its "threshold" is 1
    assert he.secure_aggregation and he.secagg_method == "he" and he.secagg_threshold == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"algorithm": "fedopt"}, "server optimiser"),
        ({"algorithm": {"name": "fedprox", "mu": 0.1}}, "proximal"),
        ({"cross_site_eval": True}, "cross_site_eval"),
        ({"server": {"aggregation": {"method": "median"}, **HE}}, "server.aggregation"),
        ({"server": {"secure_aggregation": {"enabled": True, "method": "he", "threshold": 2}}}, "pairwise-masking"),
        ({"server": {"secure_aggregation": {"enabled": True, "method": "paillier"}}}, "'masking' or 'he'"),
    ],
)
def test_what_needs_plaintext_at_the_server_is_refused(changes: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        JobConfig.from_dict(he_config(**changes))


def test_exported_job_encrypts_after_every_other_filter(tmp_path: Path) -> None:
    from nvflare_jobs.fetal_brain.job import export_job

    cfg = he_config(privacy={"filters": [{"type": "percentile", "percentile": 10, "gamma": 0.01}]})
    job = export_job(cfg, tmp_path)
    for site in ("site-1", "site-2", "site-3"):
        client = json.loads((job / f"app_{site}" / "config" / "config_fed_client.json").read_text())
        chain = [f["path"] for g in client["task_result_filters"] for f in g["filters"]]
        assert chain[-1] == ENCRYPTOR, chain
        assert any("PercentilePrivacy" in p for p in chain[:-1]), chain
        assert [f["path"] for g in client["task_data_filters"] for f in g["filters"]] == [
            "nvflare.app_opt.he.model_decryptor.HEModelDecryptor"
        ]
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert server["workflows"][0]["path"].endswith("ScatterAndGather")
    paths = {c["path"] for c in server["components"]}
    assert "nvflare.app_opt.he.intime_accumulate_model_aggregator.HEInTimeAccumulateWeightedAggregator" in paths
    assert not any("BundleCheckpointWriter" in p or "UpdateGuard" in p for p in paths)
    # a filter appended after the encryptor (by hand, or by a later edit of the builder) is refused
    client = json.loads((job / "app_site-2" / "config" / "config_fed_client.json").read_text())
    client["task_result_filters"].append({"tasks": ["train"], "filters": [{"path": "x.LateFilter", "args": {}}]})
    (job / "app_site-2" / "config" / "config_fed_client.json").write_text(json.dumps(client))
    with pytest.raises(ConfigError, match=r"\['x.LateFilter'\] come after the encryptor"):
        check_exported_job(job, "train")


def test_a_chain_without_the_encryptor_is_refused() -> None:
    with pytest.raises(ConfigError, match="in the clear"):
        check_encryptor_last({"task_result_filters": [{"tasks": ["train"], "filters": [{"path": "a.B"}]}]}, "train")
    # a filter for another task after the encryptor does not touch train results
    check_encryptor_last(
        {"task_result_filters": [{"tasks": ["train"], "filters": [{"path": ENCRYPTOR}]},
                                 {"tasks": ["validate"], "filters": [{"path": "a.B"}]}]},
        "train",
    )  # fmt: skip


def test_the_server_refuses_a_plaintext_update_and_passes_ciphertext() -> None:
    import numpy as np
    import tenseal as ts
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext

    from nvflare_jobs.secure_aggregation.he import HECiphertextCheck, make_contexts

    check = HECiphertextCheck()
    plain = DXO(DataKind.WEIGHT_DIFF, data={"w": np.ones(4, dtype=np.float32)}).to_shareable()
    with pytest.raises(ValueError, match="plaintext"):
        check.process(plain, FLContext())
    _, client = make_contexts()
    ctx = ts.context_from(client)
    enc = DXO(DataKind.WEIGHT_DIFF, data={"w": ts.ckks_vector(ctx, [1.0, 2.0])}).to_shareable()
    assert check.process(enc, FLContext()) is enc
    assert ts.context_from(make_contexts()[0]).has_secret_key() is False  # the server's context cannot decrypt


def test_a_site_requiring_a_threshold_of_two_refuses_an_he_job() -> None:
    from nvflare_jobs.site_policy import PolicyViolationError, check_secure_aggregation

    he = JobConfig.from_dict(he_config())
    check_secure_aggregation(he)  # HE is secure aggregation against the server alone...
    with pytest.raises(PolicyViolationError, match="threshold 1"):  # ...but one colluding site decrypts everything
        check_secure_aggregation(he, min_threshold=2)
