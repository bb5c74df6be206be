"""Training at tiny size runs, improves Dice over the untrained network, and is deterministic."""

import math

import pytest
import torch

from fetalseg.baseline import load_sites, train_and_evaluate, write_report
from fetalseg.bundle import Bundle, load_checkpoint
from fetalseg.data.loaders import load_dataset
from fetalseg.evaluation import evaluate_cases
from fetalseg.metrics import nanmean
from fetalseg.training import build_train_loader, train_epoch


def test_train_epoch_counts_steps_and_samples(tiny_federation):
    bundle = Bundle("train", variant="tiny")
    cases = load_dataset(tiny_federation[0])
    net = bundle.network()
    loader = build_train_loader(bundle, cases, batch_size=2)
    stats = train_epoch(net, loader, bundle.optimizer(net.parameters()), bundle.loss(), max_steps=1)
    assert stats.steps == 1 and stats.samples == 2 and math.isfinite(stats.loss)


def test_empty_batches_are_skipped():
    bundle = Bundle("train", variant="tiny")
    net = bundle.network()
    empty = {"image": torch.zeros(0, 1, 32, 32, 32), "label": torch.zeros(0, 1, 32, 32, 32)}
    stats = train_epoch(net, [empty], bundle.optimizer(net.parameters()), bundle.loss())
    assert stats.steps == 0 and stats.samples == 0


@pytest.mark.slow
def test_training_improves_dice_over_untrained(tiny_federation, tmp_path):
    bundle = Bundle("train", variant="tiny")
    splits = load_sites(tiny_federation)
    test = [c for s in splits for c in s.test]
    untrained = nanmean(s.mean_dice for s in evaluate_cases(bundle.network(), test, bundle=bundle, with_hd95=False))
    result = train_and_evaluate(
        splits,
        train_sites=[s.site for s in splits],
        name="centralized",
        bundle=bundle,
        max_epochs=20,
        val_interval=5,
        checkpoint=tmp_path / "model.pt",
        with_hd95=False,
    )
    trained = result.summary["all"]["mean"]["dice"]
    assert trained > untrained + 0.05, (untrained, trained)
    assert set(result.summary) == {s.site for s in splits} | {"all"}
    json_path, md_path = write_report(result, tmp_path / "report")
    assert "centralized" in md_path.read_text() and json_path.stat().st_size > 0
    net = bundle.network()
    info = load_checkpoint(net, tmp_path / "model.pt")
    assert info["val_mean_dice"] == result.fit.best_mean_dice and "origin" in info
