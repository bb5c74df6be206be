"""Show the federated statistics: one table (a row per site and the federation) and one plot per feature.

For the site admin and the ML engineer (``fetal-fl fl stats show``) and for the demo report (the lead's
``fetal_fl/report.py`` calls :func:`report_section`). Everything shown is a DP release or post-processing of one:
counts are noised (so they need not be whole or add up), histograms are in units of patients (each patient weighs
1, intensity histograms included), means and spreads come from noised sums. The ε shown is the request's plan,
the same at every site and charged to each site's ledger.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nvflare_jobs.statistics.config import StatsJobConfig
from nvflare_jobs.statistics.generator import DATASET_NAME
from nvflare_jobs.statistics.site_data import ORIENTATIONS

GLOBAL = "Global"  # NVFlare's name for the federation's row
NOT_DP_NOTE = (
    "NVFlare's own statistics filters (MinCountCleanser: a feature whose count is under min_count is withheld; "
    "HistogramBinsCleanser, if configured) are not differential privacy: they run on values that are already "
    "noised, so they add no guarantee and cost no ε."
)


def load_result(path: str | Path) -> dict[str, Any]:
    """The statistics file NVFlare's JsonStatsFileWriter wrote (feature → statistic → site → dataset → value)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics result {path} does not exist")
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a statistics result (top level must be an object)")
    return data


def value(result: dict[str, Any], feature: str, statistic: str, site: str) -> Any:
    """One released value (None when NVFlare withheld it, e.g. under min_count)."""
    return result.get(feature, {}).get(statistic, {}).get(site, {}).get(DATASET_NAME)


def sites_of(result: dict[str, Any]) -> list[str]:
    names: set[str] = set()
    for stats in result.values():
        for per_site in stats.values():
            names.update(per_site)
    return sorted(n for n in names if n != GLOBAL) + ([GLOBAL] if GLOBAL in names else [])


def histogram_counts(result: dict[str, Any], feature: str, site: str) -> list[float] | None:
    bins = value(result, feature, "histogram", site)
    return None if not bins else [float(b[2]) for b in bins]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{float(v):.{digits}g}"


def top_orientation(result: dict[str, Any], site: str, feature: str = "orientation") -> str:
    counts = histogram_counts(result, feature, site)
    if not counts or max(counts) <= 0:
        return "—"
    i = max(range(len(counts)), key=counts.__getitem__)
    share = counts[i] / sum(counts)
    return f"{ORIENTATIONS[i] if i < len(ORIENTATIONS) else '?'} ({share:.0%})"


def format_table(result: dict[str, Any], config: StatsJobConfig) -> str:
    """Markdown: cases, GA (n, mean ± spread), voxel size, most common orientation, mean intensity per site."""
    names = {f.name for f in config.request.features}
    first = (
        next(f.name for f in config.request.features if not f.optional)
        if any(not f.optional for f in config.request.features)
        else config.request.features[0].name
    )
    cols = ["site", "cases (noised)"]
    if "gestational_age_weeks" in names:
        cols += ["GA n", "GA mean (wk)", "GA spread (wk)"]
    if "voxel_size_mm" in names:
        cols += ["voxel size (mm)"]
    if "slice_thickness_mm" in names:
        cols += ["slice thickness (mm)"]
    if "orientation" in names:
        cols += ["most common orientation"]
    if "intensity" in names:
        cols += ["mean intensity"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for site in sites_of(result):
        row = [site if site != GLOBAL else "**all sites**", _fmt(value(result, first, "count", site))]
        if "gestational_age_weeks" in names:
            row += [
                _fmt(value(result, "gestational_age_weeks", "count", site)),
                _fmt(value(result, "gestational_age_weeks", "mean", site)),
                _fmt(value(result, "gestational_age_weeks", "stddev", site)),
            ]
        if "voxel_size_mm" in names:
            row.append(_fmt(value(result, "voxel_size_mm", "mean", site)))
        if "slice_thickness_mm" in names:
            row.append(_fmt(value(result, "slice_thickness_mm", "mean", site)))
        if "orientation" in names:
            row.append(top_orientation(result, site))
        if "intensity" in names:
            row.append(_fmt(value(result, "intensity", "mean", site), 4))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def privacy_line(config: StatsJobConfig) -> str:
    r = config.request
    return (
        f"Each site released {r.planned_releases()} noised statistics (Gaussian mechanism, noise multiplier "
        f"σ={r.sigma:.3g}): ε={r.planned_epsilon:.3g} at δ={r.delta:g} ({r.accountant} accountant), one patient = "
        "the privacy unit, charged to each site's privacy ledger with its training jobs."
    )


def plot(result: dict[str, Any], config: StatsJobConfig, out_dir: str | Path) -> list[Path]:
    """One PNG per histogram feature: each site's noised histogram (patients per bin) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    sites = [s for s in sites_of(result) if s != GLOBAL]
    for spec in config.request.features:
        if not any(histogram_counts(result, spec.name, s) for s in sites):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        edges = spec.bin_edges()
        centers = (edges[:-1] + edges[1:]) / 2
        for site in sites:
            counts = histogram_counts(result, spec.name, site)
            if counts:
                if spec.kind == "category":
                    ax.bar(
                        centers + (sites.index(site) - len(sites) / 2) * 0.8 / len(sites),
                        counts,
                        width=0.8 / len(sites),
                        label=site,
                        align="edge",
                    )
                else:
                    ax.step(centers, counts, where="mid", label=site)
        if spec.kind == "category" and spec.name == "orientation":
            ax.set_xticks(centers, list(ORIENTATIONS)[: len(centers)], fontsize=7)
        ax.set_xlabel(spec.name)
        ax.set_ylabel("patients (noised)")
        ax.set_title(f"{spec.name}: DP histogram per site", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"stats_{spec.name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def report_section(result_path: str | Path, config: StatsJobConfig, out_dir: str | Path) -> str:
    """A Markdown section for the demo report: the table, the privacy line, the plots (written to ``out_dir``)."""
    result = load_result(result_path)
    plots = plot(result, config, out_dir)
    parts = [
        "## The federation before training (federated statistics, differentially private)",
        "",
        privacy_line(config),
        "",
        format_table(result, config),
        "",
        "Counts are noised (they need not be whole or add up); spreads are each site's spread around the "
        "federation's mean. " + NOT_DP_NOTE,
        "",
    ]
    parts += [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(parts) + "\n"


def simulate_and_report(
    workspace: str | Path,
    *,
    data_root: str | Path,
    out_dir: str | Path,
    config: StatsJobConfig | None = None,
    sites: list[str] | None = None,
) -> tuple[Path, str]:
    """Run the statistics job in NVFlare's simulator on ``data_root/<site>/`` and return (result file, Markdown
    section with the plots written to ``out_dir``) — the one call the demo report needs.

    ``config`` defaults to ``nvflare_jobs/statistics/config.json`` (ε = 2 per site); ``sites`` overrides its sites.
    The sites charge ``$FETAL_FL_PRIVACY_LEDGER`` when it is set; set ``require_ledger`` false in ``config`` to run
    without one (ε reported, not charged). Raises RuntimeError with the sites' reasons when no result was written.
    """
    from nvflare_jobs.statistics.config import load_stats_config
    from nvflare_jobs.statistics.job import run_simulation

    cfg = config or load_stats_config()
    changes: dict[str, Any] = {"data_root": str(Path(data_root).resolve())}
    if sites is not None:
        changes["sites"] = list(sites)
    cfg = cfg.with_changes(**changes)
    result_path = run_simulation(cfg, workspace)
    return result_path, report_section(result_path, cfg, out_dir)
