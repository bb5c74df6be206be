"""The exported job folder: what `nvflare job submit -j` receives, built from one config file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nvflare_jobs.config import CONFIG_FILE_NAME
from nvflare_jobs.deploy import COMPONENT_PREFIXES, is_allowed, job_component_paths
from nvflare_jobs.fetal_brain.job import DEFAULT_CONFIG, build_recipe, export_job

REPO = Path(__file__).resolve().parents[3]


def _read(job: Path, app: str) -> dict:
    name = "config_fed_server.json" if app == "app_server" else "config_fed_client.json"
    return json.loads((job / app / "config" / name).read_text())


def _filters(client_cfg: dict) -> list[tuple[list[str], str, dict]]:
    return [
        (entry["tasks"], f["path"], f["args"]) for entry in client_cfg["task_result_filters"] for f in entry["filters"]
    ]


def _config() -> dict:
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["scope"] = "dp_required"
    cfg["privacy"] = {
        "filters": [{"type": "percentile", "percentile": 90, "gamma": 0.02}],
        "sites": {"site-2": {"filters": [{"type": "svt", "epsilon_release": 2.0}]}},
    }
    return cfg


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_job(_config(), tmp_path_factory.mktemp("jobs"))


def test_job_folder_layout_and_meta(exported: Path) -> None:
    meta = json.loads((exported / "meta.json").read_text())
    assert meta["name"] == "fetal_brain_fedavg" and meta["min_clients"] == 2 and meta["scope"] == "dp_required"
    assert set(meta["deploy_map"]) == {"app_server", "app_site-1", "app_site-2", "app_site-3"}
    for site in ("site-1", "site-2", "site-3"):
        custom = exported / f"app_{site}" / "custom"
        assert sorted(p.name for p in custom.iterdir()) == ["client.py", CONFIG_FILE_NAME]
        assert json.loads((custom / CONFIG_FILE_NAME).read_text()) == _config()  # the clients read what was built
    assert not (exported / "app_server" / "custom").exists()  # nothing of ours is copied: sites install it


def test_clients_send_weight_diffs_through_the_configured_filters(exported: Path) -> None:
    for site in ("site-1", "site-2", "site-3"):
        client = _read(exported, f"app_{site}")
        executor = client["executors"][0]["executor"]
        assert executor["args"]["params_transfer_type"] == "DIFF"
        assert executor["args"]["command"][:3] == ["python3", "-u", "custom/client.py"]
        filters = _filters(client)
        assert filters[0] == (
            ["train"],
            "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
            {"percentile": 90, "gamma": 0.02, "data_kinds": ["WEIGHT_DIFF"]},
        )
        svt = [f for f in filters if f[1].endswith("SVTPrivacy")]
        if site == "site-2":
            assert svt and svt[0][2]["epsilon_release"] == 2.0 and svt[0][2]["data_kinds"] == ["WEIGHT_DIFF"]
        else:
            assert not svt


def test_server_selects_on_dice_guards_updates_and_writes_the_bundle_checkpoint(exported: Path) -> None:
    server = _read(exported, "app_server")
    workflows = {w["id"]: w for w in server["workflows"]}
    assert workflows["controller"]["path"] == "nvflare_jobs.controllers.FetalFedAvg"
    assert workflows["controller"]["args"]["min_clients"] == 2
    assert any(w["path"].endswith("CrossSiteModelEval") for w in workflows.values())
    comps = {c["id"]: c for c in server["components"]}
    assert comps["model_selector"]["args"]["key_metric"] == "val_mean_dice"
    assert comps["persistor"]["args"]["model"]["path"] == "nvflare_jobs.fetal_brain.model.FetalBrainNet"
    assert comps["bundle_checkpoint"]["path"] == "nvflare_jobs.checkpoint.BundleCheckpointWriter"
    assert comps["receiver"]["path"].endswith("TBAnalyticsReceiver")
    (entry,) = server["task_result_filters"]
    assert entry["tasks"] == ["train"] and entry["filters"][-1]["path"] == "nvflare_jobs.guard.UpdateGuard"


def test_sites_allow_every_class_the_job_builds(exported: Path) -> None:
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    allow = [*DEFAULT_CLASS_ALLOW_LIST, *COMPONENT_PREFIXES]
    assert [p for p in job_component_paths(exported) if not is_allowed(p, allow)] == []


@pytest.mark.parametrize(
    ("algorithm", "controller", "extra"),
    [
        ("fedprox", "nvflare_jobs.controllers.FetalFedAvg", {"fedprox_mu": 0.05}),
        ("fedopt", "nvflare_jobs.controllers.FetalFedOpt", {}),
    ],
)
def test_algorithm_is_one_config_line(tmp_path: Path, algorithm: str, controller: str, extra: dict) -> None:
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["algorithm"] = {"name": "fedprox", "mu": 0.05} if algorithm == "fedprox" else "fedopt"
    args = _read(export_job(cfg, tmp_path), "app_server")["workflows"][0]
    assert args["path"] == controller
    for key, value in extra.items():
        assert args["args"][key] == value
    if algorithm == "fedopt":
        assert args["args"]["optimizer_args"]["path"] == "torch.optim.SGD"
        assert args["args"]["source_model"]["path"] == "nvflare_jobs.fetal_brain.model.FetalBrainNet"


def test_sparse_sharing_adds_the_server_decoder_before_the_guard(tmp_path: Path) -> None:
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["privacy"] = {"filters": [{"type": "sparse_percentile", "percentile": 90}]}
    job = export_job(cfg, tmp_path)
    (entry,) = _read(job, "app_server")["task_result_filters"]
    assert [f["path"] for f in entry["filters"]] == [
        "nvflare_jobs.audit.ServerAuditFilter",  # hashes what arrived, before anything changes it
        "privacy.nvflare_filters.SparseUpdateDecoder",
        "nvflare_jobs.guard.UpdateGuard",
    ]


def test_bad_filter_arguments_fail_when_the_job_is_built() -> None:
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["privacy"] = {"filters": [{"type": "client_dp", "clip_norm": -1.0, "noise_multiplier": 1.0}]}
    with pytest.raises(ValueError, match=r"ClientDPFilter.*clip"):
        build_recipe(cfg)


def test_per_site_overrides_must_name_configured_sites() -> None:
    with pytest.raises(ValueError, match="site-9"):
        build_recipe(DEFAULT_CONFIG, per_site_config={"site-9": {}})


def test_job_py_exports_from_the_command_line(tmp_path: Path) -> None:
    """`python -m nvflare_jobs.fetal_brain.job --export --export-dir DIR` (NVFlare strips the export flags)."""
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent)}
    cmd = [sys.executable, "-m", "nvflare_jobs.fetal_brain.job", "--config", str(DEFAULT_CONFIG)]
    proc = subprocess.run(
        [*cmd, "--export", "--export-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "fetal_brain_fedavg" / "meta.json").is_file()


def test_client_level_dp_filter_exports_with_its_parameters(tmp_path: Path) -> None:
    """NVFlare rebuilds filters from same-named attributes: every ClientDPFilter argument must survive export."""
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["privacy"] = {"filters": [{"type": "client_dp", "clip_norm": 0.5, "noise_multiplier": 1.2}]}
    job = export_job(cfg, tmp_path)
    dp = [f for f in _filters(_read(job, "app_site-1")) if f[1] == "privacy.nvflare_filters.ClientDPFilter"]
    assert len(dp) == 1
    args = dp[0][2]
    assert args["clip_norm"] == 0.5 and args["noise_multiplier"] == 1.2
    assert args.get("accountant", "rdp") == "rdp"  # the exporter leaves default values out


def test_a_site_policy_filter_in_the_job_also_checks_incoming_tasks(tmp_path: Path) -> None:
    """A job's own RequireDPSGD also runs on the task data, so its plan is checked before the site trains."""
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    policy = {"type": "class", "path": "nvflare_jobs.site_policy.RequireDPSGD", "args": {"max_epsilon": 8.0}}
    cfg["privacy"] = {"filters": [], "sites": {"site-2": {"filters": [policy]}}}
    job = export_job(cfg, tmp_path)
    for site in ("site-1", "site-2"):
        client = _read(job, f"app_{site}")
        incoming = [(e["tasks"], f["path"], f["args"]) for e in client["task_data_filters"] for f in e["filters"]]
        outgoing = [f for f in _filters(client) if f[1] == policy["path"]]
        if site == "site-2":
            assert incoming == outgoing == [(["train"], policy["path"], {"max_epsilon": 8.0})]
        else:
            assert incoming == outgoing == []


def test_sites_ask_for_the_next_task_without_nvflares_two_second_pause(tmp_path: Path) -> None:
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    assert _read(export_job(cfg, tmp_path / "a"), "app_server")["server"] == {"task_request_interval": 0.1}
    cfg["server"]["task_request_interval_s"] = 2.0
    assert _read(export_job(cfg, tmp_path / "b"), "app_server")["server"] == {"task_request_interval": 2.0}


def _bundle_checkpoint(path: Path, seed: int = 5) -> dict:
    """A bundle-format checkpoint (as `fetal-fl`, the app or MONAI's CheckpointSaver write it); its weights."""
    from fetalseg.bundle import save_checkpoint
    from nvflare_jobs.fetal_brain.model import FetalBrainNet

    net = FetalBrainNet({}, init_seed=seed).net
    save_checkpoint(net, path, note="pretrained on public data")
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_an_initial_checkpoint_travels_in_the_job_folder_with_the_job_keys(tmp_path: Path) -> None:
    import torch

    from nvflare_jobs.fetal_brain.job import INITIAL_MODEL_NAME
    from nvflare_jobs.fetal_brain.model import PREFIX

    weights = _bundle_checkpoint(tmp_path / "public.pt")
    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["initial_checkpoint"] = str(tmp_path / "public.pt")
    job = export_job(cfg, tmp_path / "jobs")
    custom = job / "app_server" / "custom"
    assert sorted(p.name for p in custom.iterdir()) == [INITIAL_MODEL_NAME]  # self-contained: no server-side path
    components = {c["id"]: c for c in _read(job, "app_server")["components"]}
    assert components["persistor"]["args"]["source_ckpt_file_full_name"] == INITIAL_MODEL_NAME
    staged = torch.load(custom / INITIAL_MODEL_NAME, weights_only=True)["model"]
    assert set(staged) == {PREFIX + k for k in weights}
    assert all(torch.equal(staged[PREFIX + k], v) for k, v in weights.items())
    provenance = components["bundle_checkpoint"]["args"]["initialized_from"]
    assert provenance["file"] == "public.pt" and len(provenance["sha256_prefix"]) == 16
    assert provenance["info"] == {"note": "pretrained on public data"}


def test_an_initial_checkpoint_that_is_missing_or_does_not_fit_fails_when_the_job_is_built(tmp_path: Path) -> None:
    import torch

    cfg = json.loads(DEFAULT_CONFIG.read_text())
    cfg["initial_checkpoint"] = str(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="does not exist"):
        build_recipe(cfg)
    weights = _bundle_checkpoint(tmp_path / "other.pt")
    first = next(iter(weights))
    weights[first] = torch.zeros(3)  # another architecture
    torch.save({"model": weights}, tmp_path / "other.pt")
    cfg["initial_checkpoint"] = str(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit the job's network"):
        build_recipe(cfg)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cfg["initial_checkpoint"] = str(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="does not fit"):
        build_recipe(cfg)
