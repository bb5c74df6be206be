"""The demo's report: ``<out>/report/report.md`` plus PNG figures, from what the demo's runs produced.

Everything here is read from files and objects the runs left behind (the job's round metrics and DP-SGD state,
the baselines' scores, ``bench/results/*.md``); nothing is trained or re-scored except the slice pictures, which
segment a few held-out cases with the installed federated model.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH_RESULTS = REPO / "bench" / "results"
# experiment names the demo produces and the per-site table reads
PUBLIC = "public pretraining only"
PRIVATE = "federated+privacy"
PRIVATE_LOCAL = "federated+privacy + local part"

FILTER_WORDS = {
    "RequireDPSGD": "refuses to send anything that is not a DP-SGD-trained weight difference within the site's "
    "ε/δ limits (checked on the DP report attached to every update)",
    "FailClosedPercentilePrivacy": "zeroes every |Δw| below the percentile, clips the rest to ±gamma; fails "
    "closed (an update it cannot filter is not sent). Not differential privacy; still a dense array",
    "PercentilePrivacy": "NVFlare's percentile sharing: zeroes small |Δw|, clips the rest. Not differential privacy",
    "SparsePercentileFilter": "sends only the largest |Δw| as a sparse payload (fewer bytes). Not differential privacy",
    "SVTPrivacy": "NVFlare's sparse vector technique; its own ε ledger is not meaningful at model scale",
    "ClientDPFilter": "clips and noises the whole update (client-level DP)",
}


@dataclass
class DemoRun:
    """Everything the demo hands to the report."""

    out: Path
    size: str
    shape: int
    cases_per_site: int
    variant: str | None
    rounds: int
    local_epochs: int
    mode: str
    sites: list[str]
    splits: list[Any]
    bundle: Any
    experiments: list[Any]
    private_rows: list[dict[str, Any]]
    plain_rows: list[dict[str, Any]]
    job_config: dict[str, Any]
    job_dir: Path
    installed: dict[str, Any]
    server_command: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    fl_info: dict[str, Any] = field(default_factory=dict)
    public: Any = None  # fetal_fl.demo.PublicStart, or None when every model started from fresh weights
    site_state: Path | None = None  # the sites' own state folder (FETAL_FL_SITE_STATE): DP-SGD state, local parts
    installed_sites: dict[str, dict[str, Any]] = field(default_factory=dict)  # site -> what its app serves
    statistics: Any = None  # (result file, StatsJobConfig) of the federated statistics job, or why it is missing


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


# -- figures ------------------------------------------------------------------------------------------------------
def _run_delta(run: Any) -> float:
    """The δ the run's DP-SGD used (the engine's default, 1e-5 per site, when the config does not say)."""
    dp = (run.job_config.get("privacy", {}) or {}).get("dp_sgd") or {}
    return float(dp.get("delta", 1e-5))


def plot_rounds(rows_by_run: dict[str, list[dict[str, Any]]], key: str, ylabel: str, path: Path) -> Path | None:
    """One line per site (and per run) of a per-round site metric; None when no run reported it."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for run, rows in rows_by_run.items():
        sites = sorted({s for r in rows for s in r["sites"]})
        for site in sites:
            pts = [(r["round"] + 1, r["sites"][site][key]) for r in rows if key in r["sites"].get(site, {})]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{site} ({run})")
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_privacy_utility(
    points: list[tuple[str, float, float]], refs: dict[str, float], path: Path, *, delta: float = 1e-5
) -> Path:
    """Mean held-out Dice against ε (largest over sites) for the private runs; runs without DP as lines."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, eps, dice in points:
        ax.scatter([eps], [dice], s=40, zorder=3)
        ax.annotate(name, (eps, dice), fontsize=7, xytext=(4, 4), textcoords="offset points")
    for i, (name, dice) in enumerate(refs.items()):
        ax.axhline(dice, linestyle="--", color=f"C{i + 1}", label=f"{name} (no DP, ε = ∞)")
    ax.set_xlabel(f"ε (largest over sites, δ = {delta:g})")
    ax.set_ylabel("mean held-out Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if refs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _colour_map() -> Any:
    import numpy as np

    from fetalseg.labels import all_labels

    labels = all_labels()
    lut = np.zeros((max(lab.value for lab in labels) + 1, 4), dtype=float)
    for lab in labels:
        lut[lab.value, :3] = [c / 255 for c in lab.color]
        lut[lab.value, 3] = 0.0 if lab.value == 0 else 1.0
    return lut


def plot_case(image: Any, truth: Any, pred: Any, title: str, path: Path) -> Path:
    """Axial, coronal and sagittal mid-slices of image, ground truth and prediction in the FeTA colours."""
    import numpy as np

    from fetalseg.labels import foreground_labels

    plt = _plt()
    lut = _colour_map()
    centre = [int(i) for i in np.round(np.argwhere(truth > 0).mean(axis=0))] if truth.any() else [
        s // 2 for s in truth.shape
    ]  # fmt: skip
    views = {
        "axial": lambda v: v[:, :, centre[2]],
        "coronal": lambda v: v[:, centre[1], :],
        "sagittal": lambda v: v[centre[0], :, :],
    }
    fig, axes = plt.subplots(3, 3, figsize=(8, 8.6))
    lo, hi = np.percentile(image, [1, 99])
    for col, (view, cut) in enumerate(views.items()):
        img = np.rot90(cut(image))
        for row, (name, seg) in enumerate((("image", None), ("ground truth", truth), ("prediction", pred))):
            ax = axes[row, col]
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            if seg is not None:
                ax.imshow(lut[np.clip(np.rot90(cut(seg)).astype(int), 0, len(lut) - 1)], alpha=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(view)
            if col == 0:
                ax.set_ylabel(name)
    handles = [
        plt.Rectangle((0, 0), 1, 1, color=[c / 255 for c in lab.color]) for lab in foreground_labels()
    ]  # fmt: skip
    fig.legend(handles, [lab.name.replace("_", " ") for lab in foreground_labels()], loc="lower center", ncol=4,
               fontsize=7)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def case_pictures(run: DemoRun, checkpoint: Path, folder: Path, per_site: int = 1) -> list[tuple[str, Path]]:
    """Segment the first held-out case(s) of each site with the federated model and draw them."""
    import numpy as np

    from fetalseg.bundle import load_checkpoint
    from fetalseg.data.io import read_volume
    from fetalseg.inference import Segmenter

    net = run.bundle.network()
    load_checkpoint(net, checkpoint)
    net.eval()
    segmenter = Segmenter(net, bundle=run.bundle, device="cpu")
    out = []
    for split in run.splits:
        for case in split.test[:per_site]:
            image = np.asarray(read_volume(case.image).array, dtype=np.float32)
            truth = np.asarray(read_volume(case.label).array).astype(np.int16)
            pred = np.asarray(segmenter.segment(case.image).label).astype(np.int16)
            safe = re.sub(r"[^A-Za-z0-9.-]+", "-", str(case.case_id).split("/")[-1])
            path = folder / f"case_{split.site}_{safe}.png"
            title = f"{split.site} / {case.case_id} (held out): federated+privacy model"
            out.append((f"{split.site} / {case.case_id}", plot_case(image, truth, pred, title, path)))
    return out


# -- privacy --------------------------------------------------------------------------------------------------------
def dp_states(job_dir: Path, site_state: Path | None = None) -> dict[str, dict[str, Any]]:
    """The DP-SGD engine state each site kept for the job (``dpsgd_<site>_<job>.json`` in the site's state folder,
    ``site_state``, or under the job's folder)."""
    states: dict[str, dict[str, Any]] = {}
    folders = [job_dir, *([site_state] if site_state is not None and site_state.is_dir() else [])]
    for path in sorted(p for folder in folders for p in folder.rglob("dpsgd_*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        m = re.match(r"dpsgd_(.+?)_", path.name)
        if m:
            states[m.group(1)] = data
    return states


def filters_for(site: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's filters that run on ``site`` (site-scoped ones included)."""
    priv = config.get("privacy", {})
    filters = [f for f in priv.get("filters", []) if not f.get("sites") or site in f["sites"]]
    filters += list(priv.get("sites", {}).get(site, {}).get("filters", []))
    return filters


def _filter_name(f: dict[str, Any]) -> str:
    return str(f.get("path", f.get("type", "?"))).rsplit(".", 1)[-1]


FILTER_LOG = {
    "kept": re.compile(r"percentile_share: kept ([\d.]+)% of values.*?(\d+) -> (\d+) bytes"),
    "allowed": re.compile(r"DP-SGD update allowed \(epsilon=([\d.]+)\)"),
    "refused": re.compile(r"RequireDPSGD.*(refus|reject|violat)", re.IGNORECASE),
}


def filter_actions(job_dir: Path, site: str) -> dict[str, Any]:
    """What the site's filters logged: updates allowed/refused by the policy, share kept, bytes in and out."""
    logs = [p for p in job_dir.rglob("log.txt") if site in p.parts or any(site in part for part in p.parts[-3:])]
    acts: dict[str, Any] = {"allowed": 0, "refused": 0, "kept_pct": [], "bytes_in": 0, "bytes_out": 0, "updates": 0}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if m := FILTER_LOG["kept"].search(line):
                acts["kept_pct"].append(float(m.group(1)))
                acts["bytes_in"] += int(m.group(2))
                acts["bytes_out"] += int(m.group(3))
                acts["updates"] += 1
            elif FILTER_LOG["allowed"].search(line):
                acts["allowed"] += 1
            elif FILTER_LOG["refused"].search(line):
                acts["refused"] += 1
    return acts


def bytes_per_update(job_dir: Path, n_params: int) -> dict[str, Any]:
    """Bytes a site sends per round: from the job's own records when present, else the dense float32 size."""
    for row in _round_records(job_dir):
        for s in row.get("sites", []):
            for key in ("bytes", "payload_bytes", "update_bytes"):
                if isinstance(s.get(key), (int, float)):
                    return {"bytes": int(s[key]), "source": f"round_metrics.jsonl ({key})"}
    return {"bytes": 4 * n_params, "source": "dense float32 weight difference (percentile sharing sends a dense array)"}


def _round_records(job_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for path in job_dir.rglob("round_metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def privacy_section(run: DemoRun) -> list[str]:
    """Per-site privacy summary and the plain words on what is and is not protected."""
    states = dp_states(run.job_dir, run.site_state)
    n_params = sum(p.numel() for p in run.bundle.network().parameters())
    sent = bytes_per_update(run.job_dir, n_params)
    last: dict[str, dict[str, Any]] = {}
    for row in run.private_rows:
        last.update(row["sites"])
    dp = run.job_config.get("privacy", {}).get("dp_sgd") or {}
    lines = [
        "## Privacy, per site",
        "",
        "| site | mechanism | ε | δ | accountant | noise σ | clip C | sample rate | DP steps (empty) "
        "| filters (in order) | policy: allowed / refused | share kept | bytes sent |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for site in run.sites:
        st = states.get(site, {})
        fp = st.get("fingerprint", {})
        steps = sum(int(h[2]) for h in st.get("history", []) if len(h) >= 3) if st.get("history") else None
        eps = last.get(site, {}).get("dp_epsilon")
        delta = last.get(site, {}).get("dp_delta", fp.get("delta", dp.get("delta")))
        names = ", ".join(_filter_name(f) for f in filters_for(site, run.job_config)) or "none"
        acts = filter_actions(run.job_dir, site)
        kept = f"{sum(acts['kept_pct']) / len(acts['kept_pct']):.0f}%" if acts["kept_pct"] else "n/a"
        n_sent = acts["bytes_out"] if acts["updates"] else sent["bytes"] * sum(
            1 for r in run.private_rows if site in r["sites"]
        )  # fmt: skip
        lines.append(
            f"| {site} | DP-SGD (Opacus), sample-level | {_fmt(eps, '.2f')} | {_fmt(delta, '.0e')} | "
            f"{fp.get('accountant', 'n/a')} | {_fmt(fp.get('noise_multiplier', dp.get('noise_multiplier')), '.2f')} | "
            f"{_fmt(fp.get('max_grad_norm', dp.get('max_grad_norm')), '.2f')} | {_fmt(fp.get('sample_rate'), '.3f')} | "
            f"{steps if steps is not None else 'n/a'} ({st.get('empty_steps', 'n/a')}) | {names} | "
            f"{acts['allowed']} / {acts['refused']} | {kept} | {n_sent / 1e6:.2f} MB |"
        )
    lines += [
        "",
        "ε is cumulative over the job at the stated δ (the site's accountant, one per job) and covers everything "
        "the site sent: DP-SGD's steps and any metric it released, noised and composed in the same accountant "
        "(`dp_metrics_epsilon`: the metrics' share; with the default policy a DP site sends no Dice at all, only "
        "counts, and the server keeps the last round's model). Bytes sent: the "
        "percentile filter's own log (payload after filtering, all rounds); where it logged nothing, "
        f"{sent['source']}.",
        "",
        "What each filter did:",
        "",
    ]
    seen = set()
    for site in run.sites:
        for f in filters_for(site, run.job_config):
            name = _filter_name(f)
            if name in seen:
                continue
            seen.add(name)
            args = ", ".join(f"{k}={v}" for k, v in (f.get("args") or {}).items())
            lines.append(f"- **{name}** ({args}): {FILTER_WORDS.get(name, 'project or NVFlare filter')}.")
    if run.job_config.get("scope"):
        lines.append(f"- POC: the job ran under the sites' privacy scope `{run.job_config['scope']}` "
                     "(filters from each site's own privacy.json).")  # fmt: skip
    lines += [
        "",
        "### What is and is not protected",
        "",
        "- **Protected (differential privacy):** each site's *individual training cases*. DP-SGD clips every "
        "case's gradient and adds Gaussian noise; the accountant bounds how much any one case can change what "
        "the site sends, as (ε, δ) over the whole job. Smaller ε is stronger; ε above ~10 is a weak guarantee.",
        "- **Metrics:** with DP-SGD on, a site's validation and test Dice leave it only noised and accounted in "
        "the same ε (or not at all, the default); its training loss and HD95 never leave it.",
        "- **Not differential privacy:** percentile sharing. It only zeroes small weight changes and clips the "
        "rest; it adds no noise and gives no (ε, δ). It reduces what leaks, it does not bound it.",
        "- **Not shared at all:** each site's local part (weights learned from its own cases without DP, kept in "
        "its state folder and its app). No update carries it (the NVFlare client leaves its keys out), and the app "
        "never hands it out (`GET /model` serves the shared part only).",
        "- **Raw images and labels never leave a site**; only filtered weight differences do, over NVFlare's "
        "channels (mutual TLS in POC/production; the simulator runs everything in one machine).",
        "- **Not protected:** the *site-level* fact that a site took part, its data volume (steps per round are "
        "sent as FedAvg weights), and the model itself: the global model is trained on everyone's data and a "
        "membership attack on it is bounded only by the DP guarantee above. " + _aggregation_trust(run.job_config),
    ]
    return lines


def _aggregation_trust(job_config: dict) -> str:
    """What the server (and its operator) sees of each site's update in this job."""
    secagg = ((job_config.get("server") or {}).get("secure_aggregation") or {}) if job_config else {}
    if secagg.get("enabled"):
        return (
            "Secure aggregation was on: the server received each site's update only pairwise-masked and unmasked "
            "only the sum (honest-but-curious server; docs/secure_aggregation.md says what a malicious one can do)."
        )
    return (
        "The server is trusted to aggregate honestly and reads each site's filtered update in the clear: secure "
        "aggregation (`server.secure_aggregation`, docs/secure_aggregation.md) was not on in this job."
    )


# -- the model each site serves -------------------------------------------------------------------------------------
def _site_dice(run: Any, name: str, site: str) -> float | None:
    exp = next((e for e in run.experiments if e.name == name), None)
    if exp is None:
        return None
    return exp.summary.get(site, {}).get("mean", {}).get("dice")


def _accountant(run: Any) -> str:
    """The accountant the sites' DP-SGD used (their engine state; else the job config; else the engine default)."""
    found = {st.get("fingerprint", {}).get("accountant") for st in dp_states(run.job_dir, run.site_state).values()}
    found.discard(None)
    if found:
        return ", ".join(sorted(str(a) for a in found))
    dp = (run.job_config.get("privacy", {}) or {}).get("dp_sgd") or {}
    return str(dp.get("accountant", "prv"))


def site_models_section(run: Any) -> list[str]:
    """Per site, on its own held-out cases: the public model alone, the DP global model, and the DP global model +
    the site's local part (what the site's app serves), with one plain sentence on what each number protects."""
    private = next((e for e in run.experiments if e.name == PRIVATE), None)
    if private is None:
        return []
    eps = private.epsilon or {}
    delta = _run_delta(run)
    accountant = _accountant(run)
    lines = [
        "## The model each site serves",
        "",
        "Mean Dice on each site's own held-out cases. The last column is the model installed in that site's "
        "MONAI Label app (`app/<site>/model.pt` with `local_part.pt` beside it): the best model a site can have "
        "honestly, the shared DP part plus what it learned alone.",
        "",
        "| site | public model alone | DP global | DP global + local part (served) | local part | ε of the DP global |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for site in run.sites:
        local = ((run.installed_sites.get(site) or {}).get("parts") or {}).get("local") or {}
        if local.get("matches_global"):
            cases = local.get("training_cases")
            kept = local.get("fine_tune_epoch_kept")
            part = (
                f"{local.get('parameters')}: {local.get('weights', 0):,} weights, {cases} training cases, "
                f"{local.get('fine_tune_epochs', 0)} fine-tune epochs"
                + (f" (epoch {kept} kept by the site's validation cases)" if kept is not None else "")
            )
            served = _site_dice(run, PRIVATE_LOCAL, site)
        else:
            part = "none installed: the DP global model alone" + (f" ({local['error']})" if local.get("error") else "")
            served = _site_dice(run, PRIVATE, site)
        lines.append(
            f"| {site} | {_fmt(_site_dice(run, PUBLIC, site))} | {_fmt(_site_dice(run, PRIVATE, site))} | "
            f"{_fmt(served)} | {part} | {_fmt(eps.get(site), '.2f')} |"
        )
    lines += [
        "",
        "What each number protects:",
        "",
        "- **Public model alone:** trained on public data only (here one more synthetic site); it holds nothing of "
        "any federation site, so there is nothing to protect and it costs no ε.",
        f"- **DP global (the shared part):** differentially private for every site at the ε in the table, "
        f"δ = {delta:g}, per patient (one training case is the privacy unit), as the {accountant} accountant bounds it "
        "over the whole job; that ε covers everything the site sent (DP-SGD's updates and any metric it released).",
        "- **DP global + local part:** the local part is learned from the site's own cases WITHOUT differential "
        "privacy; it never leaves the site (never sent, not shared, refused by every export), so it has no ε: it "
        "is protected by staying inside the hospital, not by DP.",
    ]
    return lines


# -- tables -------------------------------------------------------------------------------------------------------
def results_section(run: DemoRun) -> list[str]:
    """Comparison table (mean Dice per site) and per-site × per-tissue Dice and HD95 tables per experiment."""
    from fetalseg.metrics import format_table

    cols = [*run.sites, "all"]
    lines = [
        "## Held-out segmentation quality",
        "",
        "Every model is scored on the same held-out cases of every site (fetalseg.baseline split). Budget: "
        f"{run.rounds * run.local_epochs} epochs each (federated: {run.rounds} rounds × {run.local_epochs} local "
        "epoch(s)).",
        "",
        "### Mean Dice per site",
        "",
        "| experiment | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for e in run.experiments:
        cells = [_fmt(e.summary.get(c, {}).get("mean", {}).get("dice")) for c in cols]
        lines.append(f"| {e.name} | " + " | ".join(cells) + " |")
    for e in run.experiments:
        lines += ["", f"### {e.name}: Dice", "", format_table(e.summary, metric="dice")]
        lines += ["", f"### {e.name}: HD95 (mm)", "", format_table(e.summary, metric="hd95")]
    return lines


def bench_section(results: Path = BENCH_RESULTS) -> list[str]:
    """The benchmark tables from ``bench/results/*.md`` (headings demoted under this report's section)."""
    lines = ["## Benchmarks", "", f"From `{results.relative_to(REPO) if results.is_relative_to(REPO) else results}` "
             "(regenerate with `python bench/run_all.py`).", ""]  # fmt: skip
    files = sorted(results.glob("*.md")) if results.is_dir() else []
    if not files:
        return [*lines, "No benchmark results found."]
    for f in files:
        for line in f.read_text().splitlines():
            lines.append("###" + line.lstrip("#") if line.startswith("#") else line)
        lines.append("")
    return lines


# -- the report -------------------------------------------------------------------------------------------------
def statistics_section(run: DemoRun, folder: Path) -> list[str]:
    """How the sites differ before training (:func:`nvflare_jobs.statistics.report.report_section`: DP table, ε,
    plots written to ``folder``); the reason when the job did not run; nothing when the demo did not ask for it."""
    if run.statistics is None:
        return []
    title = "## The federation before training (federated statistics, differentially private)"
    if isinstance(run.statistics, str):
        return [title, "", f"Not available in this run: {run.statistics}", ""]
    from fetalseg.site_env import ENV_PRIVACY_LEDGER
    from nvflare_jobs.statistics.report import report_section

    result_path, config = run.statistics
    lines = report_section(result_path, config, folder).rstrip("\n").splitlines()
    if not config.require_ledger:
        lines += [
            "",
            "This demo runs without site privacy ledgers: the ε above is reported, not charged. A site that sets "
            f"`{ENV_PRIVACY_LEDGER}` charges it to the same ledger as its training jobs and refuses a request its "
            "budget cannot hold (docs/federated_statistics.md).",
        ]
    return [*lines, ""]


def write_report(run: DemoRun) -> Path:
    """Write ``<out>/report/report.md`` and its PNGs; return the Markdown file."""
    folder = run.out / "report"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    rows_by_run = {"DP-SGD + policies": run.private_rows}
    if run.plain_rows:
        rows_by_run["no privacy"] = run.plain_rows
    figs: list[tuple[str, Path | None]] = [
        ("Validation Dice per round per site (the global model each site received)",
         plot_rounds(rows_by_run, "val_mean_dice", "validation mean Dice", folder / "val_dice_per_round.png")),
        ("ε per site per round (cumulative over the job)",
         plot_rounds({"DP-SGD": run.private_rows}, "dp_epsilon", f"ε (δ = {_run_delta(run):g})",
                     folder / "epsilon_per_round.png")),
    ]  # fmt: skip
    points = []
    refs = {}
    for e in run.experiments:
        dice = e.summary.get("all", {}).get("mean", {}).get("dice")
        if dice is None or math.isnan(dice):
            continue
        if e.epsilon:
            points.append((e.name, max(e.epsilon.values()), dice))
        elif e.name in ("federated", "centralized", PUBLIC):
            refs[e.name] = dice
    utility_png = plot_privacy_utility(points, refs, folder / "privacy_utility.png", delta=_run_delta(run))
    figs.append(("Privacy–utility: mean held-out Dice against ε (the points this run produced)", utility_png))
    fed = next(e for e in run.experiments if e.epsilon is not None or e.name.startswith("federated"))
    pictures = case_pictures(run, fed.checkpoint, folder)

    info = run.fl_info
    lines = [
        "# fetal-fl demo report",
        "",
        f"Synthetic federation: {len(run.sites)} sites × {run.cases_per_site} cases of {run.shape}³ "
        f"(bundle variant: {run.variant or 'default'}). Federated training: NVFlare {run.mode}, FedAvg, "
        f"{run.rounds} rounds, DP-SGD at every site and each site's privacy policy.",
        "",
        *(
            [
                f"**Start:** every model (federated, centralized, single-site) starts from a model pretrained "
                f"non-privately on {run.public.cases} cases of one more synthetic site ({run.public.site} "
                f"acquisition profile, {run.public.epochs} epochs, {run.public.seconds:.0f} s). It stands for public "
                "data (e.g. the public FeTA releases): it is not any federation site's data, so it costs no ε and "
                "is not covered by the privacy guarantees below. The row *public pretraining only* is that model "
                "before any federated training: the difference to it is what the sites' data added.",
                "",
            ]
            if run.public is not None
            else [
                "**Start:** fresh weights (`--no-public`). With DP-SGD at these data sizes the private model stays "
                "near chance; a public start is what keeps it usable (docs/privacy.md).",
                "",
            ]
        ),
        f"Installed model: `{run.installed.get('path', run.installed.get('model_path', ''))}` "
        f"(origin {info.get('origin', run.installed.get('origin'))}, job {info.get('job_id')}, round "
        f"{info.get('round')}, validation mean Dice {_fmt(info.get('val_mean_dice'))})"
        + (
            f", with this site's local part; every site has its own app folder ({', '.join(run.installed_sites)}: "
            "see *The model each site serves*)"
            if run.installed_sites
            else ""
        )
        + ". Start the server with:",
        "",
        "```",
        " ".join(run.server_command),
        "```",
        "",
        *(
            [
                "**--quick:** every model here trained for a few steps only (DP-SGD at batch 1 on 3 cases per "
                "site is mostly noise); the numbers and pictures show that the pipeline works end to end, not what "
                "the method achieves. Run the default size (`fetal-fl demo`) for meaningful Dice.",
                "",
            ]
            if run.size == "quick"
            else []
        ),
        *statistics_section(run, folder),
        "Every experiment uses the same split of each site (fetalseg.baseline.split_site): it trains on the train "
        "cases, selects its best round/epoch on the validation cases, and is scored here on the held-out test cases "
        "only.",
        "",
        *results_section(run),
        "",
        *site_models_section(run),
        "",
        "## Figures",
        "",
    ]
    for caption, path in figs:
        if path is not None:
            lines += [f"**{caption}**", "", f"![{caption}]({path.name})", ""]
        elif caption.startswith("Validation Dice") and (run.job_config.get("privacy") or {}).get("dp_sgd"):
            lines += [f"**{caption}**: withheld by the DP-SGD sites (they send Dice only noised and accounted in "
                      "their ε, `privacy.metrics`; docs/privacy.md, \"Metrics a site sends\").", ""]  # fmt: skip
        else:
            lines += [f"**{caption}**: no data reported by the job.", ""]
    lines += ["## Held-out cases (image, ground truth, prediction; FeTA colours)", ""]
    for name, path in pictures:
        lines += [f"![{name}]({path.name})", ""]
    lines += [*privacy_section(run), ""]
    if run.timings:
        lines += ["## Wall time of this run", "", "| step | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in run.timings.items()]
        lines.append("")
    lines += bench_section()
    path = folder / "report.md"
    path.write_text("\n".join(lines) + "\n")
    results = {
        "experiments": {e.name: {"summary": e.summary, "epsilon": e.epsilon} for e in run.experiments},
        "rounds_private": [{"round": r["round"], "sites": r["sites"]} for r in run.private_rows],
        "rounds_plain": [{"round": r["round"], "sites": r["sites"]} for r in run.plain_rows],
        "dp_states": dp_states(run.job_dir, run.site_state),
        "installed_sites": run.installed_sites,
        "installed": run.installed,
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return path
