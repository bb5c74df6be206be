"""A poisoning site for robust-aggregation tests: the real client script, but every update it sends is its honest
DIFF sign-flipped and rescaled to a chosen L2 norm (``--norm 100``), a norm the server's UpdateGuard accepts
(below ``max_update_norm``), so only the aggregation can limit the damage. Everything else is the production
client (:mod:`nvflare_jobs.fetal_brain.client`)."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from nvflare_jobs.fetal_brain import client


def poison(diff: dict[str, torch.Tensor], norm: float) -> dict[str, torch.Tensor]:
    """``-diff`` scaled to L2 norm ``norm`` (all tensors together)."""
    current = math.sqrt(sum(float(v.double().pow(2).sum()) for v in diff.values()))
    scale = -norm / current if current > 0 else 0.0
    return {k: (v.double() * scale).to(v.dtype) for k, v in diff.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--norm", type=float, required=True)
    args, rest = parser.parse_known_args()
    weight_diff = client.SiteTrainer.weight_diff

    def poisoned_weight_diff(self, global_state):
        return poison(weight_diff(self, global_state), args.norm)

    client.SiteTrainer.weight_diff = poisoned_weight_diff
    client.main(rest)


if __name__ == "__main__":
    sys.exit(main())
