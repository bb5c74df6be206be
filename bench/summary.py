"""The benchmark table of docs/benchmarks.md: one row per headline measure, read from the JSON results, with its goal.

Why a module: docs/benchmarks.md must show what the scripts last measured and whether each goal is met, and nobody
should type those numbers by hand. Each benchmark's result file ``bench/results/<name>.json`` is read by one function
here that knows its layout; a result without such a function (or without JSON) is shown by ``run_all`` as the
title and first table of its Markdown file instead. Verdicts are computed from the numbers, never written.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Row:
    """One headline measure: ``verdict`` is "met", "not met" or "–" (no goal)."""

    benchmark: str
    measure: str
    result: str
    goal: str
    verdict: str


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "not met")


def _eps(x: float) -> str:
    return f"{x:.1f}" if x < 1000 else f"{x:.1e} (almost no noise)"


def _delta_note(delta: Any) -> str:
    """δ of a result, said in the same line; a result at another δ than the project's one (1e-5) is history."""
    try:
        value = float(delta)
    except (TypeError, ValueError):
        return ""
    return f", δ = {value:g}" if value == 1e-5 else f", history at δ = {value:g}"


def _ratio(x: float) -> str:
    return f"{x:.2f}×"


def infer(d: dict[str, Any], name: str = "infer") -> list[Row]:
    """The first row is the bundle's default sliding-window setting (``bench_infer.py`` measures it first)."""
    r = d["rows"][0]
    ratio = r["infer_s"] / r["sw_s"]
    setting = f"ROI {r['roi']}, overlap {r['overlap']}, model grid {'×'.join(str(g) for g in r['grid'])}"
    rows = [
        Row(
            name,
            f"/infer ÷ bare sliding window, cold ({setting})",
            f"{r['infer_s']:.2f} s ÷ {r['sw_s']:.2f} s = {_ratio(ratio)}",
            "≤ 1.25×",
            _verdict(ratio <= 1.25),
        ),
    ]
    if "infer_prefetched_s" in r:  # results from before the app prepared cases ahead have no such column
        ahead = r["infer_prefetched_s"] / r["sw_s"]
        rows.append(
            Row(
                name,
                "/infer ÷ bare sliding window, after 'next case' (case prepared in the background)",
                f"{r['infer_prefetched_s']:.2f} s ÷ {r['sw_s']:.2f} s = {_ratio(ahead)}",
                "≤ 1.25×",
                _verdict(ahead <= 1.25),
            )
        )
    return [
        *rows,
        Row(
            name,
            "/infer ÷ the same segmentation in-process (server overhead)",
            f"{_ratio(r['infer_s'] / r['local_s'])}; peak RSS {d['peak_rss'] / 2**30:.2f} GiB",
            "–",
            "–",
        ),
    ]


def dp(d: dict[str, Any]) -> list[Row]:
    from privacy.dpsgd import DEFAULT_GRAD_SAMPLE_MODE

    mode = DEFAULT_GRAD_SAMPLE_MODE
    rows = []
    for threads, table in sorted(d["tables"].items()):
        plain, dpm = table["rows"]["plain"], table["rows"].get(mode)
        if not dpm:
            continue
        t = dpm["cpu_s"] / plain["cpu_s"] if threads == "1" else dpm["step_s"] / plain["step_s"]
        mem = dpm["step_memory_mb"] / plain["step_memory_mb"]
        what = "CPU time" if threads == "1" else "wall-clock"
        rows.append(
            Row(
                "dp",
                f"DP-SGD step ÷ plain step, default mode `{mode}`, {threads} thread(s), {what} / step memory",
                f"{_ratio(t)} / {_ratio(mem)}",
                "≤ 1.5× / ≤ 2×",
                _verdict(t <= 1.5 and mem <= 2.0),
            )
        )
    return rows


def fl(d: dict[str, Any]) -> list[Row]:
    o = d["overhead"]
    util = {u["method"]: u["dice"] for u in d["utility"]}
    central = next(v for k, v in util.items() if k.startswith("centralized"))
    fedavg = util["FedAvg"]
    full = d["bytes"][0]["bytes"]
    sparse = next(b["bytes"] for b in d["bytes"] if "Sparse" in b["payload"])
    return [
        Row(
            "fl",
            "FedAvg held-out Dice − centralized, same passes",
            f"{fedavg:.3f} − {central:.3f} = {fedavg - central:+.3f}",
            "≥ −0.01",
            _verdict(fedavg >= central - 0.01),
        ),
        Row(
            "fl",
            "NVFlare simulator ÷ the same rounds without NVFlare, per round / end to end",
            f"{_ratio(o['ratio_round'])} / {_ratio(o['ratio_wall'])}",
            "≤ 1.15×",
            _verdict(o["ratio_round"] <= 1.15 and o["ratio_wall"] <= 1.15),
        ),
        Row(
            "fl",
            "bytes per site per round, sparse percentile sharing ÷ full update",
            f"{sparse:,} ÷ {full:,} = {sparse / full:.3f}",
            "≤ 0.25",
            _verdict(sparse / full <= 0.25),
        ),
    ]


def fl_overhead(d: dict[str, Any], name: str = "fl_overhead") -> list[Row]:
    rows = []
    for r in d["rows"]:
        rows.append(
            Row(
                name,
                f"NVFlare ÷ local, {r['local_epochs']} local epoch(s) per round ({r['local_round_s']:.1f} s local), "
                f"task request interval {r['task_request_interval_s']:g} s: per round / end to end",
                f"{_ratio(r['ratio_round'])} / {_ratio(r['ratio_wall'])}",
                "≤ 1.15×",
                _verdict(r["ratio_round"] <= 1.15 and r["ratio_wall"] <= 1.15),
            )
        )
    return rows


def fl_schedule_gap(fed: dict[str, Any], central: dict[str, Any]) -> tuple[float, str]:
    """FedAvg − centralized Dice for the goal, and on which cases: all held-out cases (the split's test cases +
    ``--extra-test``) when both models were scored on them, else the split's test cases."""
    if fed.get("dice_heldout") is not None and central.get("dice_heldout") is not None:
        return fed["dice_heldout"] - central["dice_heldout"], f"{fed.get('n_heldout', '?')} held-out cases"
    return fed["dice"] - central["dice"], "test cases"


def fl_schedule(d: dict[str, Any], name: str = "fl_schedule") -> list[Row]:
    """Per budget: the FedAvg split whose worst seed is closest to centralized (same seed)."""
    results = d["results"]
    central = {(r["budget"], r["seed"]): r for r in results if r["method"] == "centralized"}
    rows = []
    for budget in sorted({r["budget"] for r in results}):
        best: tuple[float, int, list[tuple[float, str]]] | None = None
        for le in sorted({r["local_epochs"] for r in results if r["method"] == "fedavg" and r["budget"] == budget}):
            gaps = [
                fl_schedule_gap(r, central[(budget, r["seed"])])
                for r in results
                if r["method"] == "fedavg" and r["budget"] == budget and r["local_epochs"] == le
            ]
            worst = min(g for g, _ in gaps) if gaps else None
            if worst is not None and (best is None or worst > best[0]):
                best = (worst, le, gaps)
        if best is None:
            continue
        worst, le, gaps = best
        on = sorted({where for _, where in gaps})
        rows.append(
            Row(
                name,
                f"FedAvg − centralized at {budget} passes, best split {budget // le} rounds × {le} local epochs "
                f"({len(gaps)} seed(s); Dice on {' / '.join(on)})",
                ", ".join(f"{g:+.4f}" for g, _ in gaps)
                + (f" (mean {statistics.mean(g for g, _ in gaps):+.4f})" if len(gaps) > 1 else ""),
                "≥ −0.01 every seed",
                _verdict(worst >= -0.01),
            )
        )
    return rows


def attacks(d: dict[str, Any]) -> list[Row]:
    dp_rows = [m for m in d["membership"] if m.get("epsilon") is not None and m["epsilon"] <= 8.0 + 1e-9]
    rows = []
    if dp_rows:
        worst = max(m["auc"] for m in dp_rows)
        rows.append(
            Row(
                "attacks",
                f"membership inference AUC, DP-SGD at ε ≤ 8{_delta_note(dp_rows[0].get('delta'))} "
                f"(worst of {len(dp_rows)} models)",
                f"{worst:.2f}",
                "≤ 0.55",
                _verdict(worst <= 0.55),
            )
        )
    plain = [m for m in d["membership"] if m.get("epsilon") is None and "from scratch" in m["model"]]
    if plain:
        auc = f"{plain[0]['auc']:.2f}"
        rows.append(Row("attacks", "membership inference AUC, non-private from scratch", auc, "–", "–"))
    for inv in d.get("inversion", []):
        rows.append(
            Row(
                "attacks",
                f"gradient inversion SSIM (lower is safer), {inv['filter']}"
                f"{_delta_note((d.get('args') or {}).get('delta')) if 'ε' in inv['filter'] else ''}, {inv['model']}",
                f"{inv['ssim']:.2f}",
                "–",
                "–",
            )
        )
    return rows


def privacy_utility(d: dict[str, Any], name: str = "privacy_utility") -> list[Row]:
    rows = []
    runs = d["rows"]
    public = (d.get("public_pretraining_only") or {}).get("all")
    delta_note = _delta_note((d.get("args") or {}).get("delta"))
    for start in sorted({r["start"] for r in runs}):
        alone = f": {public:.3f} alone" if start == "public" and public is not None else ""
        plain = next((r for r in runs if r["start"] == start and r.get("target_epsilon") is None), None)
        for r in runs:
            eps = r.get("target_epsilon")
            if r["start"] != start or eps is None or plain is None:
                continue
            gap = r["dice"]["all"] - plain["dice"]["all"]
            rows.append(
                Row(
                    name,
                    f"held-out Dice, DP-SGD ε ≈ {_eps(r.get('epsilon', eps))}{delta_note}"
                    f" − non-private ({start} start{alone})",
                    f"{r['dice']['all']:.3f} − {plain['dice']['all']:.3f} = {gap:+.3f}",
                    "≥ −0.05 at ε ≤ 8" if eps <= 8 else "–",
                    _verdict(gap >= -0.05) if eps <= 8 else "–",
                )
            )
    if not rows and runs:  # a run that compared against a separate non-private run: show its own numbers
        rows = [
            Row(
                name,
                f"held-out Dice, {r['run']} (no non-private run in this file)",
                f"{r['dice']['all']:.3f}",
                "–",
                "–",
            )
            for r in runs
        ]
    return rows


def load(d: dict[str, Any]) -> list[Row]:
    """bench_load.py: errors (and each route's p95) under mixed traffic with one fine-tune, and the server's memory
    growth from the first to the last minute (issue 19: 0 errors, ≤ 10 %), with and without the fine-tune's samples.
    An older result without memory growth gives the errors row only."""
    ops = d["ops"]
    p95 = ", ".join(
        f"{op} {o['p95_ms'] / 1000:.1f} s"
        for op, o in ops.items()
        if op != "train_status" and o.get("p95_ms") is not None
    )
    tr = d.get("training")
    what = ", ".join(op.replace("_", " ") for op in (d.get("mix") or ops)) + (", 1 fine-tune" if tr else "")
    rows = [
        Row(
            "load",
            f"{d['clients']} clients × {d['seconds']:.0f} s ({what}): errors; p95 per route",
            f"{d['errors']} errors, {d['requests_per_s']:.1f} req/s" + (f"; p95 {p95}" if p95 else ""),
            "0 errors",
            _verdict(d["errors"] == 0),
        )
    ]
    growth = d.get("rss_mb", {}).get("growth")
    if growth:
        goal = d["rss_mb"]["goal_pct"]
        for key, name in (("total", "all samples"), ("total_without_training", "fine-tune's samples left out")):
            g = growth[key]
            pct = g["growth_pct"]
            rows.append(
                Row(
                    "load",
                    f"server RSS (process + children), last vs first minute of load, {name}",
                    "n/a (run too short)" if pct is None else f"{g['first']:.0f} → {g['last']:.0f} MB, {pct:+.1f} %",
                    "–" if pct is None else f"≤ {goal:g} %",
                    _verdict(None if pct is None else pct <= goal),
                )
            )
    return rows


def baseline(d: dict[str, Any]) -> list[Row]:
    central = d["centralized"]["summary"]["all"]["mean"]["dice"]
    drops = []
    for site, run in d["single_site"].items():
        summ = run["summary"]
        others = [summ[s]["mean"]["dice"] for s in summ if s not in (site, "all")]
        if others:
            drops.append(summ[site]["mean"]["dice"] - statistics.mean(others))
    rows = [
        Row(
            "baseline",
            f"centralized held-out mean Dice ({d['centralized']['train_seconds'] / 60:.1f} min training)",
            f"{central:.3f}",
            "≥ 0.80",
            _verdict(central >= 0.80),
        )
    ]
    if drops:
        drop = statistics.mean(drops)
        rows.append(
            Row(
                "baseline",
                "single-site model: own site − other sites (mean Dice)",
                f"{drop:.3f}",
                "≥ 0.05",
                _verdict(drop >= 0.05),
            )
        )
    return rows


def privacy_utility_runs(d: dict[str, Any], name: str) -> list[Row]:
    """A file of several ``bench_privacy_utility`` runs keyed by trained subspace (a run may be missing: skipped)."""
    rows: list[Row] = []
    for subspace, run in d["runs"].items():
        if run is None:
            rows.append(Row(name, f"{subspace}: not run (see the .md)", "–", "–", "–"))
            continue
        for r in privacy_utility(run, name):
            rows.append(Row(r.benchmark, f"{subspace}: {r.measure}", r.result, r.goal, r.verdict))
    return rows


def public_pretraining(d: dict[str, Any]) -> list[Row]:
    """Held-out Dice with vs without domain randomization in public pretraining, per setting, over seeds."""
    runs = d["runs"]
    rows = []
    for setting in sorted({r["setting"] for r in runs.values()}):
        seeds = sorted({r["seed"] for r in runs.values() if r["setting"] == setting})
        pairs = [(runs.get(f"{setting}/seed{s}/plain"), runs.get(f"{setting}/seed{s}/dr")) for s in seeds]
        gaps = [dr["dice"]["all"] - plain["dice"]["all"] for plain, dr in pairs if plain and dr]
        if gaps:
            rows.append(
                Row(
                    "public_pretraining",
                    f"{setting}: held-out Dice, domain-randomized − plain public pretraining ({len(gaps)} seeds)",
                    f"{min(gaps):+.3f} .. {max(gaps):+.3f}",
                    "–",
                    "–",
                )
            )
    return rows


def subspace_capacity(d: dict[str, Any]) -> list[Row]:
    """Share of the all-weights gain over the public model each trained subspace recovers (non-private FedAvg)."""
    rows = []
    for seed, ctx in d["context"].items():
        public = ctx["public_test"]["all"]
        runs = [r for r in d["rows"] if str(r["seed"]) == str(seed)]
        full = next((r["test"]["all"] for r in runs if r["spec"] == "all"), None)
        for r in runs:
            if r["spec"] == "all" or full is None or full <= public:
                continue
            share = (r["test"]["all"] - public) / (full - public)
            rows.append(
                Row(
                    "subspace_capacity",
                    f"seed {seed}: {r['spec']} ({r['trained_weights']:,} weights) share of the all-weights gain",
                    f"{share:.0%} ({r['test']['all']:.3f} vs {full:.3f}, public {public:.3f})",
                    "≥ 80 %",
                    _verdict(share >= 0.8),
                )
            )
    return rows


def pacs(d: dict[str, Any]) -> list[Row]:
    """bench_pacs.py (issue 22 part 1): the PACS round trip per volume size; the DICOM SEG read back must equal the
    label map voxel by voxel (no time goal was set)."""
    return [
        Row(
            "pacs",
            f"{r['size']}³: fetch series / write SEG / store SEG (s, median of {r['repeats']})",
            f"{r['fetch_series_s']:.2f} / {r['seg_write_s']:.2f} / {r['seg_stow_s']:.2f}; SEG {r['seg_mb']:.2f} MB",
            "SEG read back == label",
            _verdict(bool(r["equal"])),
        )
        for r in d["rows"]
    ]


def subspace_dp(d: dict[str, Any], name: str = "privacy_utility_subspace58") -> list[Row]:
    """DP on a small subspace (issue 24): the usual DP − non-private rows, plus the issue's per-site goal for the DP
    global model at ε ≤ 8: every site gains ≥ 0.03 over the public model (worst site shown)."""
    rows = privacy_utility(d, name)
    public = d.get("public_pretraining_only") or {}
    for r in d["rows"]:
        eps = r.get("target_epsilon")
        if eps is None or eps > 8 or not public:
            continue
        gains = {s: r["dice"][s] - public[s] for s in r["dice"] if s != "all" and s in public}
        worst = min(gains, key=gains.get)
        rows.append(Row(name, f"DP global (ε ≈ {_eps(r.get('epsilon', eps))}) − public model, worst site ({worst})",
                        f"{gains[worst]:+.3f} (pooled {r['dice']['all'] - public['all']:+.3f})", "≥ +0.03 every site",
                        _verdict(gains[worst] >= 0.03)))  # fmt: skip
    return rows


def site_models(d: dict[str, Any]) -> list[Row]:
    """bench_site_models.py: the model each site serves (a global model + the site's local part) against non-private
    FedAvg on that site (issue 24: within 0.02) and against the site training alone (must be better), worst site."""
    rows = [Row("site_models", "public model alone, pooled held-out Dice", f"{r['pooled']:.3f}", "–", "–")
            for r in d["rows"] if r["run"] == "public"]  # fmt: skip
    fedavg = d["args"].get("fedavg")
    by_run = {r["run"]: r for r in d["rows"]}
    reference = by_run.get(f"{fedavg} (global only)")
    alone = [r for r in d["rows"] if r["run"].startswith("site alone")]
    for r in d["rows"]:
        if not r["run"].endswith(" + local part") or r["run"] == f"{fedavg} + local part":
            continue
        sites = sorted(r["sites"])
        if reference is not None:
            gaps = {s: r["sites"][s]["dice"] - reference["sites"][s]["dice"] for s in sites}
            worst = min(gaps, key=gaps.get)
            rows.append(Row("site_models", f"{r['run']} − FedAvg on the same site (worst site, {worst})",
                            f"{gaps[worst]:+.3f} (pooled {r['pooled']:.3f} vs {reference['pooled']:.3f})",
                            "≥ −0.02", _verdict(gaps[worst] >= -0.02)))  # fmt: skip
        if alone:
            margins = {s: r["sites"][s]["dice"] - max(a["sites"][s]["dice"] for a in alone) for s in sites}
            worst = min(margins, key=margins.get)
            rows.append(Row("site_models", f"{r['run']} − best site-alone model (worst site, {worst})",
                            f"{margins[worst]:+.3f}", "> 0", _verdict(margins[worst] > 0)))  # fmt: skip
    return rows


def fedstats(d: dict[str, Any]) -> list[Row]:
    """bench_fedstats.py (issue 22 part 3): median error of the DP statistics a site releases, per ε and cases."""
    return [
        Row(
            "fedstats",
            f"DP statistics at ε = {r['epsilon']:g} (δ = 1e-5), {r['cases']} cases/site: median abs error",
            f"count {r['median_abs_count']:.3g}, GA mean {r['median_abs_ga_mean']:.3g} wk, voxel size "
            f"{r['median_abs_voxel_mean']:.3g} mm, orientation right {r['orientation_right']:.0%}",
            "–",
            "–",
        )
        for r in d["rows"]
    ]


def poisoning(d: dict[str, Any]) -> list[Row]:
    """bench_poisoning.py: held-out Dice with one attacking site minus the clean FedAvg run, per aggregation; the goal
    (issue 19: within 0.02) applies to the robust options (median, trimmed mean, or any clipped aggregation)."""
    sites, goal, clip, reference = d["settings"]["sites"], d["goal"], d["settings"].get("clip"), d["reference"]
    rows = []
    for r in d["rows"]:
        gap = r["attacked"] - reference
        robust = r["method"] != "mean" or clip is not None
        rows.append(
            Row(
                "poisoning",
                f"{r['label']}: held-out Dice with 1 attacker of {sites} sites − clean FedAvg",
                f"{r['attacked']:.3f} − {reference:.3f} = {gap:+.3f}",
                f"≥ −{goal:g}" if robust else "–",
                _verdict(gap >= -goal) if robust else "–",
            )
        )
    return rows


def scale(d: dict[str, Any]) -> list[Row]:
    """bench_scale.py: per-round time, server memory and bytes as the federation grows (3 → 10 → 30 sites), the
    largest federation that completed a job (issue 19: 30), and the run where sites die mid-round (must complete
    with the survivors)."""
    done = [r for r in d["runs"] if r.get("job_completed")]
    rows = []
    if done:
        first = lambda r: r["rounds"][0]  # noqa: E731  (every size has round 0; it also holds the start-up)
        rows.append(
            Row(
                "scale",
                f"{' → '.join(str(r['sites']) for r in done)} sites ({done[0]['threads']} simulator threads): round 0 "
                "time; server peak RSS; MB received by the server in the round",
                "; ".join(
                    f"{r['sites']}: {first(r)['seconds']:.0f} s, {r['server_peak_rss_mb']:.0f} MB, "
                    f"{(first(r)['received_stream'] + first(r)['received_envelope']) / 2**20:.1f} MB"
                    for r in done
                ),
                "–",
                "–",
            )
        )
    largest = max((r["sites"] for r in done), default=0)
    rows.append(Row("scale", "largest simulated federation that completed a job", f"{largest} sites", "≥ 30 sites",
                    _verdict(largest >= 30)))  # fmt: skip
    for f in d.get("faults") or [d.get("fault")]:
        if not f or "skipped" in f:
            continue
        waited = [w["waited_after_last_update_s"] for w in f.get("waits", []) if "waited_after_last_update_s" in w]
        how = {"stop": "process frozen", "kill": "process killed"}.get(f.get("how", "kill"), "?")
        # a killed simulator worker also ends the simulator's client thread (a simulator limit): diagnostic only
        goal = "completes" if f.get("how") == "stop" else "–"
        continuing = sum(1 for w in f.get("waits", []) if w.get("closed") == "continuing")
        rows.append(
            Row(
                "scale",
                f"{f['sites']} sites, {len(f['dying_sites'])} dying mid-round ({how}), min_clients "
                f"{f['min_clients']}: the job completes with the survivors",
                f"{'completed' if f['job_completed'] else 'did not complete'}, {continuing} of "
                f"{len(f.get('waits', []))} rounds continued without the dead; server waited "
                + (", ".join(f"{w:.0f}" for w in waited) or "–")
                + f" s after the last live update (straggler_wait_s {f['straggler_wait_s']})",
                goal,
                _verdict(bool(f["job_completed"]) and continuing >= 1) if goal != "–" else "–",
            )
        )
    return rows


def secure_aggregation(d: dict[str, Any], name: str = "secure_aggregation") -> list[Row]:
    """bench_secure_aggregation.py: secure aggregation ÷ plain FedAvg per round in the same run (issue 20: time ≤ 1.10×,
    bytes per site ≤ 1.05×), and the maths' cost at the sites and the server for 3, 10 and 30 sites; with ``--he``
    also NVFlare's HE option ÷ plain (for comparison, no goal)."""
    rows = []
    for sim in (d.get("simulation"), d.get("simulation_long")):
        if not sim or sim.get("time_ratio_median") is None:
            continue
        n, steps = len(sim["sites"]), sim.get("steps_per_round", 2)
        tr, br = sim["time_ratio_median"], sim["bytes_ratio_median"]
        what = f"round wall time, secure ÷ plain FedAvg ({n} sites, {steps} local steps/round, same run, rounds 1+)"
        per_round = ", ".join(_ratio(x) for x in sim.get("time_ratio_rounds_1_plus") or [])
        rows.append(Row(name, what, f"{_ratio(tr)} median (rounds: {per_round})", "≤ 1.10×", _verdict(tr <= 1.10)))
        what = f"bytes sent per site per round, secure ÷ plain ({n} sites, {steps} local steps/round)"
        rows.append(Row(name, what, f"{br:.4f}×", "≤ 1.05×", _verdict(br <= 1.05)))
        if sim.get("he_time_ratio_median") is not None:
            what = f"NVFlare HE (TenSEAL CKKS) ÷ plain: round time; bytes per site ({n} sites, {steps} steps/round)"
            he_t, he_b = sim["he_time_ratio_median"], sim["he_bytes_ratio_median"]
            rows.append(Row(name, what, f"{_ratio(he_t)}; {he_b:.1f}×", "–", "–"))
    for r in d["scale"]:
        t = {k: v * 1e3 for k, v in r["seconds"].items()}
        what = (f"{r['sites']} sites, maths only: masking per site; server unmasking with 0 / {r['dropped']} dropped "
                "(plain weighted sum)")  # fmt: skip
        result = (f"{t['mask_site']:.0f} ms; {t['server_finish']:.0f} / {t['server_finish_drop']:.0f} ms "
                  f"({t['plain_sum']:.0f} ms)")  # fmt: skip
        rows.append(Row(name, what, result, "–", "–"))
    return rows


def encrypted_inference(d: dict[str, Any]) -> list[Row]:
    """bench_encrypted_inference.py (issue 21): whole volumes through the two-party protocol; goal at 64³ with
    encrypted weights: ≥ 99.9 % voxel agreement with plaintext, ≤ 2 min and ≤ 10 GB per party. A REDUCED run (other
    sizes or grid) shows its numbers without a verdict."""
    rows = []
    tag = " (REDUCED)" if d.get("reduced") else ""
    for r in d["runs"]:
        p = r["parties"]
        secs = max(p[k].get("seconds", float("inf")) for k in ("data_owner", "model_owner"))
        gb = max(v.get("crypten_bytes", float("inf")) for v in p.values()) / 1e9
        at_goal = not d.get("reduced") and r["size"] == 64 and r["mode"] == "encrypted"
        what = f"{r['size']}³ whole volume, {r['mode']} weights{tag}: agreement; slowest party; most traffic per party"
        result = f"{100 * r['agreement']:.3f} %; {secs:.0f} s; {gb:.2f} GB"
        ok = (r["agreement"] >= 0.999 and secs <= 120 and gb <= 10) if at_goal else None
        rows.append(Row("encrypted_inference", what, result, "≥ 99.9 %; ≤ 120 s; ≤ 10 GB" if at_goal else "–",
                        _verdict(ok)))  # fmt: skip
    return rows


SUMMARIZERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "infer": infer,
    "infer_feta": lambda d: infer(d, "infer_feta"),
    "dp": dp,
    "fl": fl,
    "fl_overhead": fl_overhead,
    "fl_overhead_long": lambda d: fl_overhead(d, "fl_overhead_long"),  # rounds of ~30 s
    "fl_schedule": fl_schedule,
    "fl_schedule_nvflare": lambda d: fl_schedule(d, "fl_schedule_nvflare"),  # FedAvg through the NVFlare job
    "attacks": attacks,
    "privacy_utility": privacy_utility,
    "privacy_utility_n768": lambda d: privacy_utility(d, "privacy_utility_n768"),  # 8× the cases per site
    "privacy_utility_public96": lambda d: privacy_utility(d, "privacy_utility_public96"),  # stronger public start
    "load": load,
    "baseline": baseline,
    "privacy_utility_dpgd": lambda d: privacy_utility_runs(d, "privacy_utility_dpgd"),  # full-batch DP-GD per subspace
    # full-batch DP-GD on norm+bias+head, 58 training cases per site (issue 24's larger federation)
    "privacy_utility_subspace58": subspace_dp,
    "public_pretraining": public_pretraining,
    "subspace_capacity": subspace_capacity,
    "scale": scale,
    "secure_aggregation": secure_aggregation,
    "secure_aggregation_he": lambda d: secure_aggregation(d, "secure_aggregation_he"),  # + NVFlare's HE, same run
    "encrypted_inference": encrypted_inference,
    "fedstats": fedstats,
    "encrypted_inference_patch48": encrypted_inference,  # one window of the bundle's own 48³ patch (2 mm grid)
    "encrypted_inference_64": encrypted_inference,  # the goal's whole 64³ volume (8 windows), encrypted weights
    "poisoning": poisoning,
    "poisoning_clip": poisoning,  # the same with clip_update_norm for every method
    "site_models": site_models,
    "pacs": pacs,  # PACS round trip with a real Orthanc  # DP global + local part vs FedAvg vs the site alone
}


def summarize(name: str, path: Path) -> list[Row]:
    """Rows for one result file; a layout this module does not understand is an error that names the file."""
    data = json.loads(path.read_text())
    try:
        rows = SUMMARIZERS[name](data)
    except (KeyError, IndexError, TypeError, ValueError, ZeroDivisionError, StopIteration) as e:
        raise ValueError(f"{path}: unexpected result layout for the {name!r} summary ({type(e).__name__}: {e})") from e
    return rows


def table(rows: list[Row]) -> str:
    lines = ["| benchmark | measure | result | goal | verdict |", "|---|---|---|---|---|"]
    lines += [f"| {r.benchmark} | {r.measure} | {r.result} | {r.goal} | {r.verdict} |" for r in rows]
    return "\n".join(lines)
