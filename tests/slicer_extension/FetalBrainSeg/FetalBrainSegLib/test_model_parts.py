"""The served site model's parts as the app's /info/ reports them (``parts``): the shared, federated part with its
ε, δ, accountant and privacy unit, and this site's local part (never sent, learned without DP from N cases)."""

from __future__ import annotations

from FetalBrainSegLib.workflow import ModelInfo

PARTS = {
    "shared": {
        "origin": "nvflare",
        "job_id": "j1",
        "round": 4,
        "privacy": {"epsilon": 7.5, "delta": 1e-5, "accountant": "prv", "privacy_unit": "one patient"},
    },
    "local": {"parameters": "norm", "weights": 688, "training_cases": 12, "sharing": "local: never sent"},
}


def _info(parts) -> dict:
    return {"models": {"m": {"model": {"origin": "nvflare", "parts": parts}}}}


def test_shared_and_local_parts_are_shown_in_words():
    m = ModelInfo.from_info(_info(PARTS), "m")
    assert m.shared_part_text == (
        "nvflare, job j1, round 4; ε = 7.5 (δ = 1e-05), prv accountant, privacy unit: one patient"
    )
    assert m.local_part_text == "norm (688 weights), learned without DP from this site's 12 cases, never sent"


def test_a_shared_part_without_dp_says_so():
    m = ModelInfo.from_info(_info({"shared": {"origin": "nvflare", "privacy": {"dp": False}}, "local": None}), "m")
    assert m.shared_part_text == "nvflare; no differential-privacy guarantee reported"
    assert m.local_part_text.startswith("none")


def test_a_model_fine_tuned_at_the_site_has_no_shared_part():
    m = ModelInfo.from_info(_info({"shared": None, "local": {"parameters": "all"}}), "m")
    assert m.shared_part_text.startswith("none: every weight")
    assert m.local_part_text == "all, learned without DP from this site's own cases, never sent"


def test_an_older_server_without_parts_is_not_guessed():
    m = ModelInfo.from_info({"models": {"m": {}}}, "m")
    assert m.shared_part_text == "not reported by the server" and m.local_part is None
