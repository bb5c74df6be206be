"""bench/fedavg_in_process.py: the benchmarks' in-process FedAvg averages by training cases, round after round."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("fedavg_in_process", REPO / "bench" / "fedavg_in_process.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fedavg = _load()


def test_states_are_averaged_by_training_cases_and_integer_buffers_kept_from_the_first_site() -> None:
    a = {"w": torch.tensor([1.0, 0.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 3.0]), "n": torch.tensor(9)}
    out = fedavg.average_states([a, b], [1, 2])  # site b has twice the training cases
    assert torch.allclose(out["w"], torch.tensor([3.0, 2.0]))
    assert out["n"].item() == 3 and out["n"] is not a["n"]


def test_each_round_starts_every_site_from_the_last_global_state() -> None:
    seen: list[tuple[int, float]] = []
    rounds_done: list[int] = []

    def local_update(i: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        seen.append((i, state["w"].item()))
        return {"w": state["w"] + (1.0 if i == 0 else 4.0)}  # site 0 moves by 1, site 1 by 4

    final = fedavg.fedavg_rounds(
        {"w": torch.tensor(0.0)}, rounds=2, weights=[3, 1], local_update=local_update, after_round=rounds_done.append
    )
    # round 0: (1·3 + 4·1) / 4 = 1.75; round 1 starts there: 1.75 + 1.75
    assert seen == [(0, 0.0), (1, 0.0), (0, 1.75), (1, 1.75)] and rounds_done == [0, 1]
    assert final["w"].item() == 3.5


def test_set_lr_leaves_the_bundles_rate_without_a_value() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    fedavg.set_lr(optimizer, None)
    assert optimizer.param_groups[0]["lr"] == 0.1
    fedavg.set_lr(optimizer, 3e-3)
    assert optimizer.param_groups[0]["lr"] == 3e-3
