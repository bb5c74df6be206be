"""NVFlare adapters: fail closed where NVFlare's own filter fails open, and really shrink the serialized update."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_bytes, from_shareable
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy

from privacy.filters import decode_sparse, percentile_share
from privacy.nvflare_filters import (
    REPORT_META_KEY,
    ClientDPFilter,
    FailClosedPercentilePrivacy,
    SparsePercentileFilter,
    SparseUpdateDecoder,
)
from tests.privacy.test_filters import unet_like_update

common_decomposers.register()  # numpy arrays in DXOs, as NVFlare's runtime registers them


@pytest.fixture
def fl_ctx() -> FLContext:
    return FLContext()


def diff_shareable(update=None, *, steps: int = 4, kind=DataKind.WEIGHT_DIFF) -> Shareable:
    update = unet_like_update() if update is None else update
    return DXO(
        kind, {k: v.copy() for k, v in update.items()}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps}
    ).to_shareable()


# -- NVFlare's filter fails open; ours does not -----------------------------------------------------------------


@pytest.mark.parametrize(("percentile", "gamma"), [(101, 0.01), (-5, 0.01), (50, 0.0), (50, -1.0)])
def test_nvflare_percentile_privacy_passes_bad_parameters_but_ours_refuses(fl_ctx, percentile, gamma):
    original = unet_like_update()
    result = from_shareable(PercentilePrivacy(percentile=percentile, gamma=gamma).process(diff_shareable(), fl_ctx))
    for k in original:  # the update left unfiltered: the trap this wrapper exists for
        np.testing.assert_array_equal(result.data[k], original[k])
    with pytest.raises(ValueError):
        FailClosedPercentilePrivacy(percentile=percentile, gamma=gamma)
    with pytest.raises(ValueError):
        SparsePercentileFilter(percentile=percentile, gamma=gamma)


def test_fail_closed_percentile_matches_nvflare_on_good_parameters(fl_ctx):
    ours = from_shareable(FailClosedPercentilePrivacy(percentile=80, gamma=1e-3).process(diff_shareable(), fl_ctx))
    theirs = from_shareable(PercentilePrivacy(percentile=80, gamma=1e-3).process(diff_shareable(), fl_ctx))
    for k in theirs.data:
        np.testing.assert_allclose(ours.data[k], theirs.data[k], rtol=1e-6, atol=1e-9)
    assert ours.get_meta_prop(REPORT_META_KEY)[0]["details"]["dp"] is False


@pytest.mark.parametrize(
    "make",
    [
        lambda: FailClosedPercentilePrivacy(percentile=90, gamma=0.01),
        lambda: SparsePercentileFilter(percentile=90),
        lambda: ClientDPFilter(clip_norm=1.0, noise_multiplier=1.0),
    ],
)
def test_full_weights_or_non_dxo_results_are_refused_metrics_pass(fl_ctx, make):
    filt = make()
    with pytest.raises(ValueError, match="WEIGHTS"):
        filt.process(diff_shareable(kind=DataKind.WEIGHTS), fl_ctx)
    not_dxo = Shareable()
    not_dxo["weights"] = np.ones(3)
    with pytest.raises(ValueError, match="not a DXO"):
        filt.process(not_dxo, fl_ctx)
    metrics = DXO(DataKind.METRICS, {"val_dice": 0.8}).to_shareable()
    assert from_shareable(filt.process(metrics, fl_ctx)).data == {"val_dice": 0.8}
    error_reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    assert filt.process(error_reply, fl_ctx).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_wrong_data_kinds_config_is_refused():
    with pytest.raises(ValueError, match="WEIGHT_DIFF"):
        FailClosedPercentilePrivacy(percentile=90, gamma=0.01, data_kinds=["WEIGHTS"])
    with pytest.raises(ValueError):
        FailClosedPercentilePrivacy(percentile=90, gamma=None)


# -- sparse sharing through NVFlare's serializer ----------------------------------------------------------------


def test_sparse_filter_shrinks_serialized_bytes_and_server_decodes(fl_ctx):
    update = unet_like_update()
    dense_bytes = len(from_shareable(diff_shareable(update)).to_bytes())
    nvflare_bytes = len(
        from_shareable(PercentilePrivacy(percentile=90, gamma=1.0).process(diff_shareable(update), fl_ctx)).to_bytes()
    )
    sent = SparsePercentileFilter(percentile=90).process(diff_shareable(update), fl_ctx)
    wire = from_shareable(sent).to_bytes()
    assert nvflare_bytes >= 0.95 * dense_bytes  # NVFlare's filter sends a dense array of zeros
    assert len(wire) <= 0.25 * dense_bytes
    assert from_shareable(sent).data_kind == DataKind.APP_DEFINED  # an aggregator cannot mistake it for Δw

    received = from_bytes(wire).to_shareable()
    decoded = from_shareable(SparseUpdateDecoder().process(received, fl_ctx))
    assert decoded.data_kind == DataKind.WEIGHT_DIFF
    assert decoded.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 4
    expected, _ = percentile_share(update, percentile=90, num_steps=4)
    for k in update:
        np.testing.assert_array_equal(decoded.data[k], expected[k])
    report = decoded.get_meta_prop(REPORT_META_KEY)[0]
    assert report["fraction_kept"] == pytest.approx(0.1, abs=0.005)


def test_decoder_passes_other_results_and_rejects_broken_payloads(fl_ctx):
    plain = diff_shareable()
    assert from_shareable(SparseUpdateDecoder().process(plain, fl_ctx)).data_kind == DataKind.WEIGHT_DIFF
    sent = from_shareable(SparsePercentileFilter(percentile=90).process(diff_shareable(), fl_ctx))
    sent.data["tensors"]["conv1.weight"]["values"] = sent.data["tensors"]["conv1.weight"]["values"][:-2]
    with pytest.raises(ValueError):
        SparseUpdateDecoder().process(sent.to_shareable(), fl_ctx)


def test_torch_tensors_come_back_as_torch(fl_ctx):
    update = {k: torch.from_numpy(v) for k, v in unet_like_update().items()}
    shareable = DXO(DataKind.WEIGHT_DIFF, dict(update)).to_shareable()
    sent = SparsePercentileFilter(percentile=90).process(shareable, fl_ctx)
    assert decode_sparse(from_shareable(sent).data).keys() == update.keys()  # numpy on the wire
    decoded = from_shareable(SparseUpdateDecoder().process(sent, fl_ctx))
    assert all(isinstance(v, torch.Tensor) for v in decoded.data.values())
    assert decoded.data["scale"].shape == update["scale"].shape == ()


# -- client-level DP --------------------------------------------------------------------------------------------


def test_client_dp_filter_noises_reports_and_counts_rounds(fl_ctx, tmp_path):
    filt = ClientDPFilter(clip_norm=0.5, noise_multiplier=2.0, delta=1e-5, state_path=str(tmp_path / "cdp.json"))
    update = unet_like_update()
    first = from_shareable(filt.process(diff_shareable(update), fl_ctx))
    second = from_shareable(filt.process(diff_shareable(update), fl_ctx))
    report = second.get_meta_prop(REPORT_META_KEY)[-1]
    assert report["details"]["rounds"] == 2 and report["details"]["scope"].startswith("client-level DP")
    assert report["details"]["epsilon"] == pytest.approx(filt.config.epsilon(2))
    assert report["norm_before"] > 0.5 and report["details"]["norm_clipped"] == pytest.approx(0.5)
    assert not np.array_equal(first.data["conv1.weight"], second.data["conv1.weight"])  # fresh noise each round
    restarted = ClientDPFilter(clip_norm=0.5, noise_multiplier=2.0, delta=1e-5, state_path=str(tmp_path / "cdp.json"))
    assert restarted.client_accountant.rounds == 2


@pytest.mark.parametrize("kwargs", [{"clip_norm": 0.0}, {"noise_multiplier": -1.0}, {"delta": 1.5}])
def test_client_dp_filter_bad_parameters_raise_at_job_start(kwargs):
    with pytest.raises(ValueError):
        ClientDPFilter(**({"clip_norm": 1.0, "noise_multiplier": 1.0} | kwargs))
