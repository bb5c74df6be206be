"""A deliberately broken site for fault tests: the real client script, with one fault injected per round.

``--fault nan@0,norm@1`` sends an update containing NaN in round 0 and one with an absurd norm in round 1;
``--fault die@1`` kills the site's training process (SIGKILL) in the middle of round 1. Everything else is
the production client (:mod:`nvflare_jobs.fetal_brain.client`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from nvflare_jobs.fetal_brain import client

KINDS = ("nan", "inf", "norm", "die")


def parse_faults(text: str) -> dict[int, str]:
    faults = {}
    for item in text.split(","):
        kind, _, rnd = item.partition("@")
        if kind not in KINDS or not rnd.isdigit():
            raise SystemExit(f"bad --fault item {item!r}: expected <{'|'.join(KINDS)}>@<round>")
        faults[int(rnd)] = kind
    return faults


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault", required=True)
    args, rest = parser.parse_known_args()
    faults = parse_faults(args.fault)
    rounds_trained = {"n": 0}
    train_round = client.SiteTrainer.train_round
    weight_diff = client.SiteTrainer.weight_diff

    def faulty_train_round(self, **kwargs):
        if faults.get(rounds_trained["n"]) == "die":
            os.kill(os.getpid(), signal.SIGKILL)  # the site's process disappears mid-round
        return train_round(self, **kwargs)

    def faulty_weight_diff(self, global_state):
        diff = weight_diff(self, global_state)
        kind = faults.get(rounds_trained["n"])
        rounds_trained["n"] += 1
        name = next(iter(diff))
        if kind == "nan":
            diff[name].view(-1)[0] = float("nan")
        elif kind == "inf":
            diff[name].view(-1)[0] = float("inf")
        elif kind == "norm":
            diff[name].mul_(1.0e9)
        return diff

    client.SiteTrainer.train_round = faulty_train_round
    client.SiteTrainer.weight_diff = faulty_weight_diff
    client.main(rest)


if __name__ == "__main__":
    sys.exit(main())
