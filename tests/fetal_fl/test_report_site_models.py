"""The demo report's per-site table (issue 24): public model alone, DP global, DP global + the site's local part,
each scored on the site's own held-out cases, with one plain sentence on what each number protects; built from real
results (tiny federation, real checkpoints and local parts installed through the app's own install, real scores),
not from a full demo run. And the demo's closing steps name the Slicer module that exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fetal_fl import demo
from fetal_fl.report import PRIVATE, PRIVATE_LOCAL, PUBLIC, DemoRun, write_report
from fetalseg.baseline import load_sites
from fetalseg.bundle import Bundle, save_checkpoint
from fetalseg.local_part import save_local_part, shared_part_hash
from fetalseg.subspace import parameter_names

REPO = Path(__file__).resolve().parents[2]
EPS = {"site-1": 3.1, "site-2": 3.2, "site-3": 3.3}


@pytest.fixture(scope="module")
def run(tiny_federation: list[Path], tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("demo_report")
    splits = load_sites(tiny_federation, seed=0)
    sites = [s.site for s in splits]
    bundle = Bundle("train", variant="tiny")
    torch.manual_seed(0)
    public = save_checkpoint(bundle.network(), out / "public" / "model.pt", origin="public")
    torch.manual_seed(1)
    network = bundle.network()
    ckpt = save_checkpoint(network, out / "fl" / "fetal_brain_best.pt", origin="nvflare", job_id="job-1", round=3)
    names = parameter_names(network, demo.LOCAL_PARAMETERS)
    params = dict(network.named_parameters())
    parts: dict[str, Path] = {}
    for i, site in enumerate(sites[:2]):  # the third site has no local part: it serves the DP global model alone
        tensors = {n: params[n].detach() * (1.0 + 0.1 * (i + 1)) for n in names}
        parts[site] = save_local_part(
            tensors, out / "state" / f"local_{site}_job-1.pt", parameters=demo.LOCAL_PARAMETERS, site=site,
            job_id="job-1", final=True, global_round=3, training_cases=2, fine_tune_epochs=2,
            global_model_sha256=shared_part_hash(network.state_dict(), tensors),
        )  # fmt: skip
    assert demo.local_parts(out / "state", sites) == parts
    experiments = []
    s, ev = demo.evaluate_checkpoint(public, splits, bundle)
    experiments.append(demo.Experiment(PUBLIC, ev["summary"], s, None, public))
    s, ev = demo.evaluate_checkpoint(ckpt, splits, bundle)
    experiments.append(demo.Experiment(PRIVATE, ev["summary"], s, dict(EPS), ckpt))
    s, ev = demo.evaluate_site_models(ckpt, parts, splits, bundle)
    experiments.append(demo.Experiment(PRIVATE_LOCAL, ev["summary"], s, None, ckpt))
    installed = {
        site: demo.install_into_app(ckpt, demo.site_model_path(out, site), "tiny", local_part=parts.get(site))
        for site in sites
    }
    size = demo.SIZES["quick"]
    config = demo.job_config(size, tiny_federation[0].parent, sites, rounds=3, seed=0, private=True, poc=False)
    rows = [{"round": 0, "sites": {site: {"dp_epsilon": EPS[site], "dp_delta": 1e-5} for site in sites}}]
    command = demo.server_command(out / "studies", demo.site_model_path(out, sites[0]), "tiny", 8000)
    (out / "job").mkdir()
    return DemoRun(
        out=out, size="quick", shape=32, cases_per_site=4, variant="tiny", rounds=3, local_epochs=1,
        mode="simulator", sites=sites, splits=splits, bundle=bundle, experiments=experiments, private_rows=rows,
        plain_rows=[], job_config=config, job_dir=out / "job", installed=installed[sites[0]],
        server_command=command, site_state=out / "state", installed_sites=installed,
    )  # fmt: skip


def _table(report: str) -> dict[str, list[str]]:
    section = report.split("## The model each site serves", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| site-")]
    return {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in rows}


def test_each_site_has_public_dp_global_and_served_model_from_its_own_held_out_cases(run: DemoRun) -> None:
    report = write_report(run).read_text()
    table = _table(report)
    assert sorted(table) == run.sites
    by_name = {e.name: e.summary for e in run.experiments}
    for site, cells in table.items():
        public, dp_global, served, part, eps = cells
        assert public == f"{by_name[PUBLIC][site]['mean']['dice']:.3f}"
        assert dp_global == f"{by_name[PRIVATE][site]['mean']['dice']:.3f}"
        assert eps == f"{EPS[site]:.2f}"
        if site == "site-3":  # no local part: it serves (and the table says) the DP global model alone
            assert served == dp_global and part.startswith("none installed")
        else:
            assert served == f"{by_name[PRIVATE_LOCAL][site]['mean']['dice']:.3f}"
            assert part.startswith(f"{demo.LOCAL_PARAMETERS}: ") and "2 training cases" in part
    # the local part changed what site-1 and site-2 serve, and only there
    assert by_name[PRIVATE_LOCAL]["site-3"] == by_name[PRIVATE]["site-3"]
    assert by_name[PRIVATE_LOCAL]["site-1"] != by_name[PRIVATE]["site-1"]


def test_one_plain_sentence_says_what_each_number_protects(run: DemoRun) -> None:
    section = write_report(run).read_text().split("## The model each site serves", 1)[1].split("\n## ", 1)[0]
    public, dp_global, local = (line for line in section.splitlines() if line.startswith("- **"))
    assert public.startswith("- **Public model alone:**") and "costs no ε" in public
    assert dp_global.startswith("- **DP global (the shared part):**")
    for words in ("δ = 1e-05", "per patient", "accountant", "differentially private"):
        assert words in dp_global, words
    assert local.startswith("- **DP global + local part:**")
    for words in ("WITHOUT differential privacy", "never leaves the site", "not shared", "no ε"):
        assert words in local, words


def test_each_sites_app_serves_the_dp_global_model_with_its_own_local_part(run: DemoRun) -> None:
    from apps.fetal_brain.lib.config import AppConfig
    from apps.fetal_brain.lib.model_store import ModelStore

    for site in run.sites:
        local = run.installed_sites[site]["parts"]["local"]
        path = demo.site_model_path(run.out, site)
        assert (path.with_name("local_part.pt").is_file()) == (local is not None)
        if local is not None:
            assert local["matches_global"] is True and local["job_id"] == "job-1"
        bundle = AppConfig.from_conf({"variant": "tiny"}, env={}).bundle("inference")
        ModelStore(path, bundle=bundle).current()  # the pair loads: the app would serve it


def test_results_json_lists_what_each_site_serves(run: DemoRun) -> None:
    import json

    write_report(run)
    results = json.loads((run.out / "report" / "results.json").read_text())
    assert PRIVATE_LOCAL in results["experiments"] and sorted(results["installed_sites"]) == run.sites


def test_the_closing_steps_name_the_slicer_module_that_exists() -> None:
    steps = demo.next_steps(demo.server_command(Path("studies"), Path("app/site-1/model.pt"), None, 8000))
    assert any("install the FetalBrainSeg module" in line for line in steps)
    assert not any("FetalSeg " in line for line in steps)
    assert (REPO / "slicer_extension" / demo.SLICER_MODULE).is_dir()


def test_the_private_job_keeps_a_local_part_and_the_final_evaluation(tiny_federation: list[Path]) -> None:
    """The demo's private job config is valid, has a local part fine-tuned at every size, and brings the final
    global model to the sites (without the final evaluation the fine-tune is refused)."""
    from nvflare_jobs.config import JobConfig

    for size in demo.SIZES.values():
        cfg = demo.job_config(
            size, tiny_federation[0].parent, ["site-1", "site-2"], rounds=2, seed=0, private=True, poc=False
        )
        job = JobConfig.from_dict(cfg)
        assert job.local_parameters == demo.LOCAL_PARAMETERS and job.local_fine_tune_epochs > 0
        assert job.cross_site_eval
    plain = demo.job_config(
        demo.SIZES["quick"], tiny_federation[0].parent, ["site-1", "site-2"], rounds=2, seed=0, private=False, poc=False
    )
    assert "local" not in plain
