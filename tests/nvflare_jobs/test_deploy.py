"""Deployment helpers: project file, allow lists and site policies, written through NVFlare's own config files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from nvflare_jobs.deploy import (
    COMPONENT_PREFIXES,
    PROJECT_TEMPLATE,
    SITES_DIR,
    allow_project_components,
    install_site_policy,
    is_allowed,
    render_project,
)


def test_project_names_the_server_localhost_so_it_binds_loopback(tmp_path: Path) -> None:
    project = yaml.safe_load(render_project(tmp_path / "p.yml", fed_port=4001, admin_port=4002).read_text())
    (server,) = [p for p in project["participants"] if p["type"] == "server"]
    assert (server["name"], server["fed_learn_port"], server["admin_port"]) == ("localhost", 4001, 4002)
    assert sorted(p["name"] for p in project["participants"] if p["type"] == "client") == ["site-1", "site-2", "site-3"]
    assert [p["role"] for p in project["participants"] if p["type"] == "admin"] == ["project_admin"]
    two = yaml.safe_load(render_project(tmp_path / "q.yml", fed_port=1, admin_port=2, sites=["a", "b"]).read_text())
    assert [p["name"] for p in two["participants"] if p["type"] == "client"] == ["a", "b"]
    assert yaml.safe_load(PROJECT_TEMPLATE.read_text())["name"] == project["name"]


def test_allow_list_is_extended_not_replaced(tmp_path: Path) -> None:
    local = tmp_path / "kit" / "local"
    local.mkdir(parents=True)
    (local / "resources.json.default").write_text(json.dumps({"format_version": 2, "class_allow_list": ["a.b.C"]}))
    written = json.loads(allow_project_components(tmp_path / "kit").read_text())
    assert written["class_allow_list"] == ["a.b.C", *COMPONENT_PREFIXES]
    again = json.loads(allow_project_components(tmp_path / "kit").read_text())  # idempotent
    assert again["class_allow_list"] == written["class_allow_list"]
    assert is_allowed("nvflare_jobs.guard.UpdateGuard", again["class_allow_list"])
    assert not is_allowed("nvflare_jobsX.evil.Thing", again["class_allow_list"])
    assert not is_allowed("a.b.Cx", again["class_allow_list"])


@pytest.mark.parametrize("site", ["site-1", "site-2", "site-3"])
def test_demo_site_policies_define_the_documented_scopes(site: str, tmp_path: Path) -> None:
    from nvflare_jobs.site_policy import RequireDPSGD

    policy = json.loads((SITES_DIR / site / "privacy.json").read_text())
    scopes = {s["name"]: s for s in policy["scopes"]}
    assert set(scopes) == {"standard", "percentile", "dp_required", "statistics"} and policy["default_scope"] in scopes
    (limit,) = scopes["statistics"]["task_data_filters"]  # statistics requests checked before any task runs
    assert limit["path"] == "nvflare_jobs.site_policy.LimitStatistics"
    paths = [f["path"] for f in scopes["dp_required"]["task_result_filters"]]
    assert paths == ["nvflare_jobs.site_policy.RequireDPSGD", "privacy.nvflare_filters.FailClosedPercentilePrivacy"]
    RequireDPSGD(**scopes["dp_required"]["task_result_filters"][0]["args"])  # the arguments are valid
    # the same policy on incoming tasks: a job planning more ε than allowed is refused before it trains
    assert scopes["dp_required"]["task_data_filters"] == scopes["dp_required"]["task_result_filters"][:1]
    (tmp_path / "local").mkdir()
    assert json.loads(install_site_policy(tmp_path, SITES_DIR / site / "privacy.json").read_text()) == policy
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(json.JSONDecodeError):
        install_site_policy(tmp_path, tmp_path / "bad.json")
