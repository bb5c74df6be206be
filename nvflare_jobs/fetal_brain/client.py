"""NVFlare Client API script: one hospital's side of a federated round.

Each site's cases are split like the centralized and single-site baselines (``fetalseg.baseline.split_site``,
see :mod:`nvflare_jobs.plan`): training, validation and held-out test cases. Every round the site receives the
global model, scores it on its VALIDATION cases (per-tissue Dice; the server selects the best global model on
``val_mean_dice``), trains it for ``local_epochs`` on its training cases with the project's shared training code,
and sends back only the weight DIFFERENCE, with ``NUM_STEPS_CURRENT_ROUND`` for weighting and the validation
metrics. Images never leave the site. For the final cross-site evaluation it scores the model it is sent on its
validation cases (``val_*``: what the server may still use to choose between the final and the best model) and
on its held-out TEST cases (``test_*`` with HD95: the cases every baseline is scored on, never used to choose).

:class:`SiteTrainer` is the plain-PyTorch part (no NVFlare); the benchmark runs it directly to measure what the
same local training costs without federation. DP-SGD, when the job or the site asks for it, wraps the model,
optimizer and loader once per job (``privacy.dpsgd``) so ε composes over all rounds; if DP-SGD is requested and
cannot be set up the site stops with an error instead of training without it.

A site-local part (``local.parameters``) is trained here and never sent; the site saves it after every round
(a restarted client process takes it back) and, when the final evaluation sends the job's FINAL global model,
fine-tunes it on that model without DP (``local.fine_tune_epochs``) and writes the final file recording that model's
hash, which the MONAI Label app checks before it serves the pair.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fetalseg.bundle import Bundle
from fetalseg.data.loaders import Case
from fetalseg.evaluation import evaluate_cases
from fetalseg.labels import foreground_labels
from fetalseg.local_part import (
    GLOBAL_ROUND_KEY,
    GLOBAL_SHA_KEY,
    NEVER_SENT,
    LocalPartError,
    read_local_part,
    save_local_part,
    shared_part_hash,
)
from fetalseg.metrics import nanmean
from fetalseg.site_env import privacy_ledger, site_state
from fetalseg.subspace import parameter_names, trainable_view
from fetalseg.training import build_train_dataset, build_train_loader, train_epoch
from nvflare_jobs.config import (
    CONFIG_FILE_NAME,
    DP_REPORT_KEY,
    ENV_PRIVACY_LEDGER,
    JobConfig,
    load_config,
    resolve_site_data,
)
from nvflare_jobs.fetal_brain.model import PREFIX, FetalBrainNet, to_state_dict
from nvflare_jobs.plan import dp_settings_for, metrics_policy_for, site_split
from nvflare_jobs.resume import (
    check_resumed_accounting,
    keep_sent_update,
    sent_update,
    sent_update_path,
    site_accounting_job_id,
)

log = logging.getLogger("fetal_fl.client")


class DPSGDUnavailableError(RuntimeError):
    """DP-SGD was required for this site but cannot be provided; training must not go ahead without it."""


@dataclass
class RoundStats:
    loss: float
    steps: int
    samples: int
    seconds: float


def metrics_from_scores(scores: Sequence[Any], *, prefix: str = "val") -> dict[str, float]:
    """``{prefix}_mean_dice`` and ``{prefix}_dice_<tissue>`` (and HD95 when scored) averaged over cases."""
    out: dict[str, float] = {f"{prefix}_mean_dice": nanmean(s.mean_dice for s in scores)}
    for tissue in (t.name for t in foreground_labels()):
        out[f"{prefix}_dice_{tissue}"] = nanmean(s.dice.get(tissue, float("nan")) for s in scores)
        if any(s.hd95 for s in scores):
            out[f"{prefix}_hd95_{tissue}"] = nanmean(s.hd95.get(tissue, float("nan")) for s in scores)
    if any(s.hd95 for s in scores):
        out[f"{prefix}_mean_hd95"] = nanmean(v for k, v in out.items() if k.startswith(f"{prefix}_hd95_"))
    out[f"{prefix}_cases"] = float(len(scores))
    return out


class SiteTrainer:
    """Local data, model, optimizer and (optionally) DP-SGD of one site, kept for the whole job."""

    def __init__(
        self,
        config: JobConfig,
        site: str,
        *,
        data_dir: Path | None = None,
        job_id: str = "local",
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.site = site
        self.job_id = job_id
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.data_dir = Path(data_dir) if data_dir is not None else resolve_site_data(config, site)
        split = site_split(config, site, self.data_dir)  # the baselines' split: train / val / test
        self.train_cases, self.val_cases, self.test_cases = split.train, split.val, split.test
        log.info(
            "site %s: %d training, %d validation and %d held-out test cases from %s",
            site,
            len(self.train_cases),
            len(self.val_cases),
            len(self.test_cases),
            self.data_dir,
        )
        dp_settings = dp_settings_for(config, site)  # with the job's plan: the one the site's policy checked
        if dp_settings is not None:  # δ against this site's N before any data is cached or any model is built
            self._check_dp_settings(dp_settings)
        if config.local_fine_tune_epochs and not config.cross_site_eval:
            raise ValueError(
                f"local.fine_tune_epochs={config.local_fine_tune_epochs} fine-tunes the local part on the job's "
                "final global model, which a site receives only in the final evaluation: set cross_site_eval to "
                "true, or local.fine_tune_epochs to 0 (refused before any training)"
            )
        self._last_global: dict[str, torch.Tensor] | None = None  # the global model received last
        self._restored_local: dict[str, torch.Tensor] | None = None  # a restarted client's saved local part
        self._local_finished = False
        torch.manual_seed(config.seed + zlib.crc32(site.encode()) % 10_000)
        self.bundle = Bundle("train", overrides=config.bundle_overrides)
        self.model = FetalBrainNet(config.bundle_overrides, init_seed=None).to(self.device)
        # only training.trained_parameters is trained and sent: a structural group trains the network itself
        # (the rest frozen); lora:<r> trains an adapter module that weight_diff folds back into the bundle keys
        self.view = trainable_view(self.model, config.trained_parameters, seed=config.seed)
        self.trained_keys = list(self.view.names)
        self.optimizer = self.bundle.optimizer(self.view.parameters())
        self.loss_fn = self.bundle.loss()
        dataset = build_train_dataset(self.bundle, self.train_cases)
        self.batch_size = int(config.batch_size or self.bundle.get("batch_size"))
        self.loader = build_train_loader(self.bundle, dataset=dataset, batch_size=self.batch_size)
        self.train_model: torch.nn.Module = self.view.module  # the DP-wrapped module when DP-SGD is on
        self.privacy_engine: Any = None
        self.ledger: Any = None
        self.dataset_id = f"{site}/{self.data_dir.name}"
        if dp_settings is not None and self.view.module is not self.model:
            # DP-SGD wraps self.model; an adapter module would train outside it: refuse rather than leak
            raise DPSGDUnavailableError(
                f"site {site}: DP-SGD with trained_parameters={config.trained_parameters!r} (an adapter) is not "
                "supported yet; use a group spec such as 'norm+bias+head'"
            )
        if dp_settings is not None:
            self._enable_dp_sgd(dp_settings, dataset_size=len(dataset))
        self._restore_local_part()

    # -- DP-SGD -----------------------------------------------------------------------------------------------
    def _check_dp_settings(self, settings: Mapping[str, Any]) -> None:
        """Refuse DP-SGD settings this site cannot honour, before any training: only the site knows its N, and a
        δ ≥ 1/N (N training cases) would allow publishing a whole case."""
        try:
            from privacy.dpsgd import DPSGDConfig
        except ImportError as e:
            raise DPSGDUnavailableError(
                f"site {self.site}: the job requires DP-SGD but privacy.dpsgd cannot be imported ({e}); "
                "refusing to train without it"
            ) from e
        own = self.site in self.config.site_dp_sgd
        where = f"privacy.sites.{self.site}.dp_sgd.delta" if own else "privacy.dp_sgd.delta"
        try:
            DPSGDConfig.from_dict(settings).check_dataset(len(self.train_cases), where=where)
        except ValueError as e:
            raise DPSGDUnavailableError(
                f"site {self.site}: DP-SGD could not be set up, refused before any training: {e}"
            ) from e

    def _enable_dp_sgd(self, settings: Mapping[str, Any], *, dataset_size: int) -> None:
        """Wrap model, optimizer and loader once for the job; check the site's privacy budget before training."""
        try:
            from privacy.dpsgd import DPSGDConfig, SitePrivacyEngine
            from privacy.ledger import SiteLedger
        except ImportError as e:
            raise DPSGDUnavailableError(
                f"site {self.site}: the job requires DP-SGD but privacy.dpsgd cannot be imported ({e}); "
                "refusing to train without it"
            ) from e
        settings = dict(settings)
        state_dir = site_state() or Path.cwd() / "privacy_state"
        state_path = state_dir / f"dpsgd_{self.site}_{self.job_id}.json"
        try:
            dp_config = DPSGDConfig.from_dict(settings)
            # full-batch DP-GD takes every case in every step: a batch size set in the job contradicts it (an error)
            batch_size = self.config.batch_size if dp_config.full_batch else self.batch_size
            self.privacy_engine = SitePrivacyEngine(
                config=dp_config,
                dataset_size=dataset_size,
                batch_size=batch_size,
                state_path=state_path,
            )
            ledger_path = privacy_ledger()
            if ledger_path:
                self.ledger = SiteLedger(ledger_path)
                # check + hold the planned ε atomically: concurrent jobs at this site cannot together overspend
                self.privacy_engine.reserve(self.ledger, dataset_id=self.dataset_id, job_id=self.job_id)
            else:
                log.warning("site %s: no %s set: ε is accounted within this job only", self.site, ENV_PRIVACY_LEDGER)
            wrapped = self.privacy_engine.make_private(
                model=self.model, optimizer=self.optimizer, data_loader=self.loader
            )
            self.loss_fn = self.privacy_engine.wrap_loss(self.loss_fn)
        except Exception as e:
            raise DPSGDUnavailableError(f"site {self.site}: DP-SGD could not be set up: {e}") from e
        self.train_model, self.optimizer, self.loader = wrapped
        log.info("site %s: DP-SGD on %s, state %s", self.site, self.privacy_engine.report(), state_path)

    def record_privacy(self, round_index: int) -> dict[str, Any] | None:
        """The DP-SGD report for this round, written to the site's ledger first (before anything is sent)."""
        if self.privacy_engine is None:
            return None
        if self.ledger is not None:  # one ε for DP-SGD's steps and the metric releases, composed
            from privacy.dpsgd import SCOPE

            self.released.record(
                self.ledger, job_id=self.job_id, dataset_id=self.dataset_id, round=round_index, scope=SCOPE
            )
        return self.released.report()

    def finish(self) -> float:
        """At the job's end (the client loop ended, not a crash): give back the unspent part of the ε reservation.

        What the site spent stays in the ledger; a crashed client never gets here, so its reservation keeps
        counting until the site admin releases it (``fetal-fl privacy ledger release``).
        """
        if self.privacy_engine is None or self.ledger is None:
            return 0.0
        freed = self.privacy_engine.release(self.ledger, dataset_id=self.dataset_id, job_id=self.job_id)
        log.info("site %s: %s", self.site, self.privacy_engine.summary())
        return freed

    # -- one round ----------------------------------------------------------------------------------------------
    def load_global(self, params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Load the global weights into the local model; return a CPU copy to diff against after training.

        The site-local part (``local.parameters``) is taken from the global model only the first time (the job's
        initial model), unless this process restarts a job the site already trained in: then the local part it
        saved is put back. After that the site keeps its own, whatever the server sends for those keys.
        """
        state = {k: v.detach().clone().cpu() for k, v in to_state_dict(params).items()}
        if self._last_global is not None:
            kept = self._local_tensors()
        else:
            kept, self._restored_local = self._restored_local or {}, None
        self.model.load_state_dict(state, strict=True)
        if kept:
            with torch.no_grad():
                params_now = dict(self.model.named_parameters())
                for key, value in kept.items():
                    params_now[key].copy_(value)
        self._last_global = state
        return state

    # -- the site-local part: learned here, never sent ----------------------------------------------------------
    @property
    def local_keys(self) -> list[str]:
        """Model keys (``net.``-prefixed) of ``local.parameters``; never in an update, never overwritten by the
        global model after the first round."""
        keys = getattr(self, "_local_keys", None)
        if keys is None:
            keys = [f"net.{n}" for n in parameter_names(self.model.net, self.config.local_parameters)]
            if self.config.trained_parameters != "all" and set(keys) & set(self.trained_keys):
                # the job config refuses overlapping groups; this catches a group that shares weights with another
                raise ValueError(
                    f"local.parameters={self.config.local_parameters!r} shares weights with "
                    f"training.trained_parameters={self.config.trained_parameters!r}: a local weight is never sent"
                )
            self._local_keys = keys
        return keys

    def _local_tensors(self) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        return {k: params[k].detach().cpu().clone() for k in self.local_keys}

    def _restore_local_part(self) -> None:
        """A restarted client (NVFlare relaunches the site's process mid-job) takes back the local part it saved
        for this job instead of starting it over from the global model. A file for this site and job that does
        not fit (another ``local.parameters``, other keys or shapes) stops the site: continuing would either
        discard the site's work silently or mix two configurations."""
        path = self.local_part_path()
        if not self.local_keys or not path.is_file():
            return
        tensors, info = read_local_part(path)
        want = sorted(k[len(PREFIX) :] for k in self.local_keys)
        problems = []
        if info.get("site") != self.site or str(info.get("job_id")) != str(self.job_id):
            problems.append(f"it is for site {info.get('site')!r}, job {info.get('job_id')!r}")
        if info.get("parameters") != self.config.local_parameters:
            problems.append(
                f"it holds local.parameters={info.get('parameters')!r}, this job {self.config.local_parameters!r}"
            )
        if sorted(tensors) != want:
            problems.append(f"its keys are not this network's {self.config.local_parameters!r} weights")
        params = dict(self.model.net.named_parameters())
        if not problems and any(tuple(v.shape) != tuple(params[k].shape) for k, v in tensors.items()):
            problems.append("its tensors have other shapes than this network's")
        if problems:
            raise LocalPartError(
                f"site {self.site}: the saved local part {path} does not belong to this job's configuration "
                f"({'; '.join(problems)}); move it away to start the local part over, or run the job's own config"
            )
        if info.get("final"):
            # the job's local part is complete; a fine-tuned one (learned without DP) must not shape anything the
            # site still sends (evaluation metrics), so it is not put back into the model
            self._local_finished = True
            if info.get("fine_tune_epochs"):
                log.info("site %s: the job's final local part %s is already written; kept as it is", self.site, path)
                return
        self._restored_local = {f"{PREFIX}{k}": v for k, v in tensors.items()}
        log.info(
            "site %s: restarted: local part of round %s restored from %s (not started over)",
            self.site,
            info.get("round"),
            path,
        )

    def is_final_global(self, meta: Mapping[str, Any] | None) -> bool:
        """True for the job's FINAL global model, as the final evaluation sends it: NVFlare's persisted global
        model carries the round of its last aggregation (``current_round``) in its meta; the best model saved
        during training never has the last round's (it is the model the sites received in some round)."""
        value = (meta or {}).get("current_round")
        return isinstance(value, int) and not isinstance(value, bool) and value == self.config.num_rounds - 1

    def _site_val_dice(self) -> float | None:
        """Mean Dice of the current model on this site's validation cases, for the site's own choice only: it never
        passes the release gate and never leaves the site (None without validation cases)."""
        if not self.val_cases:
            return None
        scores = evaluate_cases(self.model.net, self.val_cases, bundle=self.bundle, device=self.device, with_hd95=False)
        value = nanmean(s.mean_dice for s in scores)
        return float(value) if value == value else None  # NaN: nothing to compare

    def fine_tune_local(self, final_global: Mapping[str, torch.Tensor]) -> RoundStats | None:
        """``local.fine_tune_epochs`` passes over the site's training cases, WITHOUT DP, training only the local part
        on the job's FINAL global model (the one the site will serve it with). The site keeps the epoch (0: the part
        as trained in the rounds) whose pair scores best on its own validation cases, so the part it serves is never
        one its own data says is worse. Only after the job's last update was sent, and the result goes only to the
        local-part file: the model keeps its previous weights, so nothing the site still sends (evaluation metrics)
        depends on a part learned without DP."""
        epochs = self.config.local_fine_tune_epochs
        if not epochs or not self.local_keys:
            return None
        before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        kept = self._local_tensors()
        self.model.load_state_dict(dict(final_global), strict=True)  # the final global model's shared weights ...
        params = dict(self.model.named_parameters())
        flags = {k: p.requires_grad for k, p in params.items()}
        disable = getattr(self.train_model, "disable_hooks", None)  # Opacus' per-sample hooks: not needed here
        if callable(disable):
            disable()
        with torch.no_grad():
            for key, value in kept.items():  # ... with this site's local part
                params[key].copy_(value)
        for key, p in params.items():
            p.requires_grad_(key in kept)
        optimizer = self.bundle.optimizer([params[k] for k in self.local_keys])
        loader = build_train_loader(self.bundle, dataset=self.loader.dataset, batch_size=self.batch_size)
        total = RoundStats(0.0, 0, 0, 0.0)
        best_dice, best_epoch, best = self._site_val_dice(), 0, self._local_tensors()
        first_dice = best_dice
        try:
            for epoch in range(1, epochs + 1):
                stats = train_epoch(
                    self.model,
                    loader,
                    optimizer,
                    self.bundle.loss(),
                    device=self.device,
                    max_steps=self.config.max_steps_per_epoch,
                )
                total.loss += stats.loss * stats.steps
                total.steps += stats.steps
                total.samples += stats.samples
                total.seconds += stats.seconds
                dice = self._site_val_dice()
                better = dice is not None and (best_dice is None or dice > best_dice)
                if better or not self.val_cases:  # without validation cases: the last epoch
                    best_dice, best_epoch, best = dice, epoch, self._local_tensors()
        finally:
            for key, p in params.items():
                p.requires_grad_(flags[key])
            self._fine_tuned_local = best
            self._fine_tune_selection = {
                "by": "mean Dice on this site's validation cases (never sent)",
                "val_cases": len(self.val_cases),
                "epoch_selected": best_epoch,
                "val_dice_before": first_dice,
                "val_dice_selected": best_dice,
            }
            self.model.load_state_dict(before, strict=True)
        total.loss = total.loss / max(total.steps, 1)
        self._fine_tuned = total
        return total

    def finish_local(self, round_index: int, final_global: Mapping[str, torch.Tensor] | None = None) -> Path | None:
        """The job's final local-part file, once its last update has been sent.

        With ``final_global`` (the job's final global model, received in the final evaluation): the non-DP
        fine-tune on it, and the file records that model's hash. Without one (a job with no final evaluation):
        the part as trained in the rounds, recorded for the global model after ``num_rounds`` aggregations of
        this job. Does nothing the second time."""
        if self._local_finished or not self.local_keys:
            return None
        self._local_finished = True
        if final_global is not None and self.fine_tune_local(final_global) is not None:
            log.info("site %s: local part fine-tuned without DP on the final global model (never sent)", self.site)
        return self.save_local_part(round_index, final=True, final_global=final_global)

    @property
    def local_finished(self) -> bool:
        """The job's final local-part file is written (here, or before this process restarted)."""
        return self._local_finished

    def local_part_path(self) -> Path:
        """``<FETAL_FL_SITE_STATE>/local_<site>_<job>.pt`` (the folder the DP engine keeps its state in)."""
        state_dir = site_state() or Path.cwd() / "privacy_state"
        return state_dir / f"local_{self.site}_{self.job_id}.pt"

    def save_local_part(
        self, round_index: int, *, final: bool = False, final_global: Mapping[str, torch.Tensor] | None = None
    ) -> Path | None:
        """Write the local part (ONLY its tensors, bundle key names) and its provenance; None without one.

        Provenance: the job, the round, and the global model the part is to be served with: the one after
        ``global_round`` aggregations (the job's final one for the final file), with the hash of its shared weights
        when the site received it (``final_global``), which the app checks before serving the pair."""
        if not self.local_keys:
            return None
        fine_tuned = getattr(self, "_fine_tuned_local", None) if final else None
        tensors = {k[len(PREFIX) :]: v for k, v in (fine_tuned or self._local_tensors()).items()}
        report = self.privacy_engine.report() if self.privacy_engine is not None else None
        shared_privacy = (
            {
                "epsilon": report.get("epsilon"),
                "delta": report.get("delta"),
                "accountant": report.get("accountant"),
                "privacy_unit": "one patient",
                "mechanism": "DP-SGD",
            }
            if report is not None
            else None
        )
        return save_local_part(
            tensors,
            self.local_part_path(),
            parameters=self.config.local_parameters,
            origin="site-local",
            site=self.site,
            job_id=self.job_id,
            round=int(round_index),
            final=bool(final),
            **{
                GLOBAL_ROUND_KEY: self.config.num_rounds if final else int(round_index) + 1,
                GLOBAL_SHA_KEY: (
                    shared_part_hash(final_global, self.local_keys, prefix=PREFIX) if final_global is not None else None
                ),
            },
            fine_tuned_on="the job's final global model" if fine_tuned is not None else None,
            fine_tune_selection=getattr(self, "_fine_tune_selection", None) if fine_tuned is not None else None,
            training_cases=len(self.train_cases),
            fine_tune_epochs=self.config.local_fine_tune_epochs if fine_tuned is not None else 0,
            learned="on this site's own cases, without DP (" + NEVER_SENT + ")",
            shared_privacy=shared_privacy,
        )

    @property
    def released(self) -> Any:
        """The one gate every metrics dict passes before it leaves the site (``privacy.released_metrics``): as is
        without DP; with DP-SGD only data-independent values and noised, accounted Dice (or nothing)."""
        gate = getattr(self, "_released", None)
        if gate is None:
            from privacy.released_metrics import MetricsPolicy, SiteMetricsRelease, planned_releases

            engine = self.privacy_engine
            gate = SiteMetricsRelease(
                engine=engine,
                policy=MetricsPolicy.from_dict(metrics_policy_for(self.config)),
                delta=engine.config.delta if engine is not None else None,
                accountant=engine.config.accountant if engine is not None else "rdp",
                max_releases=planned_releases(
                    num_rounds=self.config.num_rounds, cross_site_eval=self.config.cross_site_eval
                ),
                # beside the DP-SGD state: a restarted site keeps counting the releases it already made
                state_path=None
                if getattr(engine, "state_path", None) is None
                else Path(engine.state_path).with_name(f"metrics_{self.site}_{self.job_id}.json"),
            )
            if self.ledger is not None:  # widen the reservation to DP-SGD + metric releases before any release
                gate.reserve(self.ledger, dataset_id=self.dataset_id, job_id=self.job_id)
            self._released = gate
        return gate

    def validate(
        self, cases: Sequence[Case] | None = None, *, with_hd95: bool = False, prefix: str = "val"
    ) -> dict[str, float]:
        """Metrics of the current model on ``cases`` (default: the validation cases) as they may leave the site
        (through :attr:`released`); ``{}`` when there are none."""
        cases = self.val_cases if cases is None else cases
        if not cases:
            return {}
        with_hd95 = with_hd95 and not self.released.dp  # HD95 is unbounded: never released by a DP site
        scores = evaluate_cases(self.model.net, cases, bundle=self.bundle, device=self.device, with_hd95=with_hd95)
        return self.released.release(metrics_from_scores(scores, prefix=prefix), scores={prefix: scores})

    def evaluate(self) -> dict[str, float]:
        """Cross-site evaluation: ``val_*`` on the validation cases, ``test_*`` (with HD95 without DP) on the
        held-out test cases, which are never used to choose a model."""
        return {**self.validate(), **self.validate(self.test_cases, with_hd95=True, prefix="test")}

    def train_round(self, *, fedprox_mu: float | None = None) -> RoundStats:
        """``local_epochs`` passes over the site's data (FedProx adds its proximal term when ``fedprox_mu``)."""
        loss_fn = self.loss_fn
        if fedprox_mu:
            from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

            anchor = copy.deepcopy(self.model).eval()
            for p in anchor.parameters():
                p.requires_grad_(False)
            prox = PTFedProxLoss(mu=fedprox_mu)
            base = self.loss_fn

            def loss_fn(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
                return base(outputs, labels) + prox(self.model, anchor)

        total = RoundStats(0.0, 0, 0, 0.0)
        for _ in range(self.config.local_epochs):
            stats = train_epoch(
                self.train_model,
                self.loader,
                self.optimizer,
                loss_fn,
                device=self.device,
                max_steps=self.config.max_steps_per_epoch,
            )
            total.loss += stats.loss * stats.steps
            total.steps += stats.steps
            total.samples += stats.samples
            total.seconds += stats.seconds
        total.loss = total.loss / max(total.steps, 1)
        return total

    def weight_diff(self, global_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Local minus global weights of the TRAINED keys only (what leaves the site), on the unwrapped network.

        An adapter (lora) is first folded into the network's weights and reset to zero; untrained keys are not
        sent (NVFlare's FedAvg adds a DIFF key by key, so the server keeps them as they are).
        """
        self.view.merge_back()
        local = self.model.state_dict()
        keys = global_state if self.config.trained_parameters == "all" else self.trained_keys
        never_sent = set(self.local_keys)  # the site-local part (local.parameters) stays here
        return {k: (local[k].detach().cpu() - global_state[k]) for k in keys if k not in never_sent}


def _config_path(name: str) -> Path:
    """The job config shipped in the job's custom/ folder, next to the launched script (cwd is the app folder)."""
    script_dir = Path(sys.argv[0]).resolve().parent
    for candidate in (Path(name), script_dir / name, Path("custom") / name, Path(__file__).resolve().parent / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"job config {name!r} not found in {Path.cwd()} or next to {script_dir}")


def main(argv: Sequence[str] | None = None) -> None:
    import nvflare.client as flare
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.utils.fedprox_utils import get_fedprox_mu
    from nvflare.client.tracking import SummaryWriter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=CONFIG_FILE_NAME, help="job config file (shipped in the job folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(_config_path(args.config))
    if config.torch_threads:
        torch.set_num_threads(config.torch_threads)

    flare.init()
    site = flare.get_site_name()
    # a continuation of a job a server restart abandoned trains and charges its ledger under that first job's id
    job_id = site_accounting_job_id(flare.get_job_id())
    trainer = SiteTrainer(config, site, job_id=job_id)
    if trainer.ledger is not None and trainer.privacy_engine is not None:
        check_resumed_accounting(
            trainer.ledger, dataset_id=trainer.dataset_id, job_id=job_id, steps=trainer.privacy_engine.steps
        )
    writer = SummaryWriter()
    state_path = getattr(trainer.privacy_engine, "state_path", None)
    kept_path = sent_update_path(state_path, site, job_id)  # DP sites only: retraining a lost round would cost ε

    last_round = -1
    while flare.is_running():
        input_model = flare.receive()
        if input_model is None:
            break
        rnd = int(input_model.current_round or 0)
        global_state = trainer.load_global(input_model.params)
        if flare.is_submit_model():  # not used by this job's workflows; answer with the global model untouched
            flare.send(flare.FLModel(params=global_state, params_type=flare.ParamsType.FULL))
            continue
        if flare.is_evaluate():  # cross-site evaluation of a server model on this site's val and test cases
            metrics = trainer.released.release(trainer.evaluate())
            trainer.record_privacy(rnd)  # with DP: the evaluation's releases are in the ledger before they leave
            log.info("site %s: evaluation %s", site, metrics)
            if trainer.is_final_global(input_model.meta):
                # the job's final global model: fine-tune the local part on it before answering (the server waits
                # for the answer; after it the job may end and this process be stopped)
                trainer.finish_local(last_round if last_round >= 0 else config.num_rounds - 1, global_state)
            flare.send(flare.FLModel(metrics=metrics))
            continue

        kept = sent_update(kept_path, round=rnd, global_params=global_state)
        if kept is not None:  # a continuation asks again for the round whose update a server restart lost
            log.info("site %s round %d: re-sending the update sent before the server restart (no new DP steps)",
                     site, rnd)  # fmt: skip
            flare.send(flare.FLModel(params_type=flare.ParamsType.DIFF, **kept))
            last_round = rnd
            continue
        metrics = trainer.validate()  # the received global model on validation cases: drives model selection
        mu = get_fedprox_mu(input_model) if config.algorithm == "fedprox" else None
        stats = trainer.train_round(fedprox_mu=mu)
        diff = trainer.weight_diff(global_state)
        metrics.update(train_loss=stats.loss, train_steps=float(stats.steps))
        meta: dict[str, Any] = {FLMetaKey.NUM_STEPS_CURRENT_ROUND: stats.steps}
        report = trainer.record_privacy(rnd)
        if report is not None:
            meta[DP_REPORT_KEY] = report  # what a site's RequireDPSGD policy filter checks
            for key in ("epsilon", "delta"):
                if isinstance(report.get(key), (int, float)):
                    metrics[f"dp_{key}"] = float(report[key])
            metrics["dp_metrics_epsilon"] = float(report["metrics"]["epsilon_share"])
        metrics = trainer.released.release(metrics)  # everything sent and streamed below passes the one gate
        for key, value in metrics.items():
            writer.add_scalar(key, value, global_step=rnd)
        # NVFlare may stream a site's log to the server (provisioned kits: allow_log_streaming): under DP the log
        # says only what is sent
        loss = "" if trainer.released.dp else f", loss {stats.loss:.4f}"
        log.info("site %s round %d: %d steps%s, %s", site, rnd, stats.steps, loss, metrics)
        keep_sent_update(kept_path, round=rnd, global_params=global_state,
                         update={"params": diff, "metrics": metrics, "meta": meta})  # fmt: skip
        flare.send(flare.FLModel(params=diff, params_type=flare.ParamsType.DIFF, metrics=metrics, meta=meta))
        trainer.save_local_part(rnd)  # after the send: the local part stays at the site
        last_round = rnd
        if rnd + 1 >= config.num_rounds and not config.cross_site_eval:
            # the job's last update has been sent and no final evaluation will bring the final global model
            trainer.finish_local(rnd)
    if not config.cross_site_eval:
        trainer.finish_local(last_round)
    elif trainer.local_keys and not trainer.local_finished:
        log.warning(
            "site %s: the job's final global model never reached this site (no final evaluation of it): the local "
            "part stays as trained in the rounds, not fine-tuned, and records no final global model",
            site,
        )
    trainer.finish()


if __name__ == "__main__":
    sys.exit(main())
