"""ClientDPFilter at a site: its round count lives in the site's state folder, and with a site ledger every noised
update is charged (ε against any change of the site's data, δ, accountant, unit) before it leaves, on the dataset
of the site's data folder (the job hands the filter its data.root; the site's environment wins); an update that
does not fit the dataset's budget, or whose dataset is unknown, is refused before it is noised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.workspace import Workspace

from fetalseg.site_env import ENV_DATA_ROOT, ENV_PRIVACY_LEDGER, ENV_SITE_DATA, ENV_SITE_STATE
from privacy.filters import CLIENT_DP_UNIT
from privacy.ledger import PrivacyBudgetExceeded, SiteLedger
from privacy.nvflare_filters import REPORT_META_KEY, ClientDPFilter
from tests.privacy.test_nvflare_filters import diff_shareable

SITE, JOB = "site-1", "job-a"
DATA_ROOT = "/data/federation"  # the job's data.root: the site's cases are in <root>/<site>


def client_dp(**args) -> ClientDPFilter:
    """The filter as the project's job builds it: handed the job's data.root."""
    return ClientDPFilter(data_root=DATA_ROOT, **args)


def site_context(root: Path) -> FLContext:
    """The context a filter sees in a site's job process: identity, job id and the site's workspace."""
    for folder in ("startup", "local"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    workspace = Workspace(root_dir=str(root), site_name=SITE)
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, SITE, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, JOB, private=False, sticky=False)
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, workspace, private=True, sticky=False)
    return ctx


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FLContext, SiteLedger]:
    ledger = SiteLedger.init(tmp_path / "ledger.jsonl", epsilon_budget=1e6, delta_budget=0.5)
    monkeypatch.setenv(ENV_PRIVACY_LEDGER, str(ledger.path))
    monkeypatch.delenv(ENV_SITE_STATE, raising=False)
    monkeypatch.delenv(ENV_SITE_DATA, raising=False)
    monkeypatch.delenv(ENV_DATA_ROOT, raising=False)
    return site_context(tmp_path / "ws"), ledger


def spends(ledger: SiteLedger) -> list[dict]:
    ledger.reload()
    return [r for r in ledger.records if r["type"] == "spend"]


def test_each_noised_update_is_charged_to_the_site_ledger(site) -> None:
    ctx, ledger = site
    filt = client_dp(clip_norm=0.5, noise_multiplier=3.0, delta=1e-6, adjacency="add_remove")
    reports = [from_shareable(filt.process(diff_shareable(), ctx)).get_meta_prop(REPORT_META_KEY)[-1] for _ in "ab"]
    rows = spends(ledger)
    assert [r["round"] for r in rows] == [0, 1] and [r["rounds"] for r in rows] == [1, 2]
    for n, (row, report) in enumerate(zip(rows, reports, strict=True), start=1):
        # the dataset DP-SGD charges (<site>/<data folder>), under the job's own client-DP entry
        assert row["dataset_id"] == f"{SITE}/{SITE}" and row["job_id"] == f"{JOB}/client_dp"
        # add_remove's ε does not cover one case changing: the ledger gets the ε against any change of the data
        assert row["epsilon"] == pytest.approx(filt.config.epsilon_any_change(n))
        assert row["epsilon"] > filt.config.epsilon(n)
        assert report["details"]["epsilon"] == pytest.approx(filt.config.epsilon(n))
        assert report["details"]["ledger"]["epsilon"] == pytest.approx(row["epsilon"])
        assert row["delta"] == 1e-6 and row["accountant"] == filt.config.accountant and row["unit"] == CLIENT_DP_UNIT
        assert row["mechanism"] == "client_dp" and row["noise_multiplier"] == 3.0 and row["clip_norm"] == 0.5
    assert ledger.spent(f"{SITE}/{SITE}").epsilon == pytest.approx(rows[-1]["epsilon"])  # cumulative, not summed
    # the round count survives a restart of the site's client: it is in the job's app folder by default
    state = Path(ctx.get_prop(FLContextKey.WORKSPACE_OBJECT).get_app_dir(JOB)) / "privacy_state"
    assert json.loads((state / f"client_dp_{SITE}_{JOB}.json").read_text())["rounds"] == 2
    restarted = client_dp(clip_norm=0.5, noise_multiplier=3.0, delta=1e-6, adjacency="add_remove")
    third = from_shareable(restarted.process(diff_shareable(), ctx)).get_meta_prop(REPORT_META_KEY)[-1]
    assert third["details"]["rounds"] == 3 and spends(ledger)[-1]["round"] == 2


def test_an_update_over_the_budget_is_refused_before_it_is_noised(site) -> None:
    ctx, ledger = site
    filt = client_dp(clip_norm=1.0, noise_multiplier=4.0)
    eps1, eps2 = filt.config.epsilon(1), filt.config.epsilon(2)
    ledger.set_budget(dataset_id=f"{SITE}/{SITE}", epsilon_budget=(eps1 + eps2) / 2, delta_budget=1e-3)
    filt.process(diff_shareable(), ctx)  # round 1 fits
    with pytest.raises(PrivacyBudgetExceeded):  # NVFlare then replies TASK_RESULT_FILTER_ERROR: nothing is sent
        filt.process(diff_shareable(), ctx)
    assert [r["epsilon"] for r in spends(ledger)] == [pytest.approx(eps1)]
    assert filt.client_accountant is not None and filt.client_accountant.rounds == 1  # round 2 was never noised


def test_with_a_ledger_an_update_whose_dataset_is_unknown_is_refused(site) -> None:
    ctx, ledger = site  # a filter not handed a data root (e.g. from a site's privacy.json), no site data variable
    with pytest.raises(ValueError, match="refusing to send an uncharged update"):
        ClientDPFilter(clip_norm=1.0, noise_multiplier=1.0).process(diff_shareable(), ctx)
    assert spends(ledger) == []


def test_the_sites_data_variable_names_the_dataset_it_charges(site, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx, ledger = site
    monkeypatch.setenv(ENV_SITE_DATA, "/hospital/feta_2025")  # set once at the site: wins over the job's data.root
    client_dp(clip_norm=1.0, noise_multiplier=1.0).process(diff_shareable(), ctx)
    monkeypatch.delenv(ENV_SITE_DATA)
    monkeypatch.setenv(ENV_DATA_ROOT, "/hospital")  # a folder holding <site>/
    ClientDPFilter(clip_norm=1.0, noise_multiplier=1.0).process(diff_shareable(), ctx)  # no data root handed over
    assert [r["dataset_id"] for r in spends(ledger)] == [f"{SITE}/feta_2025", f"{SITE}/{SITE}"]
