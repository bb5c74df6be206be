"""DP-SGD engine: configuration checks, per-sample gradients on the 3D U-Net, Poisson sampling, accounting, state."""

from __future__ import annotations

import json

import pytest
import torch
from opacus.grad_sample import prepare_module
from opacus.optimizers import get_optimizer_class
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch.utils.data import DataLoader

from fetalseg.training import train_epoch, train_step
from privacy.accounting import epsilon
from privacy.dpsgd import (
    DEFAULT_GRAD_SAMPLE_MODE,
    GRAD_SAMPLE_MODES,
    SCOPE,
    DPSGDConfig,
    LoopGradSampleModule,
    LoopLoss,
    PerSampleLoss,
    SitePrivacyEngine,
    VmapGradSampleModule,
    VmapLoss,
    strip_module_prefix,
)
from privacy.ledger import PrivacyBudgetExceeded, SiteLedger
from tests.privacy.conftest import params_of, same_params

# ---------------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": -2.0}, "max_grad_norm"),
        ({"noise_multiplier": 1.0, "max_grad_norm": None}, "max_grad_norm"),
        ({"target_epsilon": 0.0, "planned_steps": 10}, "target_epsilon"),
        ({"target_epsilon": -3.0, "planned_steps": 10}, "target_epsilon"),
        ({"noise_multiplier": 1.0, "delta": 0.0}, "delta"),
        ({"noise_multiplier": 1.0, "delta": -1e-5}, "delta"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, "delta"),
        ({}, "exactly one"),
        ({"noise_multiplier": 1.0, "target_epsilon": 8.0, "planned_steps": 10}, "exactly one"),
        ({"target_epsilon": 8.0}, "needs the plan"),
        ({"target_epsilon": 8.0, "planned_rounds": 5}, "go together"),
        ({"noise_multiplier": 1.0, "planned_steps": 10, "planned_rounds": 2, "local_epochs": 1}, "not both"),
        ({"noise_multiplier": 1.0, "planned_steps": 0}, "planned_steps"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, "accountant"),
        ({"noise_multiplier": 1.0, "grad_sample_mode": "ew"}, "grad_sample_mode"),
        ({"noise_multiplier": True}, "noise_multiplier"),
    ],
)
def test_config_rejects_nonsense(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DPSGDConfig(**kwargs)


def test_config_from_dict_roundtrip_and_unknown_keys():
    cfg = DPSGDConfig.from_dict({"target_epsilon": 8.0, "delta": 1e-5, "planned_rounds": 3, "local_epochs": 1})
    assert DPSGDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown DP-SGD config keys"):
        DPSGDConfig.from_dict({"noise_multiplier": 1.0, "max_grad_nrom": 1.0})


def test_delta_must_be_below_one_over_n():
    cfg = DPSGDConfig(noise_multiplier=1.0, delta=0.2)
    with pytest.raises(ValueError, match="must be < 1/N"):
        SitePrivacyEngine(config=cfg, dataset_size=6, batch_size=2)
    SitePrivacyEngine(config=cfg, dataset_size=4, batch_size=2)  # 0.2 < 1/4


@pytest.mark.parametrize(("n", "b"), [(0, 2), (6, 0), (6, 1.5)])
def test_engine_rejects_bad_sizes(n, b):
    with pytest.raises(ValueError):
        SitePrivacyEngine(config=DPSGDConfig(noise_multiplier=1.0, delta=1e-3), dataset_size=n, batch_size=b)


def test_target_epsilon_mode_plans_noise_for_all_rounds():
    cfg = DPSGDConfig(target_epsilon=8.0, delta=1e-3, planned_rounds=5, local_epochs=2)
    engine = SitePrivacyEngine(config=cfg, dataset_size=6, batch_size=2)
    assert engine.sample_rate == pytest.approx(1 / 3)
    assert engine.planned_steps == 5 * 2 * 3
    assert engine.planned_epsilon <= 8.0
    assert engine.planned_epsilon == pytest.approx(
        epsilon(noise_multiplier=engine.noise_multiplier, sample_rate=1 / 3, steps=30, delta=1e-3)
    )


# ---------------------------------------------------------------------------------------------------------------
# per-sample gradients on the bundle's 3D U-Net
# ---------------------------------------------------------------------------------------------------------------


def _tiny_batch(n: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, size, generator=g), torch.randint(0, 8, (n, 1, size, size, size), generator=g)


@pytest.mark.parametrize("mode", ["loop", "vmap", "functorch", "hooks"])
def test_per_sample_gradients_match_one_sample_at_a_time(tiny_bundle, mode):
    """In float64: a float32 convolution's rounding depends on the CPU and the batch size (oneDNN picks different
    kernels; 0.73 % apart on one AMD EPYC), while real leakage between samples (a loss or layer that mixes them)
    changes a gradient by far more than float64 rounding (1e-17 measured)."""
    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    loss_fn = tiny_bundle.loss()
    x, y = _tiny_batch()
    x = x.double()
    reference = []
    for i in range(len(x)):
        net.zero_grad(set_to_none=True)
        loss_fn(net(x[i : i + 1]), y[i : i + 1]).backward()
        reference.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    net.zero_grad(set_to_none=True)
    if mode == "vmap":
        wrapped = VmapGradSampleModule(net)
        VmapLoss(loss_fn, wrapped)(wrapped(x), y).backward()
    elif mode == "loop":
        wrapped = LoopGradSampleModule(net)
        LoopLoss(loss_fn, wrapped)(wrapped(x), y).backward()
    else:
        wrapped = prepare_module(net, grad_sample_mode=mode, batch_first=True, loss_reduction="mean")
        loss_fn(wrapped(x), y).backward()
    for i in range(len(x)):
        ours = torch.cat([p.grad_sample[i].flatten() for p in net.parameters()])
        assert torch.linalg.vector_norm(ours - reference[i]) <= 1e-9 * torch.linalg.vector_norm(reference[i])
    # and the samples really differ (the check is not vacuous)
    assert torch.linalg.vector_norm(reference[0] - reference[1]) > 0.05 * torch.linalg.vector_norm(reference[0])


def test_per_sample_gradient_check_catches_a_loss_that_mixes_samples(tiny_bundle):
    """The float64 comparison above still fails for real leakage: with Dice pooled over the batch (``batch=True``)
    each sample's per-sample gradient depends on the others, and it differs from that sample's own gradient."""
    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    coupled = tiny_bundle.loss()
    coupled.dice.batch = True
    x, y = _tiny_batch()
    x = x.double()
    net.zero_grad(set_to_none=True)
    coupled(net(x[0:1]), y[0:1]).backward()
    alone = torch.cat([p.grad.flatten() for p in net.parameters()])
    net.zero_grad(set_to_none=True)
    wrapped = prepare_module(net, grad_sample_mode="hooks", batch_first=True, loss_reduction="mean")
    coupled(wrapped(x), y).backward()
    mixed = torch.cat([p.grad_sample[0].flatten() for p in net.parameters()])
    assert torch.linalg.vector_norm(mixed - alone) > 1e-3 * torch.linalg.vector_norm(alone)


def _one_dp_update(tiny_bundle, *, mode: str, loss: str) -> torch.Tensor:
    """Parameter change of one DP step (q = 1, negligible noise, clipping active) on a fixed batch."""
    torch.manual_seed(1)
    net = tiny_bundle.network()
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    x, y = _tiny_batch(seed=5)
    x[0] *= 30.0  # one sample with a much larger gradient: per-sample clipping must treat it on its own
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    clip = 1e-3  # far below the per-sample norms: every sample is clipped, so mixing them up shows
    if loss == "raw":  # Opacus's ghost clipping straight on DiceCELoss: what PerSampleLoss exists to prevent
        wrapped = prepare_module(
            net, grad_sample_mode="ghost", batch_first=True, loss_reduction="mean", max_grad_norm=clip
        )
        dp_opt = get_optimizer_class(clipping="flat", distributed=False, grad_sample_mode="ghost")(
            optimizer=optimizer, noise_multiplier=1e-9, max_grad_norm=clip, expected_batch_size=3
        )
        criterion = tiny_bundle.loss()
        criterion.reduction = "mean"
        loss_fn = DPLossFastGradientClipping(wrapped, dp_opt, criterion, "mean")
        dp_opt.zero_grad()
        loss_fn(wrapped(x), y).backward()
        dp_opt.step()
    else:
        engine = SitePrivacyEngine(
            config=DPSGDConfig(noise_multiplier=1e-9, max_grad_norm=clip, delta=1e-2, grad_sample_mode=mode, seed=0),
            dataset_size=3,
            batch_size=3,
        )
        data = [{"image": x[i], "label": y[i]} for i in range(3)]
        model, dp_opt, loader = engine.make_private(
            model=net, optimizer=optimizer, data_loader=DataLoader(data, batch_size=3)
        )
        batch = next(iter(loader))
        assert len(batch["image"]) == 3  # q = 1: everyone is in
        train_step(model, batch, dp_opt, engine.wrap_loss(tiny_bundle.loss()))
        assert engine.steps == 1
    return torch.cat([p.detach().flatten() for p in net.parameters()]) - before


@pytest.mark.parametrize("mode", ["ghost", "vmap", "loop"])
def test_dp_update_is_the_same_with_every_mode(tiny_bundle, mode):
    functorch = _one_dp_update(tiny_bundle, mode="functorch", loss="checked")
    other = _one_dp_update(tiny_bundle, mode=mode, loss="per-sample")
    assert torch.linalg.vector_norm(other - functorch) <= 1e-3 * torch.linalg.vector_norm(functorch)
    # clipped sum / expected batch: the update's norm is at most the clip norm
    assert torch.linalg.vector_norm(functorch) <= 1e-3 * (1 + 1e-4)


def test_ghost_clipping_on_the_raw_loss_is_wrong(tiny_bundle):
    functorch = _one_dp_update(tiny_bundle, mode="functorch", loss="checked")
    raw = _one_dp_update(tiny_bundle, mode="ghost", loss="raw")
    assert torch.linalg.vector_norm(raw - functorch) > 0.05 * torch.linalg.vector_norm(functorch)


def test_per_sample_loss_matches_the_batch_loss(tiny_bundle):
    loss_fn = tiny_bundle.loss()
    pred = torch.randn(3, 8, 8, 8, 8)
    _, y = _tiny_batch(3, 8)
    per = PerSampleLoss(loss_fn)
    per.reduction = "none"
    vec = per(pred, y)
    assert vec.shape == (3,)
    assert vec.mean() == pytest.approx(float(loss_fn(pred, y)), rel=1e-5)


def _coupled_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A loss mixing the samples of a batch (each sample's term depends on the batch mean)."""
    return ((p - p.mean(0, keepdim=True)) ** 2).mean() + p.mean() * 0


def test_batch_coupled_losses_are_refused():
    from monai.losses import DiceCELoss

    engine = SitePrivacyEngine(
        config=DPSGDConfig(noise_multiplier=1.0, delta=1e-3, grad_sample_mode="functorch"), dataset_size=6, batch_size=2
    )
    with pytest.raises(ValueError, match="batch=True"):
        engine.wrap_loss(DiceCELoss(to_onehot_y=True, softmax=True, batch=True))
    pred = torch.randn(2, 8, 4, 4, 4)
    with pytest.raises(ValueError, match="not a mean of per-sample terms"):
        engine.wrap_loss(_coupled_loss)(pred, torch.zeros(2, 1, 4, 4, 4))
    # vmap mode checks the same on its first batch, before any gradient is computed
    net = torch.nn.Conv3d(1, 8, 3, padding=1)
    wrapped = VmapGradSampleModule(net)
    with pytest.raises(ValueError, match="not a mean of per-sample terms"):
        VmapLoss(_coupled_loss, wrapped)(wrapped(torch.randn(2, 1, 4, 4, 4)), torch.zeros(2, 1, 4, 4, 4))
    assert net.weight.grad_sample is None


def test_default_mode_is_one_of_the_measured_modes():
    assert DEFAULT_GRAD_SAMPLE_MODE in GRAD_SAMPLE_MODES
    assert DPSGDConfig(noise_multiplier=1.0).grad_sample_mode == DEFAULT_GRAD_SAMPLE_MODE


# ---------------------------------------------------------------------------------------------------------------
# the engine on the real pipeline (tiny site)
# ---------------------------------------------------------------------------------------------------------------


def _engine(tmp_path=None, **cfg):
    cfg = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-3, "seed": 0} | cfg
    batch_size = cfg.pop("batch_size", 2)
    return SitePrivacyEngine(
        config=DPSGDConfig(**cfg),
        dataset_size=6,
        batch_size=batch_size,
        state_path=(tmp_path / "dp_state.json") if tmp_path is not None else None,
    )


def _first_draw_empty_seed(n: int, q: float) -> int:
    for seed in range(1000):
        if not (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < q).any():
            return seed
    raise AssertionError("no seed found")


def test_empty_poisson_draws_take_accounted_noise_steps(tiny_bundle, make_loader):
    """q = 1/6: about a third of the draws are empty, here the very first one (Opacus's own collate breaks there)."""
    seed = _first_draw_empty_seed(6, 1 / 6)
    engine = _engine(batch_size=1, seed=seed)
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(1)
    )
    before = params_of(net)
    stats = train_epoch(model, loader, optimizer, engine.wrap_loss(tiny_bundle.loss()))
    report = engine.report()
    assert report["steps"] == len(loader) == 6  # every draw is a step, empty or not
    assert report["empty_steps"] >= 1
    assert stats.steps == 6 - report["empty_steps"] >= 1  # the other draws trained on real batches after it
    assert not same_params(before, params_of(net))
    assert report["epsilon"] == pytest.approx(
        epsilon(noise_multiplier=1.0, sample_rate=1 / 6, steps=6, delta=1e-3), rel=1e-9
    )


def test_noise_only_step_changes_weights_and_is_accounted(tiny_bundle, make_loader):
    engine = _engine(batch_size=2)
    net = tiny_bundle.network()
    engine.make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), data_loader=make_loader(2))
    before = params_of(net)
    engine._noise_only_step()  # what an empty draw triggers
    assert engine.steps == 1 and engine.empty_steps == 1
    assert not same_params(before, params_of(net))


def test_report_and_unwrapped_weights(tiny_bundle, make_loader):
    engine = _engine()
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    train_epoch(model, loader, optimizer, engine.wrap_loss(tiny_bundle.loss()), max_steps=1)
    report = engine.report()
    for key in ("epsilon", "delta", "accountant", "sample_rate", "noise_multiplier", "max_grad_norm", "steps"):
        assert key in report
    assert report["scope"] == SCOPE == "sample-level DP, per site"
    assert report["steps"] >= 1 and report["epsilon"] > 0
    json.dumps(report)  # plain types only
    state = engine.unwrapped_state_dict()
    assert not any(k.startswith("_module.") for k in state)
    assert any(k.startswith("_module.") for k in model.state_dict())
    fresh = tiny_bundle.network()
    fresh.load_state_dict(state)
    engine.load_global_weights(model.state_dict())  # prefixed keys are accepted too
    assert strip_module_prefix({"_module.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_state_survives_a_client_restart(tiny_bundle, make_loader, tmp_path):
    engine = _engine(tmp_path)
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    train_epoch(model, loader, optimizer, engine.wrap_loss(tiny_bundle.loss()), max_steps=1)
    steps, eps = engine.steps, engine.epsilon
    assert steps >= 1 and json.loads((tmp_path / "dp_state.json").read_text())["history"][0][2] == steps

    restarted = _engine(tmp_path)  # same job, new process
    assert restarted.steps == steps
    assert restarted.epsilon == pytest.approx(eps)
    with pytest.raises(ValueError, match="different configuration"):
        _engine(tmp_path, noise_multiplier=2.0)
    (tmp_path / "dp_state.json").write_text("{ not json")
    with pytest.raises(RuntimeError, match="refusing to restart the count at zero"):
        _engine(tmp_path)


def test_steps_beyond_the_plan_are_refused_and_not_applied(tiny_bundle, make_loader):
    engine = _engine(planned_steps=1)
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    loss_fn = engine.wrap_loss(tiny_bundle.loss())
    with pytest.raises(PrivacyBudgetExceeded, match="planned DP steps"):
        train_epoch(model, loader, optimizer, loss_fn)  # 3 draws, the plan says 1
    assert engine.steps == 1
    after_plan = params_of(net)
    with pytest.raises(PrivacyBudgetExceeded):
        train_epoch(model, loader, optimizer, loss_fn)
    assert same_params(after_plan, params_of(net))


def test_job_over_budget_is_refused_before_training(tiny_bundle, ledger_path):
    ledger = SiteLedger.init(ledger_path, epsilon_budget=5.0, delta_budget=1e-2)
    ledger.record(job_id="old", dataset_id="site-1", epsilon=4.0, delta=1e-3, round=9)
    engine = _engine(target_epsilon=2.0, noise_multiplier=None, planned_rounds=2, local_epochs=1)
    with pytest.raises(PrivacyBudgetExceeded, match=r"budget ε=5.*spent ε=4.*asks ε=1\.9"):
        engine.check_budget(ledger, dataset_id="site-1", job_id="new")
    assert engine.steps == 0 and SiteLedger(ledger_path).spent("site-1").epsilon == 4.0  # nothing trained or spent
    engine.check_budget(ledger, dataset_id="other-dataset", job_id="new")
    no_plan = _engine()
    with pytest.raises(ValueError, match="without a plan"):
        no_plan.check_budget(ledger, dataset_id="site-1")


def test_ledger_records_the_cumulative_epsilon(tiny_bundle, make_loader, ledger_path):
    ledger = SiteLedger.init(ledger_path, epsilon_budget=50.0, delta_budget=1e-2)
    engine = _engine()
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    train_epoch(model, loader, optimizer, engine.wrap_loss(tiny_bundle.loss()), max_steps=1)
    engine.record(ledger, job_id="job-1", dataset_id="site-1", round=0)
    rec = SiteLedger(ledger_path).records[-1]
    assert rec["epsilon"] == pytest.approx(engine.epsilon) and rec["steps"] == engine.steps
    assert rec["scope"] == SCOPE


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_misuse_is_refused(tiny_bundle, make_loader, mode):
    engine = _engine(grad_sample_mode=mode)
    net = tiny_bundle.network()
    plain_loader = make_loader(2)
    model, optimizer, _ = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=plain_loader
    )
    with pytest.raises(RuntimeError, match="once per job"):
        engine.make_private(model=net, optimizer=optimizer, data_loader=plain_loader)
    # stepping on batches that did not come from the Poisson loader would make ε wrong
    with pytest.raises(RuntimeError, match="without a batch from the engine's Poisson loader"):
        train_step(model, next(iter(plain_loader)), optimizer, engine.wrap_loss(tiny_bundle.loss()))
    # the engine's own modes: a loss that is not the engine's has nothing to back-propagate (no training without DP)
    with pytest.raises(RuntimeError, match="does not require grad"):
        train_step(model, next(iter(plain_loader)), optimizer, tiny_bundle.loss())
    assert engine.steps == 0


def test_wrong_dataset_size_or_model_is_refused(tiny_bundle, make_loader):
    net = tiny_bundle.network()
    with pytest.raises(ValueError, match="dataset_size=5"):
        SitePrivacyEngine(
            config=DPSGDConfig(noise_multiplier=1.0, delta=1e-3), dataset_size=5, batch_size=2
        ).make_private(model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2))
    bn = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    with pytest.raises(ValueError, match="cannot be trained with DP-SGD"):
        _engine().make_private(model=bn, optimizer=torch.optim.SGD(bn.parameters(), lr=0.1), data_loader=make_loader(2))


# ---------------------------------------------------------------------------------------------------------------
# randomness: the noise must not be reproducible from a job-config seed
# ---------------------------------------------------------------------------------------------------------------


def _noise_only_update(tiny_bundle, make_loader, **cfg) -> torch.Tensor:
    """Weights after one noise-only step, with torch's global generator seeded as a federated client seeds it."""
    torch.manual_seed(123)  # the client's torch.manual_seed(config.seed + ...): same network init in every run
    net = tiny_bundle.network()
    engine = _engine(batch_size=2, **cfg)
    engine.make_private(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), data_loader=make_loader(2))
    torch.manual_seed(456)  # and the same global generator state right before the noise is drawn
    engine._noise_only_step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_noise_is_not_reproducible_from_the_global_torch_seed(tiny_bundle, make_loader):
    a = _noise_only_update(tiny_bundle, make_loader, seed=None)
    b = _noise_only_update(tiny_bundle, make_loader, seed=None)
    assert not torch.equal(a, b)  # fresh os.urandom seed per engine, whatever torch.manual_seed said
    # a config seed (tests only) does reproduce it: the comparison above is not vacuous
    assert torch.equal(
        _noise_only_update(tiny_bundle, make_loader, seed=7), _noise_only_update(tiny_bundle, make_loader, seed=7)
    )


def test_report_and_summary_say_what_is_not_covered(tiny_bundle, make_loader):
    engine = _engine(seed=None, planned_steps=30)
    report = engine.report()
    assert "number of cases" in report["not_covered"] and "NOT covered" in report["not_covered"]
    assert "os.urandom" in report["noise_source"] and "not a cryptographically secure" in report["noise_source"]
    text = engine.summary()
    assert "ε=0 at δ=0.001" in text and "of the 30 planned" in text
    assert "NOT covered by ε: the number of cases" in text
    assert "seed=3" in _engine(seed=3).report()["noise_source"]


def test_engine_reserves_its_plan_and_releases_the_rest(tiny_bundle, make_loader, ledger_path):
    ledger = SiteLedger.init(ledger_path, epsilon_budget=20.0, delta_budget=1e-2)
    engine = _engine(planned_steps=6, accountant="rdp")  # the ε values below are RDP's (the default is PRV)
    status = engine.reserve(ledger, dataset_id="site-1/data", job_id="job-a")
    assert status.reserved_epsilon == pytest.approx(engine.planned_epsilon)
    other = _engine(planned_steps=6, noise_multiplier=0.5, accountant="rdp")  # larger ε than is left beside job-a
    assert engine.planned_epsilon + other.planned_epsilon > 20.0 > other.planned_epsilon
    with pytest.raises(PrivacyBudgetExceeded):
        other.reserve(ledger, dataset_id="site-1/data", job_id="job-b")
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    train_epoch(model, loader, optimizer, engine.wrap_loss(tiny_bundle.loss()), max_steps=1)
    engine.record(ledger, job_id="job-a", dataset_id="site-1/data", round=0)
    freed = engine.release(ledger, dataset_id="site-1/data", job_id="job-a")
    assert freed == pytest.approx(engine.planned_epsilon - engine.epsilon)
    after = SiteLedger(ledger_path).dataset_status("site-1/data")
    assert after.reserved_epsilon == 0.0 and after.spent.epsilon == pytest.approx(engine.epsilon)
    assert engine.release(ledger, dataset_id="site-1/data", job_id="job-a") == 0.0  # idempotent at the end


# ---------------------------------------------------------------------------------------------------------------
# small-N DP: defaults, full-batch DP-GD, frozen parameters
# ---------------------------------------------------------------------------------------------------------------


def test_new_configs_default_to_prv_and_delta_1e_5():
    cfg = DPSGDConfig(noise_multiplier=1.0)
    assert cfg.accountant == "prv" and cfg.delta == 1e-5
    assert DPSGDConfig(noise_multiplier=1.0, accountant="rdp").accountant == "rdp"  # still selectable


@pytest.mark.parametrize("batch_size", [2, 6])
def test_full_batch_with_a_batch_size_is_refused(batch_size):
    with pytest.raises(ValueError, match="full_batch"):
        SitePrivacyEngine(
            config=DPSGDConfig(noise_multiplier=1.0, full_batch=True), dataset_size=6, batch_size=batch_size
        )


def test_full_batch_must_be_a_boolean():
    with pytest.raises(ValueError, match="full_batch"):
        DPSGDConfig(noise_multiplier=1.0, full_batch="yes")


def test_full_batch_plans_one_step_per_local_epoch_at_q_one():
    from privacy.accounting import noise_multiplier_for_epsilon

    cfg = DPSGDConfig(target_epsilon=8.0, planned_rounds=5, local_epochs=4, full_batch=True)
    engine = SitePrivacyEngine(config=cfg, dataset_size=40, batch_size=None)
    assert engine.sample_rate == 1.0 and engine.steps_per_epoch == 1 and engine.expected_batch_size == 40
    assert engine.planned_steps == 20
    assert engine.noise_multiplier == noise_multiplier_for_epsilon(
        target_epsilon=8.0, sample_rate=1.0, steps=20, delta=1e-5, accountant="prv"
    )
    assert engine.planned_epsilon <= 8.0


def test_full_batch_step_takes_every_case(tiny_bundle, site_dataset, make_loader):
    engine = SitePrivacyEngine(
        config=DPSGDConfig(noise_multiplier=1.0, delta=1e-3, full_batch=True, seed=0),
        dataset_size=len(site_dataset),
        batch_size=None,
    )
    net = tiny_bundle.network()
    model, optimizer, loader = engine.make_private(
        model=net, optimizer=tiny_bundle.optimizer(net.parameters()), data_loader=make_loader(2)
    )
    assert len(loader) == 1
    stats = train_epoch(model, loader, optimizer, engine.wrap_loss(tiny_bundle.loss()))
    assert stats.steps == 1 and stats.samples == len(site_dataset)
    assert engine.history == [(1.0, 1.0, 1)]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_frozen_weights_get_no_noise(tiny_bundle, mode):
    """All but the ``norm`` group frozen (as fetalseg.subspace does), the optimizer holding every parameter (as a
    client builds it): a step with large noise changes the norm weights only."""
    from fetalseg import subspace
    from tests.privacy.small_dp import NoisyViews, one_step_engine

    torch.manual_seed(0)
    net = tiny_bundle.network()
    names = set(subspace.parameter_names(net, "norm"))
    subspace.freeze_except(net, names)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    engine, model, opt, loader = one_step_engine(
        net, NoisyViews(2, dtype=torch.float32), noise_multiplier=10.0, max_grad_norm=1.0, grad_sample_mode=mode
    )
    train_epoch(model, loader, opt, engine.wrap_loss(tiny_bundle.loss()))
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), before[n]) != (n in names), n
    assert engine.trained_weights == subspace.count(net, names) == engine.report()["trained_weights"]


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_per_sample_norms_count_only_trained_weights(tiny_bundle, mode):
    """One case, σ ≈ 0, SGD lr 1, clipped: the update over the norm weights has norm exactly C. Had the frozen
    weights' gradients counted in the per-sample norm, the clip factor (and the update) would be smaller."""
    from fetalseg import subspace
    from tests.privacy.small_dp import NoisyViews, flat, one_step_engine

    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    names = subspace.parameter_names(net, "norm")
    trained = subspace.freeze_except(net, names)
    start = [p.detach().clone() for p in trained]
    data = NoisyViews(1)
    c = 1e-3
    engine, model, opt, loader = one_step_engine(net, data, max_grad_norm=c, grad_sample_mode=mode)
    train_epoch(model, loader, opt, engine.wrap_loss(tiny_bundle.loss()))
    update = flat(p.detach() - s for p, s in zip(trained, start, strict=True))
    assert float(torch.linalg.vector_norm(update)) == pytest.approx(c, rel=1e-4)
    # the norm over every weight is far larger: counting it would have shrunk the update
    full = tiny_bundle.network().double()
    full.load_state_dict({**net.state_dict(), **{n: s for n, s in zip(names, start, strict=True)}})
    v = data.view(0, 0)
    tiny_bundle.loss()(full(v["image"][None]), v["label"][None]).backward()
    all_norm = torch.linalg.vector_norm(flat(p.grad for p in full.parameters()))
    norm_only = torch.linalg.vector_norm(flat(p.grad for n, p in full.named_parameters() if n in set(names)))
    assert all_norm > 2 * norm_only > 2 * c
