"""NVFlare job (recipe) for federated fetal brain segmentation, built from one job config file.

Run it in the simulator, or export a job folder that ``nvflare job submit -j`` takes as it is::

    python -m nvflare_jobs.fetal_brain.job --config nvflare_jobs/fetal_brain/config.json --workspace /tmp/fl
    python -m nvflare_jobs.fetal_brain.job --config my_job.json --export --export-dir jobs/   # -> jobs/<name>/

What the recipe wires (all from the config; see ``docs/site_admin.md`` for the knobs):

* NVFlare's PyTorch ``FedAvgRecipe``: FedAvg, FedProx (``fedprox_mu`` sent to clients) or FedOpt
  (server-side optimiser), with :mod:`nvflare_jobs.controllers` rounds (all sites train, ``min_clients`` valid
  updates suffice) and weight DIFFs (``TransferType.DIFF``) so privacy filters see what they expect;
* model selection on ``val_mean_dice`` and :class:`~nvflare_jobs.checkpoint.BundleCheckpointWriter` writing the
  best global model in the bundle's format; cross-site evaluation of the final and best global models on every
  site's validation and held-out test cases; TensorBoard streaming of the clients' metrics to the server;
* client privacy filters (per site, per task; a site policy's ``RequireDPSGD`` also on incoming tasks, so a job
  planning more ε than the site allows is refused before it trains), the server's
  :class:`~nvflare_jobs.guard.UpdateGuard`, and the job's privacy ``scope`` in its meta for the sites'
  ``privacy.json`` policies;
* ``server.aggregation``: NVFlare's own FedAvg mean by default (no aggregator component: unchanged numbers), else
  :class:`~nvflare_jobs.robust_aggregation.RobustAggregator` (norm bounding, coordinate-wise trimmed mean or
  median) as the workflow's aggregator.

The client side (:mod:`nvflare_jobs.fetal_brain.client`) and this config file are the only things copied into the
job folder; ``fetalseg``, ``privacy`` and ``nvflare_jobs`` are installed at every site (the ``fetal-fl`` package).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind
from nvflare.apis.job_def import JobMetaKey
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.client.config import TransferType
from nvflare.recipe.utils import (
    add_experiment_tracking,
    add_final_global_evaluation,
    ensure_config_type_dict,
    set_recipe_meta,
)

from nvflare_jobs.audit import ServerAuditFilter, SiteAuditFilter
from nvflare_jobs.checkpoint import BundleCheckpointWriter
from nvflare_jobs.config import CONFIG_FILE_NAME, PROJECT_FILTERS, SPARSE_DECODER, JobConfig, load_config
from nvflare_jobs.controllers import FetalFedAvg, FetalFedOpt
from nvflare_jobs.fetal_brain.model import FetalBrainNet, write_initial_model
from nvflare_jobs.filters import build_class_filter, build_filter, client_dp_norm_bound
from nvflare_jobs.guard import UpdateGuard
from nvflare_jobs.robust_aggregation import RobustAggregator
from nvflare_jobs.site_policy import RequireDPSGD, RequireSecureAggregation

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
CLIENT_SCRIPT = HERE / "client.py"
DEFAULT_CONFIG = HERE / "config.json"
MODEL_CLASS = "nvflare_jobs.fetal_brain.model.FetalBrainNet"
KEY_METRIC = "val_mean_dice"
TRAIN_TASK = "train"
INITIAL_MODEL_NAME = "initial_global_model.pt"  # in the server app's custom/ folder of an exported job
# Installed at every site; never copied into a job's custom/ folder (a partial copy would shadow the package).
APP_PACKAGES = ["fetalseg", "privacy", "nvflare_jobs"]


class FetalBrainRecipe(FedAvgRecipe):
    """NVFlare's PyTorch FedAvg recipe configured from a :class:`~nvflare_jobs.config.JobConfig`.

    Args:
        config: the validated job config.
        per_site_config: NVFlare per-site overrides (e.g. ``{"site-3": {"train_script": ...}}``); every configured
            site gets a client app either way.
        command: interpreter command for the client script when it runs as its own process (the default,
            ``python3 -u``, is what an exported job should carry; simulations pass ``sys.executable``).
    """

    def __init__(
        self,
        config: JobConfig,
        *,
        per_site_config: Mapping[str, Mapping[str, Any]] | None = None,
        command: str = "python3 -u",
    ) -> None:
        self.config = config
        unknown = sorted(set(per_site_config or {}) - set(config.sites))
        if unknown:
            raise ValueError(f"per_site_config names sites {unknown} that are not in the config's sites {config.sites}")
        # The client script and the job config travel together in custom/: both are staged in a private folder
        # (see _scripts_resolve_flat for why the script cannot be taken from the package folder directly).
        self._staging = tempfile.TemporaryDirectory(prefix="fetal_fl_job_")
        staging = Path(self._staging.name)
        script = staging / CLIENT_SCRIPT.name
        shutil.copyfile(CLIENT_SCRIPT, script)
        self.config_file = staging / CONFIG_FILE_NAME
        self.config_file.write_text(config.to_json())
        model = {
            "class_path": MODEL_CLASS,
            "args": {"bundle_overrides": config.bundle_overrides, "init_seed": config.init_seed},
        }
        # A pretrained start: checked against the network and converted here, then NVFlare's own initial_ckpt.
        # A relative path makes NVFlare bundle the file into the server app (the job folder stays self-contained).
        self.initial_model: dict[str, Any] | None = None
        initial_ckpt = None
        if config.initial_checkpoint:
            staged_model = staging / INITIAL_MODEL_NAME
            self.initial_model = write_initial_model(
                config.initial_checkpoint, staged_model, bundle_overrides=config.bundle_overrides
            )
            initial_ckpt = os.path.relpath(staged_model)
        super().__init__(
            name=config.name,
            model=model,
            initial_ckpt=initial_ckpt,
            min_clients=config.min_clients,
            num_rounds=config.num_rounds,
            train_script=str(script),
            train_args=f"--config {CONFIG_FILE_NAME}",
            launch_external_process=config.external_process,
            command=command,
            params_transfer_type=TransferType.DIFF,
            aggregator=self._aggregator(),
            aggregator_data_kind=DataKind.WEIGHT_DIFF,
            key_metric=KEY_METRIC,
            key_metric_mode="max",
        )
        sites = {site: dict((per_site_config or {}).get(site, {})) for site in config.sites}
        self._script_dirs = [str(staging)] + [
            str(Path(s["train_script"]).resolve().parent) for s in sites.values() if s.get("train_script")
        ]
        self.set_per_site_config(sites)
        self._job.set_app_packages(list(APP_PACKAGES))
        self.add_client_file(str(self.config_file))
        self._add_privacy()
        if config.secure_aggregation:  # masks last (after every privacy filter); the NaN/norm guard moves to the site
            from nvflare_jobs.secure_aggregation.wiring import add_site_side

            add_site_side(self, config, train_task=TRAIN_TASK, max_update_norm=self._guard_max_norm())
        # audit: the site records what leaves (after every privacy filter), the server what arrives (before any)
        self.add_client_output_filter(SiteAuditFilter(chain=self._chain()), tasks=[TRAIN_TASK])
        self.add_server_input_filter(ServerAuditFilter(), tasks=[TRAIN_TASK])
        if any(spec.needs_sparse_decoder for spec in config.filters):  # sparse updates become dense first...
            self.add_server_input_filter(build_class_filter(SPARSE_DECODER, {}), tasks=[TRAIN_TASK])
        # ...then every update is checked before it can reach the aggregator
        # (only weight DIFFs: a full-weights "update" would escape the norm limit and be added as a DIFF)
        if not config.secure_aggregation:  # a masked update has no norm to check: the sites check before masking
            guard = UpdateGuard(max_norm=self._guard_max_norm(), data_kind=DataKind.WEIGHT_DIFF.value)
            self.add_server_input_filter(guard, tasks=[TRAIN_TASK])
        self._job.to_server(
            BundleCheckpointWriter(bundle_overrides=config.bundle_overrides, initialized_from=self.initial_model),
            id="bundle_checkpoint",
        )
        # NVFlare's server.task_request_interval: how long a site waits after a task before asking for the next
        self._job.to_server({"server": {"task_request_interval": config.task_request_interval_s}})
        if config.tracking:
            add_experiment_tracking(self, config.tracking)
        if config.cross_site_eval:
            add_final_global_evaluation(self)
        if config.scope:
            set_recipe_meta(self, JobMetaKey.SCOPE, config.scope)

    @contextlib.contextmanager
    def _scripts_resolve_flat(self) -> Iterator[None]:
        """NVFlare copies a client script to ``custom/<path relative to the longest sys.path entry>`` but launches
        ``custom/<file name>``; with the script's own folder first on sys.path the two agree."""
        saved = list(sys.path)
        sys.path[:0] = self._script_dirs
        try:
            yield
        finally:
            sys.path[:] = saved

    def export(self, job_dir: str, *args: Any, **kwargs: Any) -> None:
        with self._scripts_resolve_flat():
            super().export(job_dir, *args, **kwargs)

    def run(self, env: Any, *args: Any, **kwargs: Any) -> Any:
        with self._scripts_resolve_flat():
            return super().run(env, *args, **kwargs)

    def _chain(self) -> list[dict[str, Any]]:
        """The configured client filter chain with parameters, as the audit trail records it."""
        return [
            {
                "type": spec.type,
                "path": spec.path,
                "args": dict(spec.args),
                "sites": list(spec.sites) if spec.sites else None,
                "tasks": list(spec.tasks),
            }
            for spec in self.config.filters
        ]

    def _aggregator(self) -> RobustAggregator | None:
        """``server.aggregation``: None (NVFlare's built-in FedAvg mean, as before) unless a robust method or a clip
        norm is configured."""
        cfg = self.config
        if cfg.secure_aggregation:
            from nvflare_jobs.secure_aggregation.server import SecureAggregator

            return SecureAggregator()
        if not cfg.robust_aggregation:
            return None
        return RobustAggregator(
            method=cfg.aggregation_method, trim_fraction=cfg.trim_fraction, clip_update_norm=cfg.clip_update_norm
        )

    def _guard_max_norm(self) -> float:
        """``server.max_update_norm``, raised to what client-DP noise adds (else every noised update is rejected)."""
        cfg = self.config
        if not any(spec.path == PROJECT_FILTERS["client_dp"] for spec in cfg.filters):
            return cfg.max_update_norm
        weights = sum(v.numel() for v in FetalBrainNet(cfg.bundle_overrides, init_seed=0).state_dict().values())
        bound = client_dp_norm_bound(cfg.filters, weights)
        if bound is None or bound <= cfg.max_update_norm:
            return cfg.max_update_norm
        log.info(
            "update guard: max_update_norm %.4g raised to %.4g, the norm of a client-DP update of %d weights",
            cfg.max_update_norm,
            bound,
            weights,
        )
        return bound

    def _add_privacy(self) -> None:
        for spec in self.config.filters:
            clients = list(spec.sites) if spec.sites else None
            if spec.path == PROJECT_FILTERS["client_dp"]:  # the job's data.root: where a site's ledger dataset is
                spec = dataclasses.replace(spec, args={"data_root": self.config.data_root, **spec.args})
            flt = build_filter(spec)
            self.add_client_output_filter(flt, tasks=list(spec.tasks), clients=clients)
            if isinstance(flt, (RequireDPSGD, RequireSecureAggregation)):  # also on the incoming task: refuse first
                self.add_client_input_filter(flt, tasks=list(spec.tasks), clients=clients)

    def _create_controller(self, persistor_id: str, model_params: Any, model_aggregator: Any):
        cfg = self.config
        common = dict(
            num_clients=cfg.min_clients,
            num_rounds=cfg.num_rounds,
            persistor_id=persistor_id,
            model=model_params,
            save_filename=self.save_filename,
            aggregator=model_aggregator,
            task_name=TRAIN_TASK,
            min_clients=cfg.min_clients,
            straggler_wait_s=cfg.straggler_wait_s,
            task_timeout_s=cfg.task_timeout_s,
        )
        fedavg, fedopt = FetalFedAvg, FetalFedOpt
        if cfg.secure_aggregation:
            from nvflare_jobs.secure_aggregation.server import SecureFetalFedAvg, SecureFetalFedOpt
            from nvflare_jobs.secure_aggregation.wiring import controller_kwargs

            common.update(controller_kwargs(cfg))
            fedavg, fedopt = SecureFetalFedAvg, SecureFetalFedOpt
        if cfg.algorithm == "fedopt":
            if cfg.init_seed is None:
                raise ValueError(
                    "fedopt needs runtime.init_seed: the server optimiser's model must equal the initial one"
                )
            return fedopt(
                **common,
                source_model=FetalBrainNet(cfg.bundle_overrides, init_seed=cfg.init_seed),
                optimizer_args=ensure_config_type_dict(cfg.fedopt_optimizer),
                lr_scheduler_args=ensure_config_type_dict(cfg.fedopt_lr_scheduler),
                device="cpu",
            )
        return fedavg(**common, fedprox_mu=cfg.fedprox_mu if cfg.algorithm == "fedprox" else None)


def build_recipe(
    config: JobConfig | Mapping[str, Any] | str | Path,
    *,
    per_site_config: Mapping[str, Mapping[str, Any]] | None = None,
    command: str = "python3 -u",
) -> Any:
    """The recipe for ``config`` (a :class:`JobConfig`, a dict, or a JSON/YAML file)."""
    cfg = config if isinstance(config, JobConfig) else load_config(config)
    if cfg.secure_aggregation and cfg.secagg_method == "he":  # NVFlare's HE workflow (its own server side)
        from nvflare_jobs.secure_aggregation.he import FetalBrainHERecipe

        return FetalBrainHERecipe(cfg, per_site_config=per_site_config, command=command)
    return FetalBrainRecipe(cfg, per_site_config=per_site_config, command=command)


def export_job(config: JobConfig | Mapping[str, Any] | str | Path, export_dir: str | Path) -> Path:
    """Write the job folder ``<export_dir>/<name>`` for ``nvflare job submit -j``; return its path."""
    recipe = build_recipe(config)
    export_dir = Path(export_dir)
    recipe.export(job_dir=str(export_dir))
    return export_dir / recipe.config.name


def run_simulation(
    config: JobConfig | Mapping[str, Any] | str | Path,
    workspace: str | Path,
    *,
    per_site_config: Mapping[str, Mapping[str, Any]] | None = None,
    num_threads: int | None = None,
) -> Path:
    """Run the job in NVFlare's simulator (one client per configured site); return the job's workspace.

    ``num_threads``: simulator threads (default: one per site, all sites run at once); fewer make the sites take
    turns, each turn in a fresh simulator worker process (how many sites one machine can simulate).
    """
    from nvflare.recipe import SimEnv

    recipe = build_recipe(config, per_site_config=per_site_config, command=f"{sys.executable} -u")
    sites = list(recipe.config.sites)
    threads = len(sites) if num_threads is None else num_threads
    if not 1 <= threads <= len(sites):
        raise ValueError(f"num_threads must be between 1 and the {len(sites)} sites, got {num_threads}")
    env = SimEnv(clients=sites, num_threads=threads, workspace_root=str(workspace))
    recipe.run(env)
    return Path(workspace) / recipe.config.name


def main(argv: list[str] | None = None) -> None:
    # NVFlare's recipe module strips --export/--export-dir from sys.argv when imported; recipe.execute() uses them.
    from nvflare.recipe import SimEnv

    parser = argparse.ArgumentParser(description="Build and run (simulator) or export the fetal brain NVFlare job.")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="job config (JSON or YAML)")
    parser.add_argument("--workspace", default="/tmp/nvflare/fetal_fl", help="simulator workspace root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    # An exported job must say "python3" (each site's own interpreter); for a simulation here, make "python3" this
    # interpreter by putting its folder first on PATH (children inherit it).
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    recipe = build_recipe(args.config)
    env = SimEnv(clients=list(recipe.config.sites), num_threads=len(recipe.config.sites), workspace_root=args.workspace)
    run = recipe.execute(env)  # exports instead (and exits) when --export [--export-dir DIR] was given
    print(json.dumps({"job": recipe.config.name, "result": str(run.get_result()) if run else None}))


if __name__ == "__main__":
    main()
