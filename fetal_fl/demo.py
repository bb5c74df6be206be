"""``fetal-fl demo``: what the project does, on synthetic data, in one command.

Synthesize a 3-site federation and one more "public" site, pretrain the bundle's network on the public site
(non-private: it stands for public data such as the FeTA releases, and costs no site any ε), train the federation
from that model in NVFlare (simulator, or ``--poc``) with DP-SGD and percentile sharing and each site's privacy
policy, compare with single-site and centralized training from the same start at the same budget on the same
held-out cases, install at each site the best honest model it can have (the DP global model + the site's own local
part, learned from its cases without DP and never sent) into a MONAI Label app, and write a report. ``--no-public``
starts everything from fresh weights instead (with DP-SGD at these data sizes that model is useless).

Nothing federated is re-implemented here: the job is ``nvflare_jobs``' own, and progress, ε and the best model
are read from the files the job writes (``metrics/round_metrics.jsonl``, ``fetal_brain_best.pt``,
``cross_site_val/cross_val_results.json``, each site's ``local_<site>_<job>.pt`` in its state folder).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fetal_fl.report import PRIVATE, PRIVATE_LOCAL, PUBLIC  # the experiment names the report reads
from fetalseg.plumbing import stop_process

REPO = Path(__file__).resolve().parents[1]
SITES_POLICY_DIR = REPO / "nvflare_jobs" / "sites"
POLICY_SCOPE = "dp_required"  # the scope of each site's privacy.json the demo job runs under
# The private job's site-local part (job config ``local``): normalization affine parameters, biases and the output
# convolution (~1.6 % of the weights; the group that reached most of the non-private gain in the capacity screen,
# bench/results/subspace_capacity.md), trained at the site and fine-tuned on the final DP global model without DP.
LOCAL_PARAMETERS = "norm+bias+head"
SLICER_MODULE = "FetalBrainSeg"  # slicer_extension/FetalBrainSeg


@dataclass(frozen=True)
class Size:
    """One demo size: data, bundle variant and the shared training budget (epochs = FL rounds x local epochs).

    Every experiment (federated, centralized, single-site) gets ``rounds * local_epochs`` passes over its training
    cases, so the comparison is at the same budget; the baselines validate once per round-equivalent.
    """

    name: str
    shape: int
    cases: int
    variant: str | None
    rounds: int
    local_epochs: int
    steps_per_epoch: int | None
    batch_size: int | None
    plain_fedavg: bool  # also run FedAvg without privacy (one more federated run)
    public_cases: int = 0  # cases of the public site every model starts from (0: fresh weights)
    public_epochs: int = 0
    local_fine_tune_epochs: int = 0  # the site's local part, fine-tuned on the final DP global model (no DP)

    @property
    def epochs(self) -> int:
        return self.rounds * self.local_epochs


# fmt: off
SIZES = {
    "quick": Size("quick", 32, 4, "tiny", 3, 1, None, 1, plain_fedavg=False, public_cases=4, public_epochs=2,
                  local_fine_tune_epochs=2),
    # 64³ × 10 cases/site (6 train / 2 val / 2 test, as bench/bench_baseline.py): 10 rounds × 6 local epochs
    "default": Size("default", 64, 10, None, 10, 6, None, None, plain_fedavg=True, public_cases=10, public_epochs=60,
                    local_fine_tune_epochs=20),
    "feta": Size("feta", 256, 8, "feta", 10, 1, 4, 1, plain_fedavg=False, public_cases=4, public_epochs=4,
                 local_fine_tune_epochs=2),
}
# fmt: on


@dataclass
class Experiment:
    """One row group of the report: a way of training, scored on every site's held-out cases."""

    name: str
    summary: dict[str, Any]
    scores: list[Any] = field(default_factory=list)
    epsilon: dict[str, float] | None = None  # per site, for the privacy-utility plot
    checkpoint: Path | None = None


def register(subparsers: Any) -> None:
    """Add ``fetal-fl demo``."""
    p = subparsers.add_parser(
        "demo",
        help="synthesize 3 sites, train federatedly with privacy, compare, install the model, write a report",
        description="End-to-end demo on synthetic data: NVFlare (simulator or --poc) with DP-SGD + percentile "
        "sharing, single-site and centralized baselines at the same budget, model installed into the MONAI "
        "Label app, report in <out>/report/. Default ~10 minutes on 2 idle CPU cores; --quick ~3 minutes.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="working folder (data, runs, report)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="32³ × 4 cases/site, tiny bundle variant, 3 rounds")
    size.add_argument(
        "--size", choices=sorted(SIZES), default=None, help="default: 64³ × 10 cases/site; feta: 256³ volumes"
    )
    p.add_argument("--poc", action="store_true", help="run the federated job through a local POC system")
    p.add_argument(
        "--no-public",
        action="store_true",
        help="no public pretraining: every model starts from fresh weights (the DP-SGD model stays useless)",
    )
    p.add_argument("--rounds", type=int, help="federated rounds (default depends on the size)")
    p.add_argument("--sites", type=int, default=3, help="number of synthetic sites")
    p.add_argument("--seed", type=int, default=0, help="random seed (data, splits, initial model)")
    p.add_argument("--port", type=int, default=8000, help="port in the printed server command")
    p.add_argument("--serve", action="store_true", help="start the MONAI Label server at the end (Ctrl-C stops it)")
    p.set_defaults(handler=run_demo)


# -- helpers ---------------------------------------------------------------------------------------------------
def _variant_overrides(variant: str | None) -> dict[str, Any]:
    """The bundle variant as job ``bundle_overrides`` (the FL job takes overrides, the app takes a variant)."""
    if not variant:
        return {}
    from fetalseg.paths import bundle_dir

    overlay = json.loads((bundle_dir() / "configs" / "variants" / f"{variant}.json").read_text())
    return {k: v for k, v in overlay.items() if not k.startswith("_")}


def site_policy_filters(site: str, scope: str = POLICY_SCOPE) -> list[dict[str, Any]]:
    """A site's ``privacy.json`` scope as job filters for that site only.

    The simulator does not read site policies, so the demo applies each site's own ``dp_required`` filters
    (RequireDPSGD, fail-closed percentile sharing) as per-site filters; POC runs use the policy files themselves.
    """
    path = SITES_POLICY_DIR / site / "privacy.json"
    if not path.is_file():
        raise FileNotFoundError(f"no privacy policy for {site}: {path} (the demo has policies for site-1..3)")
    scopes = {s["name"]: s for s in json.loads(path.read_text())["scopes"]}
    if scope not in scopes:
        raise ValueError(f"{path} has no scope {scope!r} (scopes: {sorted(scopes)})")
    return [
        {"type": "class", "path": f["path"], "args": dict(f.get("args", {})), "sites": [site]}
        for f in scopes[scope]["task_result_filters"]
    ]


def dp_plan(sites: list[str], *, delta: float = 1e-5, margin: float = 0.9) -> dict[str, Any]:
    """DP-SGD settings that fit every site's policy: noise calibrated (``target_epsilon``) so the whole job ends
    at ``margin`` × the smallest ``max_epsilon`` any site's policy accepts, instead of a site refusing mid-job."""
    limits = [
        float(f["args"]["max_epsilon"])
        for site in sites
        for f in site_policy_filters(site)
        if f["path"].endswith("RequireDPSGD") and f["args"].get("max_epsilon")
    ]
    if not limits:
        return {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": delta}
    return {"target_epsilon": round(margin * min(limits), 3), "max_grad_norm": 1.0, "delta": delta}


def job_config(
    size: Size,
    data_root: Path,
    sites: list[str],
    *,
    rounds: int,
    seed: int,
    private: bool,
    poc: bool,
    initial_checkpoint: Path | None = None,
) -> dict[str, Any]:
    """The federated job config the demo runs (the same schema as nvflare_jobs/fetal_brain/config.json)."""
    privacy: dict[str, Any] = {"filters": [], "dp_sgd": None, "sites": {}}
    scope = None
    local: dict[str, Any] | None = None
    if private:
        privacy["dp_sgd"] = dp_plan(sites)
        if poc:
            scope = POLICY_SCOPE  # each site's privacy.json adds its own filters
        else:
            privacy["filters"] = [f for s in sites for f in site_policy_filters(s)]
        # each site's own part: never sent, fine-tuned without DP on the final DP global model (needs the final
        # evaluation, which brings that model to the sites)
        local = {"parameters": LOCAL_PARAMETERS, "fine_tune_epochs": size.local_fine_tune_epochs}
    config: dict[str, Any] = {
        "description": f"fetal-fl demo ({size.name}, {'DP-SGD + site policies' if private else 'no privacy'})",
        "name": "demo_private" if private else "demo_fedavg",
        "algorithm": "fedavg",
        "num_rounds": rounds,
        "min_clients": max(2, len(sites) - 1),  # one site refusing a round (its policy) does not stop the job
        "sites": sites,
        "scope": scope,
        "bundle_overrides": _variant_overrides(size.variant),
        "data": {"root": str(data_root.resolve()), "val_fraction": 0.25, "split_seed": seed},
        "training": {
            "local_epochs": size.local_epochs,
            "max_steps_per_epoch": size.steps_per_epoch,
            "batch_size": size.batch_size,
            "seed": seed,
        },
        "privacy": privacy,
        "server": {"max_update_norm": 1000.0, "straggler_wait_s": 60, "task_timeout_s": 0},
        "tracking": "tensorboard",
        "cross_site_eval": True,
        "runtime": {"external_process": True, "torch_threads": 1, "init_seed": seed},
        "initial_checkpoint": str(initial_checkpoint.resolve()) if initial_checkpoint else None,
    }
    if local is not None:
        config["local"] = local
    return config


@dataclass
class PublicStart:
    """The model every experiment starts from: pretrained, non-private, on one more synthetic site."""

    site: str
    cases: int
    epochs: int
    checkpoint: Path
    seconds: float


def pretrain_public(
    size: Size, out: Path, *, n_sites: int, seed: int, bundle: Any, domain_randomization: bool = False
) -> PublicStart:
    """Write the public site (the federation's next site: its own acquisition profile) and train on it.

    Its training and held-out cases are all public, so both train; its validation cases pick the epoch. Nothing
    of the federation's sites is used, and no privacy accounting applies (public data). ``domain_randomization``
    turns on the bundle's SynthSeg-style acquisition randomization (``train.json``) for this training only. It is
    off because it was measured to HURT the public model at this budget (10 public cases, 60 epochs: held-out
    Dice 0.50 -> 0.27-0.35, bench/results/public_pretraining.md); the switch stays for larger budgets."""
    from fetalseg.baseline import load_sites
    from fetalseg.bundle import Bundle
    from fetalseg.data.federation import site_seed, write_site
    from fetalseg.data.phantom import site_profiles
    from fetalseg.training import fit

    t0 = time.perf_counter()
    profile = site_profiles(n_sites + 1, seed=seed)[n_sites]
    site_dir = write_site(
        out / "public" / "data" / "public-site", profile, n_cases=size.public_cases, shape=(size.shape,) * 3,
        seed=site_seed(seed, n_sites), overwrite=True,
    )  # fmt: skip
    (split,) = load_sites([site_dir], seed=seed)
    checkpoint = out / "public" / "model.pt"
    if domain_randomization:
        overrides = {**bundle.overrides, "domain_randomization": True}
        bundle = Bundle("train", root=bundle.root, variant=bundle.variant, overrides=overrides)
    fit(
        bundle, [*split.train, *split.test], split.val or split.train, max_epochs=size.public_epochs,
        val_interval=max(1, size.public_epochs // 6), checkpoint=checkpoint, seed=seed,
        checkpoint_info={
            "origin": "fetal-fl demo: public pretraining (non-private)", "trained_on": [profile.name],
            "domain_randomization": bool(domain_randomization),
        },
    )  # fmt: skip
    return PublicStart(profile.name, size.public_cases, size.public_epochs, checkpoint, time.perf_counter() - t0)


def start_network(bundle: Any, public: PublicStart | None) -> Any:
    """A fresh network for a baseline: the public model's weights when there is one."""
    if public is None:
        return None
    from fetalseg.bundle import load_checkpoint

    net = bundle.network()
    load_checkpoint(net, public.checkpoint)
    return net


@contextlib.contextmanager
def fl_environment() -> Iterator[None]:
    """Processes NVFlare starts must find this interpreter as ``python3`` and this checkout's packages."""
    saved = {k: os.environ.get(k) for k in ("PATH", "PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved["PATH"] or ""])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO), saved["PYTHONPATH"] or ""] if p)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def read_rounds(workspace: Path) -> list[dict[str, Any]]:
    """Per-round site metrics the job's server wrote (``metrics/round_metrics.jsonl``), flattened."""
    rows: list[dict[str, Any]] = []
    for path in sorted(workspace.rglob("round_metrics.jsonl")):
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            with contextlib.suppress(json.JSONDecodeError):
                r = json.loads(line)
                sites = {
                    s["name"]: {m["name"]: m["value"] for m in s.get("metrics", [])} | {"_weight": s.get("weight")}
                    for s in r.get("sites", [])
                }
                rows.append({"round": int(r["round"]), "sites": sites, "raw": r})
    by_round = {r["round"]: r for r in rows}  # POC: the server's copy and the downloaded one
    return [by_round[k] for k in sorted(by_round)]


def _print_round(row: dict[str, Any], total: int, n_sites: int) -> None:
    parts = []
    for site, m in sorted(row["sites"].items()):
        eps = m.get("dp_epsilon")
        dice = m.get("val_mean_dice", float("nan"))
        parts.append(f"{site} Dice {dice:.3f}" + (f" ε {eps:.2f}" if eps is not None else ""))
    print(f"  round {row['round'] + 1}/{total}: {len(row['sites'])}/{n_sites} sites done | " + " | ".join(parts))


def run_federated(config: dict[str, Any], workspace: Path, *, poc: bool) -> Path:
    """Run the job with ``fetal-fl fl run --sim|--poc`` in a child process (NVFlare's logs go to a file), printing
    each round as the server records it; return the folder holding the job's results. The sites keep their state
    (DP-SGD accountant, local parts) in ``site_state_dir(workspace)``."""
    from nvflare_jobs.config import ENV_SITE_STATE, JobConfig

    cfg = JobConfig.from_dict(config)  # fail here, with the key's name, before anything starts
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    config_file = workspace.parent / f"{cfg.name}.json"
    config_file.write_text(json.dumps(config, indent=2))
    log_path = workspace.parent / f"{cfg.name}.log"
    cmd = [sys.executable, "-m", "fetal_fl.cli", "fl", "run", "--poc" if poc else "--sim"]
    cmd += ["--config", str(config_file), "--workspace", str(workspace)]
    shown = 0
    with fl_environment(), log_path.open("w") as log:
        env = {**os.environ, ENV_SITE_STATE: str(site_state_dir(workspace))}
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                time.sleep(2.0)
                rows = read_rounds(workspace)
                for row in rows[shown:]:
                    _print_round(row, cfg.num_rounds, len(cfg.sites))
                shown = max(shown, len(rows))
        except BaseException:
            proc.terminate()  # Ctrl-C or an error here: stop the job (its own cleanup stops a POC system)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    for row in read_rounds(workspace)[shown:]:
        _print_round(row, cfg.num_rounds, len(cfg.sites))
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    if proc.returncode != 0:
        raise RuntimeError(f"federated job {cfg.name} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    job_dir = workspace / "result" if poc else workspace / cfg.name
    if not list(job_dir.rglob("fetal_brain_best.pt")):
        raise RuntimeError(f"federated job {cfg.name} wrote no fetal_brain_best.pt under {job_dir}; log {log_path}")
    return job_dir


@dataclass
class StatisticsRun:
    """The federated statistics job running in the background (it mostly waits on NVFlare's polling, so it runs
    beside public pretraining and training instead of adding its ~1 minute to the demo)."""

    process: subprocess.Popen
    config: Any
    workspace: Path
    log_path: Path

    def result(self, timeout_s: float = 900) -> tuple[Path, Any] | str:
        """(result file, config) once the job ends, or the reason it failed (the report says so)."""
        from nvflare_jobs.statistics.job import find_result

        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            stop_process(self.process)
            return f"the statistics job did not end within {timeout_s:.0f} s (log {self.log_path})"
        tail = " / ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-3:])
        if code != 0:
            return f"the statistics job failed (exit {code}, log {self.log_path}): {tail}"
        try:
            return find_result(self.workspace / "sim" / self.config.name, self.config), self.config
        except FileNotFoundError as exc:
            return f"the statistics job wrote no result ({exc}; log {self.log_path})"


def start_statistics(out: Path, sites: list[str], data_root: Path) -> StatisticsRun:
    """Start the federation-before-training step: NVFlare's federated statistics workflow (``fetal-fl fl stats run
    --sim`` in a child process, its log in ``out/fl/statistics.log``) on the demo's sites, default DP request.

    The demo has no site privacy ledgers, so ε is reported, not charged (``--no-ledger``); a real site charges it
    with its training jobs."""
    from nvflare_jobs.statistics.config import load_stats_config

    # min_count 2 (default 3): the --quick sites hold 4 cases and NVFlare's (non-DP) cleanser would hide most rows
    cfg = load_stats_config().with_changes(
        sites=list(sites), data_root=str(data_root.resolve()), require_ledger=False, min_count=2
    )
    workspace = out / "fl" / "statistics"
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.mkdir(parents=True)
    config_file = out / "fl" / "statistics.json"
    config_file.write_text(json.dumps(cfg.to_dict(), indent=2))
    log_path = out / "fl" / "statistics.log"
    cmd = [sys.executable, "-m", "fetal_fl.cli", "fl", "stats", "run", "--sim", "--no-ledger"]
    cmd += ["--config", str(config_file), "--workspace", str(workspace)]
    with fl_environment(), log_path.open("w") as log:
        process = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    return StatisticsRun(process, cfg, workspace, log_path)


def site_state_dir(workspace: Path) -> Path:
    """Where the demo's sites keep their own state (``FETAL_FL_SITE_STATE``): DP-SGD accountant, local parts."""
    return workspace / "site_state"


def local_parts(state_dir: Path, sites: list[str]) -> dict[str, Path]:
    """Each site's final local part (``local_<site>_<job>.pt``, written by the NVFlare client; never sent)."""
    from fetalseg.local_part import read_local_part

    found: dict[str, Path] = {}
    for site in sites:
        for path in sorted(state_dir.glob(f"local_{site}_*.pt")):
            _, info = read_local_part(path)
            if info.get("site") == site and info.get("final"):
                found[site] = path
    return found


def evaluate_site_models(
    checkpoint: Path, parts: dict[str, Path], splits: list[Any], bundle: Any
) -> tuple[list[Any], dict[str, Any]]:
    """Score, on each site's held-out cases, the model that site serves: the global checkpoint with the site's
    local part over it (checked to belong to it, as the app checks); the global model alone where a site has none."""
    from fetalseg.bundle import load_checkpoint
    from fetalseg.evaluation import evaluate_cases
    from fetalseg.local_part import apply_local_part, check_matches_global, read_local_part
    from fetalseg.metrics import summarize

    scores: list[Any] = []
    for split in splits:
        net = bundle.network()
        info = load_checkpoint(net, checkpoint)
        part = parts.get(split.site)
        if part is not None:
            tensors, local_info = read_local_part(part)
            check_matches_global(tensors, local_info, global_state=net.state_dict(), global_info=info, source=part.name)
            apply_local_part(net, tensors, source=part.name)
        net.eval()
        scores += evaluate_cases(net, split.test, bundle=bundle, with_hd95=True)
    return scores, {"summary": summarize(scores), "local_parts": {s: str(p) for s, p in parts.items()}}


def best_checkpoint(job_dir: Path) -> Path:
    """The job's best global model in bundle format (written by nvflare_jobs.checkpoint)."""
    found = sorted(job_dir.rglob("fetal_brain_best.pt"))
    if len(found) != 1:
        raise RuntimeError(f"expected one fetal_brain_best.pt under {job_dir}, found {len(found)}")
    return found[0]


def evaluate_checkpoint(path: Path, splits: list[Any], bundle: Any) -> tuple[list[Any], dict[str, Any]]:
    """Score a checkpoint on every site's held-out (test) cases: the cases every experiment is scored on."""
    from fetalseg.bundle import load_checkpoint
    from fetalseg.evaluation import evaluate_cases
    from fetalseg.metrics import summarize

    net = bundle.network()
    info = load_checkpoint(net, path)
    net.eval()
    scores = evaluate_cases(net, [c for s in splits for c in s.test], bundle=bundle, with_hd95=True)
    return scores, {"summary": summarize(scores), "info": {k: v for k, v in info.items() if _plain(v)}}


def _plain(value: Any) -> bool:
    try:
        json.dumps(value)
    except TypeError:
        return False
    return True


def final_epsilon(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Each site's cumulative ε after its last reported round."""
    eps: dict[str, float] = {}
    for row in rows:
        for site, m in row["sites"].items():
            if m.get("dp_epsilon") is not None:
                eps[site] = float(m["dp_epsilon"])
    return eps


def site_model_path(out: Path, site: str) -> Path:
    """The served model of ``site``'s MONAI Label app in the demo (its local part goes beside it)."""
    return out / "app" / site / "model.pt"


def install_into_app(
    checkpoint: Path, model_path: Path, variant: str | None, *, local_part: Path | None = None
) -> dict[str, Any]:
    """The app's own install (checks, provenance; with the site's local part: checked to belong to this global
    model, installed beside it) into a demo-local served model path (the repo's stays as is)."""
    from apps.fetal_brain.lib.config import AppConfig
    from apps.fetal_brain.lib.model_store import ModelStore
    from apps.fetal_brain.lib.site_model import install_site_model

    conf: dict[str, Any] = {"model_path": str(model_path)}
    if variant:
        conf["variant"] = variant
    config = AppConfig.from_conf(conf)
    bundle = config.bundle("inference")
    store = ModelStore(
        config.resolved_model_path(bundle),
        bundle=bundle,
        device=config.device,
        local_part_path=config.resolved_local_part_path(bundle),
    )
    return install_site_model(checkpoint, store=store, local_part=local_part)


def server_command(studies: Path, model_path: Path, variant: str | None, port: int) -> list[str]:
    """The one command that starts the MONAI Label server with the installed model on 127.0.0.1."""
    cmd = ["fetal-fl", "app", "serve", "--studies", str(studies.resolve()), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--model-path", str(model_path.resolve())]
    if variant:
        cmd += ["--conf", "variant", variant]
    return cmd


def _copy_studies(splits: list[Any], studies: Path) -> list[str]:
    """Held-out images (no labels) as the app's studies folder: what a radiologist would open."""
    if studies.exists():
        shutil.rmtree(studies)
    studies.mkdir(parents=True)
    names = []
    for s in splits:
        for c in s.test:
            src = Path(c.image)
            name = f"{s.site}_{src.name}"
            shutil.copyfile(src, studies / name)
            names.append(name)
    return names


# -- the demo ------------------------------------------------------------------------------------------------------
def run_demo(args: argparse.Namespace) -> int:
    """Run every step; each step prints what it did, the report collects it all."""
    from fetal_fl.report import DemoRun, write_report
    from fetalseg.baseline import load_sites, train_and_evaluate
    from fetalseg.bundle import Bundle
    from fetalseg.data.federation import write_federation

    size = SIZES["quick" if args.quick else (args.size or "default")]
    if args.rounds is not None:
        if args.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        size = dataclasses.replace(size, rounds=int(args.rounds))
    rounds = size.rounds
    if args.sites < 2:
        raise ValueError("--sites must be >= 2")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0

    steps = 7
    t0 = time.perf_counter()
    print(f"[1/{steps}] synthesizing {args.sites} sites × {size.cases} cases of {size.shape}³ into {out / 'data'}")
    site_dirs = write_federation(
        out / "data", n_sites=args.sites, cases_per_site=size.cases, shape=(size.shape,) * 3, seed=args.seed,
        overwrite=True,
    )  # fmt: skip
    sites = [p.name for p in site_dirs]
    splits = load_sites(site_dirs, seed=args.seed)
    bundle = Bundle("train", variant=size.variant)
    lap("synthesize", t0)
    print("  federated statistics of the sites (NVFlare's statistics workflow, simulator, DP) start in the background")
    stats_run = start_statistics(out, sites, out / "data")
    atexit.register(lambda: stats_run.process.poll() is None and stop_process(stats_run.process))  # demo failed

    public: PublicStart | None = None
    t0 = time.perf_counter()
    if args.no_public or size.public_cases < 1:
        print(f"[2/{steps}] no public pretraining (--no-public): every model starts from fresh weights")
    else:
        print(f"[2/{steps}] public pretraining: {size.public_cases} cases of one more synthetic site (public data, "
              f"non-private, no ε), {size.public_epochs} epochs; every model below starts from it")  # fmt: skip
        public = pretrain_public(size, out, n_sites=args.sites, seed=args.seed, bundle=bundle)
    lap("public_pretraining", t0)
    initial = public.checkpoint if public else None

    mode = "POC (nvflare job submit)" if args.poc else "simulator"
    print(f"[3/{steps}] federated training in NVFlare's {mode}: {rounds} rounds, DP-SGD + percentile sharing, "
          f"site policies '{POLICY_SCOPE}'")  # fmt: skip
    t0 = time.perf_counter()
    cfg = job_config(
        size, out / "data", sites, rounds=rounds, seed=args.seed, private=True, poc=args.poc,
        initial_checkpoint=initial,
    )  # fmt: skip
    print(f"  DP-SGD plan: {cfg['privacy']['dp_sgd']} (ε target = 0.9 × the smallest max ε of the site policies)")
    print(f"  each site's local part ({cfg['local']['parameters']}): trained at the site, never sent, fine-tuned "
          f"{cfg['local']['fine_tune_epochs']} epochs without DP on the final DP global model")  # fmt: skip
    (out / "fl").mkdir(exist_ok=True)
    job_dir = run_federated(cfg, out / "fl" / "private", poc=args.poc)
    private_rows = read_rounds(job_dir)
    site_state = site_state_dir(out / "fl" / "private")
    parts = local_parts(site_state, sites)
    missing = sorted(set(sites) - set(parts))
    if missing:
        print(f"  no final local part from {missing}: they serve the DP global model alone")
    lap("federated_private", t0)

    print(f"[4/{steps}] evaluating on every site's held-out cases; baselines at the same budget "
          f"({size.epochs} epochs = {rounds} rounds × {size.local_epochs} local epochs)")  # fmt: skip
    t0 = time.perf_counter()
    experiments: list[Experiment] = []
    if public is not None:
        s, ev = evaluate_checkpoint(public.checkpoint, splits, bundle)
        experiments.append(Experiment(PUBLIC, ev["summary"], s, None, public.checkpoint))
        print(f"  public pretraining only (no site data): mean Dice {ev['summary']['all']['mean']['dice']:.3f}")
    ckpt = best_checkpoint(job_dir)
    scores, fl_eval = evaluate_checkpoint(ckpt, splits, bundle)
    experiments.append(Experiment(PRIVATE, fl_eval["summary"], scores, final_epsilon(private_rows), ckpt))
    s, ev = evaluate_site_models(ckpt, parts, splits, bundle)  # what each site serves: DP global + its local part
    experiments.append(Experiment(PRIVATE_LOCAL, ev["summary"], s, None, ckpt))
    print(f"  {PRIVATE_LOCAL} (each site's own model): mean Dice {ev['summary']['all']['mean']['dice']:.3f}")
    plain_rows: list[dict[str, Any]] = []
    if size.plain_fedavg:
        print("  FedAvg without privacy (same job, no DP-SGD, no filters)")
        plain_cfg = job_config(
            size, out / "data", sites, rounds=rounds, seed=args.seed, private=False, poc=args.poc,
            initial_checkpoint=initial,
        )  # fmt: skip
        plain_dir = run_federated(plain_cfg, out / "fl" / "plain", poc=args.poc)
        plain_rows = read_rounds(plain_dir)
        s, ev = evaluate_checkpoint(best_checkpoint(plain_dir), splits, bundle)
        experiments.append(Experiment("federated", ev["summary"], s, None, best_checkpoint(plain_dir)))
        print(f"  federated (no privacy): mean Dice {ev['summary']['all']['mean']['dice']:.3f}")
    budget = dict(
        max_epochs=size.epochs, time_budget_s=None, val_interval=size.local_epochs, seed=args.seed, with_hd95=True
    )
    central = train_and_evaluate(
        splits, train_sites=sites, name="centralized", bundle=bundle, checkpoint=out / "centralized" / "model.pt",
        network=start_network(bundle, public), **budget,
    )  # fmt: skip
    experiments.append(Experiment("centralized", central.summary, central.scores, None, central.checkpoint))
    for site in sites:
        r = train_and_evaluate(
            splits, train_sites=[site], name=f"single-site {site}", bundle=bundle,
            checkpoint=out / "single" / site / "model.pt", network=start_network(bundle, public), **budget,
        )  # fmt: skip
        experiments.append(Experiment(f"single-site {site}", r.summary, r.scores, None, r.checkpoint))
        print(f"  single-site {site}: mean Dice {r.summary['all']['mean']['dice']:.3f}")
    print(f"  centralized: mean Dice {central.summary['all']['mean']['dice']:.3f}")
    print(f"  federated+privacy: mean Dice {fl_eval['summary']['all']['mean']['dice']:.3f}")
    lap("evaluate_and_baselines", t0)

    print(f"[5/{steps}] installing at each site the DP global model + its local part into the MONAI Label app")
    t0 = time.perf_counter()
    installed_sites: dict[str, dict[str, Any]] = {}
    for site in sites:  # each site's own app folder: out/app/<site>/model.pt (+ local_part.pt beside it)
        site_path = site_model_path(out, site)
        installed_sites[site] = install_into_app(ckpt, site_path, size.variant, local_part=parts.get(site))
        local = (installed_sites[site].get("parts") or {}).get("local") or {}
        what = f"+ local part ({local.get('parameters')})" if local.get("matches_global") else "alone (no local part)"
        print(f"  {site}: DP global model {what} -> {site_path}")
    model_path = site_model_path(out, sites[0])  # the server command below starts the first site's app
    installed = installed_sites[sites[0]]
    studies = out / "studies"
    _copy_studies(splits, studies)
    command = server_command(studies, model_path, size.variant, args.port)
    lap("install", t0)

    t0 = time.perf_counter()
    statistics = stats_run.result()  # finished long ago in a normal run: this wait is the time it added
    if isinstance(statistics, str):
        print(f"  federated statistics not available: {statistics}")
    lap("federated_statistics_wait", t0)

    print(f"[6/{steps}] writing the report")
    t0 = time.perf_counter()
    run = DemoRun(
        out=out, size=size.name, shape=size.shape, cases_per_site=size.cases, variant=size.variant, rounds=rounds,
        local_epochs=size.local_epochs,
        mode=mode, sites=sites, splits=splits, bundle=bundle, experiments=experiments, private_rows=private_rows,
        plain_rows=plain_rows, job_config=cfg, job_dir=job_dir, installed=installed, server_command=command,
        timings=timings, fl_info=fl_eval["info"], public=public, site_state=site_state,
        installed_sites=installed_sites, statistics=statistics,
    )  # fmt: skip
    report = write_report(run)
    lap("report", t0)
    total = time.perf_counter() - start
    (out / "demo_summary.json").write_text(
        json.dumps(
            {
                "report": str(report),
                "installed_model": str(model_path),
                "installed_sites": {s: str(site_model_path(out, s)) for s in sites},
                "local_parts": {s: str(p) for s, p in parts.items()},
                "server_command": command,
                "next_steps": next_steps(command),
                "seconds": round(total, 1),
                "timings": {k: round(v, 1) for k, v in timings.items()},
            },
            indent=2,
        )
    )

    print(f"[7/{steps}] done in {total:.0f} s. Report: {report}\n")
    print("Next steps:")
    for line in next_steps(command):
        print(f"  {line}")
    if not _on_path():
        print(f"  (fetal-fl is not on PATH here: run `source {Path(sys.executable).parent}/activate` first)")
    if args.serve:
        print("\nstarting the server (Ctrl-C stops it) ...")
        with contextlib.suppress(KeyboardInterrupt):
            subprocess.run(this_cli() + command[1:], check=False)
    return 0


def this_cli() -> list[str]:
    """``fetal-fl`` of this very installation, whether or not its environment is activated (``--serve``)."""
    script = Path(sys.executable).with_name("fetal-fl")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fetal_fl.cli"]


def _on_path() -> bool:
    found = shutil.which("fetal-fl")
    return found is not None and Path(found).resolve().parent == Path(sys.executable).resolve().parent


def next_steps(command: list[str]) -> list[str]:
    """What a new user does after the demo: start the server, connect Slicer, look at the model."""
    host = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    model_path = command[command.index("--model-path") + 1]
    conf = command[command.index("--conf") :] if "--conf" in command else []
    return [
        "1. start the MONAI Label server (127.0.0.1 only):",
        "   " + " ".join(command),
        f"2. in 3D Slicer (5.2+), install the {SLICER_MODULE} module (slicer_extension/README.md), enter {host}, "
        "press Connect, then 'Next case' -> segment -> correct in the Segment Editor -> 'Submit'.",
        "3. what the server serves (origin, job id, round; the shared DP part with its ε and this site's local part):",
        "   " + " ".join(["fetal-fl", "app", "model-info", "--model-path", model_path, *conf]),
    ]
