"""Fixtures for the privacy tests: the tiny bundle, one small synthetic site, loaders, a ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fetalseg.bundle import Bundle

TINY = {"pixdim": [4, 4, 4], "patch_size": [32, 32, 32]}


@pytest.fixture(scope="session")
def tiny_bundle() -> Bundle:
    """The project's bundle at test size (32³ patches at 4 mm)."""
    return Bundle("train", overrides=TINY)


@pytest.fixture(scope="session")
def site_cases(tmp_path_factory) -> list:
    """Six labelled 32³ synthetic cases of one site (FeTA BIDS on disk)."""
    from fetalseg.data.federation import write_federation
    from fetalseg.data.loaders import load_dataset

    out = tmp_path_factory.mktemp("dp_site")
    (site,) = write_federation(out, n_sites=1, cases_per_site=6, shape=(32, 32, 32), seed=3)
    return load_dataset(site)


@pytest.fixture(scope="session")
def site_dataset(tiny_bundle, site_cases):
    """The cached training dataset of :func:`site_cases` (the bundle's train transforms)."""
    from fetalseg.training import build_train_dataset

    return build_train_dataset(tiny_bundle, site_cases)


@pytest.fixture
def make_loader(tiny_bundle, site_dataset):
    """``make_loader(batch_size)`` -> the plain training loader a client would build."""
    from fetalseg.training import build_train_loader

    def _make(batch_size: int = 2):
        return build_train_loader(tiny_bundle, dataset=site_dataset, batch_size=batch_size)

    return _make


@pytest.fixture
def ledger_path(tmp_path) -> Path:
    return tmp_path / "site" / "privacy_ledger.jsonl"


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def same_params(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
