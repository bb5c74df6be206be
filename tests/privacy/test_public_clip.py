"""Clip norm from public data: per-case gradient norms over the trained weights, K views averaged, a quantile."""

from __future__ import annotations

import json

import pytest
import torch

from privacy.public_clip import per_case_gradient_norms, recommend_clip
from tests.privacy.small_dp import NoisyViews, flat
from tests.privacy.test_cli import run


def test_norms_are_those_of_each_cases_view_averaged_gradient(tiny_bundle):
    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    data = NoisyViews(2)
    norms = per_case_gradient_norms(net, tiny_bundle.loss(), data, views=3)
    for case in range(2):
        grads = []
        for call in range(3 * case, 3 * case + 3):
            v = data.view(case, call)
            net.zero_grad(set_to_none=True)
            tiny_bundle.loss()(net(v["image"][None]), v["label"][None]).backward()
            grads.append(flat(p.grad for p in net.parameters()))
        expected = float(torch.linalg.vector_norm(torch.stack(grads).mean(0)))
        assert norms[case] == pytest.approx(expected, rel=1e-9)


def test_frozen_weights_do_not_count(tiny_bundle):
    from fetalseg import subspace

    torch.manual_seed(0)
    net = tiny_bundle.network().double()
    all_norms = per_case_gradient_norms(net, tiny_bundle.loss(), NoisyViews(2))
    subspace.freeze_except(net, subspace.parameter_names(net, "norm"))
    norm_norms = per_case_gradient_norms(net, tiny_bundle.loss(), NoisyViews(2))
    assert all(a > n > 0 for a, n in zip(all_norms, norm_norms, strict=True))


def test_recommendation_is_a_quantile():
    assert recommend_clip([1.0, 3.0, 2.0]) == 2.0
    assert recommend_clip([1.0, 3.0, 2.0], 1.0) == 3.0
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="quantile"):
            recommend_clip([1.0], bad)
    with pytest.raises(ValueError, match="no per-case norms"):
        recommend_clip([])


def test_cli_prints_the_recommended_clip_norm(tmp_path, capsys):
    from fetalseg.data.federation import write_federation

    (public,) = write_federation(tmp_path, n_sites=1, cases_per_site=3, shape=(32, 32, 32), seed=5)
    args = ["privacy", "clip-from-public", str(public), "--size", "32", "--multiplicity", "2"]
    assert run([*args, "--trained-parameters", "norm+bias+head", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["norms"]) == 3 and out["views"] == 2 and out["trained_parameters"] == "norm+bias+head"
    assert out["max_grad_norm"] == pytest.approx(sorted(out["norms"])[1])
    assert run([*args, "--trained-parameters", "nonsense"]) == 2
    assert "unknown parameter group" in capsys.readouterr().err
