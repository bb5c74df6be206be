"""Distributed DP's noise shares and ε per trust level (privacy.secure_aggregation.distributed_dp), and the engine
that adds σ/√t and charges the site's chosen ε."""

import math

import pytest
import torch

from privacy.accounting import epsilon
from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine
from privacy.secure_aggregation.distributed_dp import DistributedNoise, parse_colluding

KW = {"sample_rate": 1.0, "steps": 10, "delta": 1e-3, "accountant": "rdp"}


def test_k3_t2_site_share_and_both_epsilons():
    d = DistributedNoise(sites=3, threshold=2, noise_multiplier=2.0)
    assert d.site_noise_multiplier == pytest.approx(2.0 / math.sqrt(2))
    assert d.server_noise_multiplier == pytest.approx(2.0)  # any 2 survivors carry σ
    assert d.colluding == 2  # default: every other site colludes
    assert d.charged_noise_multiplier == pytest.approx(d.site_noise_multiplier)
    eps = d.epsilons(**KW)
    assert eps["epsilon_server"] == pytest.approx(epsilon(noise_multiplier=2.0, **KW))
    assert eps["epsilon_local"] == pytest.approx(epsilon(noise_multiplier=math.sqrt(2), **KW))
    assert eps["epsilon_server"] < eps["epsilon_local"] == pytest.approx(eps["epsilon_charged"])


def test_collusion_of_all_others_is_exactly_local_dp():
    for k, t in [(3, 2), (5, 3), (10, 6)]:
        d = DistributedNoise(sites=k, threshold=t, noise_multiplier=3.0, colluding_sites=k - 1)
        assert d.charged_noise_multiplier == d.site_noise_multiplier
        assert d.epsilons(**KW)["epsilon_charged"] == d.epsilons(**KW)["epsilon_local"]


def test_collusion_levels_and_survivors():
    d = DistributedNoise(sites=5, threshold=3, noise_multiplier=3.0, colluding_sites=1)
    s = d.site_noise_multiplier
    assert d.effective_noise_multiplier(0) == pytest.approx(3.0)
    assert d.charged_noise_multiplier == pytest.approx(s * math.sqrt(2))  # t − c = 2 honest shares
    assert d.effective_noise_multiplier(2) == pytest.approx(s)  # own share only
    # more survivors than the threshold: more noise (a round with all 5 sites carries σ·√(5/3))
    assert d.effective_noise_multiplier(0, survivors=5) == pytest.approx(3.0 * math.sqrt(5 / 3))
    with pytest.raises(ValueError, match="survivors"):
        d.effective_noise_multiplier(0, survivors=2)  # below t the round is not unmasked at all


@pytest.mark.parametrize("bad", [{"threshold": 4}, {"colluding_sites": 3}, {"colluding_sites": -1}, {"sites": 0}])
def test_bad_parameters_fail(bad):
    with pytest.raises(ValueError):
        DistributedNoise(**{"sites": 3, "threshold": 2, "noise_multiplier": 1.0, **bad})


def test_parse_colluding():
    assert parse_colluding(None, 3) is None and parse_colluding("all", 3) is None
    assert parse_colluding("0", 3) == 0
    with pytest.raises(ValueError):
        parse_colluding("3", 3)
    with pytest.raises(ValueError):
        parse_colluding("server", 3)


def _config(**kw):
    base = dict(noise_multiplier=2.0, full_batch=True, distributed=True, distributed_sites=3,
                distributed_threshold=2, planned_rounds=4, local_epochs=1, delta=1e-3, seed=0)  # fmt: skip
    return DPSGDConfig.from_dict({**base, **kw})


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"full_batch": False}, "full_batch"),
        ({"local_epochs": 2}, "one local epoch"),
        ({"ema_decay": 0.9}, "ema_decay"),
        ({"distributed": False}, "need distributed"),
        ({"distributed_threshold": None}, "go together"),
    ],
)
def test_config_refuses_what_would_not_add_up(kw, match):
    with pytest.raises(ValueError, match=match):
        _config(**kw)


def test_engine_adds_the_share_and_charges_the_trust_level():
    conservative = SitePrivacyEngine(config=_config(), dataset_size=8, batch_size=None)
    trusting = SitePrivacyEngine(config=_config(colluding_sites=0), dataset_size=8, batch_size=None)
    for e in (conservative, trusting):
        assert e.noise_multiplier == pytest.approx(2.0 / math.sqrt(2))  # the noise actually added
    rep_c = conservative.report()["distributed_dp"]
    rep_t = trusting.report()["distributed_dp"]
    assert conservative.planned_epsilon == pytest.approx(rep_c["planned_epsilon_local"])
    assert trusting.planned_epsilon == pytest.approx(rep_t["planned_epsilon_server"])
    assert rep_t["planned_epsilon_server"] < rep_c["planned_epsilon_charged"]
    details = trusting.ledger_details(planned=True)["distributed_dp"]
    assert details["epsilon_server"] == pytest.approx(rep_t["planned_epsilon_server"])
    assert details["epsilon_local"] == pytest.approx(rep_c["planned_epsilon_local"])


def test_engine_measures_the_noise_it_adds():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2000))
    data = torch.utils.data.TensorDataset(torch.randn(8, 4, 4), torch.randn(8, 2000))
    engine = SitePrivacyEngine(config=_config(), dataset_size=8, batch_size=None)
    wrapped, opt, loader = engine.make_private(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(data),
    )
    loss_fn = engine.wrap_loss(torch.nn.MSELoss())
    for x, y in loader:
        opt.zero_grad()
        loss_fn(wrapped(x), y).backward()
        opt.step()
    (measured,) = engine.measured_noise_multipliers
    assert measured == pytest.approx(2.0 / math.sqrt(2), rel=0.02)  # 34,000 draws: ±0.4 %
    assert engine.report()["distributed_dp"]["measured_noise_multiplier_last"] == measured


def test_engine_refuses_adam():
    model = torch.nn.Linear(4, 1)
    engine = SitePrivacyEngine(config=_config(), dataset_size=8, batch_size=None)
    data = torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randn(8, 1))
    with pytest.raises(ValueError, match="SGD"):
        engine.make_private(
            model=model, optimizer=torch.optim.AdamW(model.parameters()), data_loader=torch.utils.data.DataLoader(data)
        )
