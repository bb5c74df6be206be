"""Federated statistics (issue 22 part 3): how close the DP statistics a site releases are to the truth.

For each ε (the request's target, δ = 1e-5, PRV accountant; the default request's 12 Gaussian releases per site)
and each number of cases per site, real per-patient records of a synthetic site (``write_federation``, 32³, read
with the job's own ``nvflare_jobs.statistics.site_data.patient_records``) are released ``--seeds`` times with
``privacy.statistics.SiteStatisticsRelease`` (the mechanism the NVFlare job runs at every site) and compared with
the un-noised values: median absolute error of the case count, of the GA mean (NVFlare's sum ÷ count, kept in the
range), of the voxel-size mean, how often the most common orientation is right, and the L1 distance between the
noised and true intensity histograms, normalised (each ÷ its sum; 0 = same shape, 2 = disjoint).

The NVFlare plumbing around it is measured by the tests (tests/nvflare_jobs/statistics/test_simulation.py) and the
POC run in docs/federated_statistics.md; this script measures utility only.

    python bench/bench_fedstats.py                      # ε 1, 2, 4, 8 × 8, 32, 128 cases, 200 seeds
    python bench/bench_fedstats.py --eps 2 --cases 8 --seeds 20 --out /tmp/fedstats.md   # smoke run

Writes bench/results/fedstats.md and fedstats.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fetalseg.data.federation import write_federation  # noqa: E402
from nvflare_jobs.statistics.config import load_stats_config  # noqa: E402
from nvflare_jobs.statistics.site_data import patient_records  # noqa: E402
from privacy.statistics import SiteStatisticsRelease, StatisticsRequest  # noqa: E402


def _measure(request: StatisticsRequest, records, seeds: int) -> dict[str, float]:
    n = records.n_patients
    ga = records.values["gestational_age_weeks"]
    vox = records.values["voxel_size_mm"]
    orient_true = int(np.bincount((records.values["orientation"] - 0.5).astype(int), minlength=8).argmax())
    hist_true = records.distributions["intensity"].sum(axis=0)
    hist_true = hist_true / hist_true.sum()
    err: dict[str, list[float]] = {
        "count": [],
        "ga_mean": [],
        "voxel_mean": [],
        "orientation_ok": [],
        "intensity_l1": [],
    }
    for seed in range(seeds):
        rel = SiteStatisticsRelease(request, records, rng=np.random.default_rng(seed))
        count = max(round(rel.count("voxel_size_mm")), 1)
        err["count"].append(abs(count - n))
        for key, name, truth in (("ga_mean", "gestational_age_weeks", ga), ("voxel_mean", "voxel_size_mm", vox)):
            spec = request.feature(name)
            c = max(round(rel.count(name)), 1)
            s = rel.sum(name) - spec.center * rel.count(name) + spec.center * c
            mean = min(max(s / c, spec.low), spec.high)  # what NVFlare shows (the job keeps its sum in range)
            err[key].append(abs(mean - float(np.mean(truth))))
        err["orientation_ok"].append(float(int(np.argmax(rel.histogram("orientation"))) == orient_true))
        h = np.asarray(rel.histogram("intensity"))
        h = h / h.sum() if h.sum() > 0 else np.full_like(h, 1 / h.size)
        err["intensity_l1"].append(float(np.abs(h - hist_true).sum()))
    out = {f"median_abs_{k}": float(np.median(v)) for k, v in err.items() if k != "orientation_ok"}
    out["orientation_right"] = float(np.mean(err["orientation_ok"]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eps", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--cases", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--seeds", type=int, default=200)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fedstats.md")
    args = p.parse_args(argv)
    base = load_stats_config()
    rows = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        (site,) = write_federation(Path(tmp) / "fed", n_sites=1, cases_per_site=max(args.cases), shape=(32, 32, 32))
        full = patient_records(site, base.request, site="site-1")
        for n in args.cases:
            records = type(full)(
                n_patients=n,
                values={k: v[:n] for k, v in full.values.items()},
                distributions={k: v[:n] for k, v in full.distributions.items()},
            )
            for eps in args.eps:
                req = StatisticsRequest.from_dict({**base.raw_request, "privacy": {"epsilon": eps, "delta": 1e-5}})
                rows.append(
                    {
                        "epsilon": eps,
                        "planned_epsilon": req.planned_epsilon,
                        "sigma": req.sigma,
                        "cases": n,
                        **_measure(req, records, args.seeds),
                    }
                )
                print(rows[-1], flush=True)
    head = (
        "| ε (δ=1e-5) | σ | cases/site | count: median abs err | GA mean: median abs err (wk) | voxel size mean: "
        "median abs err (mm) | most common orientation right | intensity histogram L1 (0..2) |"
    )
    lines = [
        "# Federated statistics: DP error vs ε and cases per site",
        "",
        f"{args.seeds} seeds per cell; default request (12 Gaussian releases per site, PRV accountant); one synthetic "
        f"site (32³, {max(args.cases)} cases, first n used); the mechanism the NVFlare job runs "
        "(privacy.statistics). Made by bench/bench_fedstats.py in "
        f"{time.time() - t0:.0f} s.",
        "",
        head,
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['epsilon']:g} | {r['sigma']:.3g} | {r['cases']} | {r['median_abs_count']:.3g} | "
            f"{r['median_abs_ga_mean']:.3g} | {r['median_abs_voxel_mean']:.3g} | {r['orientation_right']:.0%} | "
            f"{r['median_abs_intensity_l1']:.3g} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
