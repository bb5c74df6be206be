"""The second secure-aggregation option: NVFlare's homomorphic encryption (TenSEAL CKKS), ``"method": "he"``.

Each site encrypts its weighted update with the CKKS context provisioned by NVFlare's ``HEBuilder`` (``nvflare poc
prepare -he``, or ``HEBuilder`` in ``project.yml`` before ``SignatureBuilder``); the server adds ciphertexts and
divides by the total step count (``HEInTimeAccumulateWeightedAggregator``, the sites multiply by their own step
count before encrypting), adds the encrypted mean DIFF to the encrypted global model
(``HEModelShareableGenerator``) and sends it back; each site decrypts it before training. **Every site holds the
same secret key** (one context for the whole project): the server never sees a plaintext weight, but any one site
that colludes with the server can decrypt every other site's update.

Why the job is built here and not by the project's recipe: NVFlare's ``FedAvgRecipeWithHE`` adds its encryptor
first (a privacy filter after it crashes on ``CKKSVector / int``) and refuses SimEnv; the project's FedAvg controller
re-weights ciphertexts and fails ("scale out of bounds"). So this recipe places the encryptor after every other
task-result filter (the site's ``privacy.json`` scope filters run before the job's anyway), checks that order when
the job is built (:func:`check_encryptor_last`), and runs NVFlare's ``ScatterAndGather`` with the HE aggregator.

What needs plaintext at the server is refused by :func:`check_he_config` (FedOpt, FedProx's ``mu`` from the
controller, robust aggregation, sparse updates, cross-site evaluation of the global model, a site-local fine-tune
after the job) or is not wired (model selection on the global model, the bundle checkpoint, the server's update
guard: the sites' own NaN/norm check still runs before encryption only through their DP/percentile filters). The
server saves the final global model encrypted (``FL_global_model.pt``); a site decrypts it with
:func:`decrypt_global_model`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.recipe.spec import Recipe

SERVER_CONTEXT = "server_context.tenseal"  # public keys only (NVFlare's HEBuilder): the server cannot decrypt
CLIENT_CONTEXT = "client_context.tenseal"  # with the secret key, the same file at every site
ENCRYPTOR = "nvflare.app_opt.he.model_encryptor.HEModelEncryptor"
HE_REFUSED = "server.secure_aggregation.method 'he' cannot be combined with"


def check_he_config(
    sa: Mapping[str, Any] | None, *, algorithm: str, cross_site_eval: bool, local_fine_tune_epochs: int
) -> tuple[str, int]:
    """``(method, threshold)`` of an enabled ``server.secure_aggregation`` (``("masking", 0)`` when off or masking).

    Under HE the threshold is 1: one site colluding with the server decrypts everything (every site has the key),
    so a site policy asking for a higher threshold refuses an HE job. Masking is checked by the config module.
    """
    from nvflare_jobs.config import ConfigError

    if sa is None:
        return "masking", 0
    method = sa.get("method", "masking")
    if method not in ("masking", "he"):
        raise ConfigError(f"server.secure_aggregation.method must be 'masking' or 'he', got {method!r}")
    if method == "masking":
        return method, 0
    extra = sorted(set(sa) - {"enabled", "method"})
    if extra:
        raise ConfigError(f"{HE_REFUSED} {extra}: those are pairwise-masking settings")
    if algorithm in ("fedopt", "fedprox"):
        raise ConfigError(
            f"{HE_REFUSED} algorithm {algorithm!r}: "
            + (
                "the server optimiser needs the plaintext mean update"
                if algorithm == "fedopt"
                else "NVFlare's HE workflow (ScatterAndGather) does not send the proximal term's mu"
            )
        )
    if cross_site_eval:
        raise ConfigError(
            f"{HE_REFUSED} cross_site_eval: the server holds the global model only encrypted; set "
            "cross_site_eval to false and evaluate the decrypted model at a site"
        )
    if local_fine_tune_epochs:
        raise ConfigError(
            f"{HE_REFUSED} local.fine_tune_epochs: the sites never receive the last round's aggregate in the job "
            "(it stays encrypted at the server)"
        )
    return method, 1


def check_encryptor_last(client_config: Mapping[str, Any], task: str) -> None:
    """Refuse a client app config in which a task-result filter for ``task`` comes after the HE encryptor.

    NVFlare runs a site's task-result filters in list order; a filter after the encryptor gets ``CKKSVector``
    values and fails (``unsupported operand type(s) for /: 'CKKSVector' and 'int'``) or, worse, passes ciphertext
    through unchecked. Raises :class:`~nvflare_jobs.config.ConfigError` naming the offending filters.
    """
    from nvflare_jobs.config import ConfigError

    chain = [
        f.get("path", "?")
        for group in client_config.get("task_result_filters", [])
        if not group.get("tasks") or task in group["tasks"] or "*" in group["tasks"]
        for f in group.get("filters", [])
    ]
    if ENCRYPTOR not in chain:
        raise ConfigError(f"HE job: no {ENCRYPTOR} on the {task!r} results: the update would leave in the clear")
    after = chain[chain.index(ENCRYPTOR) + 1 :]
    if after:
        raise ConfigError(
            f"HE job: task-result filters {after} come after the encryptor on {task!r} results; every filter must run "
            "before encryption (a filter after it gets ciphertext: 'CKKSVector / int'). Refused."
        )


def make_contexts(poly_modulus_degree: int = 8192, coeff_mod_bit_sizes: Sequence[int] = (60, 40, 40)) -> tuple:
    """``(server_bytes, client_bytes)``: the TenSEAL CKKS contexts NVFlare's ``HEBuilder`` provisions (same
    parameters: symmetric encryption, relinearisation keys, scale 2^40); only the client one holds the secret key."""
    import tenseal as ts

    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=poly_modulus_degree,
        coeff_mod_bit_sizes=list(coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.generate_relin_keys()
    ctx.global_scale = 2**40

    def ser(client: bool) -> bytes:
        return ctx.serialize(
            save_public_key=client, save_secret_key=client, save_galois_keys=False, save_relin_keys=True
        )

    return ser(False), ser(True)


HE_BUILDER = "nvflare.lighter.impl.he.HEBuilder"


def add_he_builder(project_file: str | Path) -> Path:
    """Insert NVFlare's ``HEBuilder`` before ``SignatureBuilder`` in a provisioning ``project.yml`` (in place), so
    ``nvflare provision`` / ``nvflare poc prepare -i`` write the contexts into the kits and sign them. Needed with
    ``poc prepare -i``: NVFlare 2.9 ignores its ``-he`` flag when a project file is given."""
    import yaml

    project_file = Path(project_file)
    project = yaml.safe_load(project_file.read_text())
    builders = project["builders"]
    if not any(b.get("path") == HE_BUILDER for b in builders):
        names = [b.get("path", "") for b in builders]
        at = next((i for i, n in enumerate(names) if n.endswith("SignatureBuilder")), len(builders))
        builders.insert(at, {"path": HE_BUILDER, "args": {}})
        project_file.write_text(yaml.safe_dump(project, sort_keys=False))
    return project_file


def prepare_simulator_workspace(workspace_root: str | Path, job_name: str) -> Path:
    """Write both contexts into the simulator workspace's ``startup/`` (NVFlare copies it to every participant):
    the simulator then runs an HE job. Test/benchmark use only: here the server process could read the secret key."""
    startup = Path(workspace_root) / job_name / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    server, client = make_contexts()
    (startup / SERVER_CONTEXT).write_bytes(server)
    (startup / CLIENT_CONTEXT).write_bytes(client)
    return startup


def decrypt_global_model(model_file: str | Path, client_context: str | Path) -> dict[str, Any]:
    """The server's saved HE global model (``FL_global_model.pt``) as plain numpy arrays, decrypted with a site's
    ``client_context.tenseal`` (the secret key). Plain tensors (never encrypted, e.g. round 0) pass unchanged."""
    import numpy as np
    import tenseal as ts

    from fetalseg.bundle import load_checkpoint_file

    ctx = ts.context_from(Path(client_context).read_bytes())
    saved = load_checkpoint_file(model_file)  # the project's one torch.load: a file cannot run code here
    out = {}
    for name, value in saved["model"].items():
        if isinstance(value, bytes):
            value = ts.ckks_vector_from(ctx, value).decrypt()
        out[name] = np.asarray(value, dtype=np.float64)
    return out


class HECiphertextCheck(Filter):
    """Server input filter (fail closed): a training result whose weights are not all CKKS ciphertext is refused,
    so a site whose encryptor is missing cannot slip a plaintext update into an HE job. Logs what arrived."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        if shareable.get_return_code(ReturnCode.OK) != ReturnCode.OK:
            return shareable
        from tenseal.tensors.ckksvector import CKKSVector

        dxo = from_shareable(shareable)
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer else "?"
        if dxo.data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            return shareable
        plain = [k for k, v in dxo.data.items() if not isinstance(v, CKKSVector)]
        values = sum(v.size() for v in dxo.data.values() if isinstance(v, CKKSVector))
        if plain:
            self.log_error(fl_ctx, f"HE check: {site} sent {len(plain)} tensors in the clear ({plain[:3]}...): refused")
            raise ValueError(f"HE job: {site} sent plaintext weights {plain[:3]}")
        self.log_info(fl_ctx, f"HE check: {site} sent {len(dxo.data)} of {len(dxo.data)} tensors as CKKS ciphertext "
                      f"({values} values)")  # fmt: skip
        return shareable


class FetalBrainHERecipe(Recipe):
    """The fetal brain job under HE: the project's client script, config, privacy filters, audit and scope, with
    NVFlare's HE filters and ``ScatterAndGather`` (see the module docstring for what is left out and why)."""

    def __init__(
        self,
        config: Any,
        *,
        per_site_config: Mapping[str, Mapping[str, Any]] | None = None,
        command: str = "python3 -u",
    ) -> None:
        from nvflare.apis.job_def import JobMetaKey
        from nvflare.app_common.workflows.scatter_and_gather import ScatterAndGather
        from nvflare.app_opt.he.intime_accumulate_model_aggregator import HEInTimeAccumulateWeightedAggregator
        from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
        from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
        from nvflare.app_opt.he.model_serialize_filter import HEModelSerializeFilter
        from nvflare.app_opt.he.model_shareable_generator import HEModelShareableGenerator
        from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
        from nvflare.app_opt.pt.job_config.model import PTModel
        from nvflare.client.config import ExchangeFormat, TransferType
        from nvflare.fuel.utils.constants import FrameworkType
        from nvflare.job_config.api import FedJob
        from nvflare.job_config.defs import FilterType
        from nvflare.job_config.script_runner import ScriptRunner
        from nvflare.recipe.utils import add_experiment_tracking, recipe_model_to_job_model, set_recipe_meta

        from nvflare_jobs.audit import SiteAuditFilter
        from nvflare_jobs.config import CONFIG_FILE_NAME
        from nvflare_jobs.fetal_brain.job import APP_PACKAGES, CLIENT_SCRIPT, MODEL_CLASS, TRAIN_TASK
        from nvflare_jobs.filters import build_filter

        self.config = config
        self.train_task = TRAIN_TASK
        self._staging = tempfile.TemporaryDirectory(prefix="fetal_fl_he_job_")
        staging = Path(self._staging.name)
        script = staging / CLIENT_SCRIPT.name
        shutil.copyfile(CLIENT_SCRIPT, script)
        config_file = staging / CONFIG_FILE_NAME
        config_file.write_text(config.to_json())
        job = FedJob(name=config.name, min_clients=config.min_clients)
        job.set_app_packages(list(APP_PACKAGES))
        model = recipe_model_to_job_model(
            {
                "class_path": MODEL_CLASS,
                "args": {"bundle_overrides": config.bundle_overrides, "init_seed": config.init_seed},
            }
        )
        ckpt = None
        if config.initial_checkpoint:
            from nvflare.recipe.utils import prepare_initial_ckpt

            from nvflare_jobs.fetal_brain.job import INITIAL_MODEL_NAME
            from nvflare_jobs.fetal_brain.model import write_initial_model

            staged = staging / INITIAL_MODEL_NAME
            write_initial_model(config.initial_checkpoint, staged, bundle_overrides=config.bundle_overrides)
            ckpt = prepare_initial_ckpt(os.path.relpath(staged), job)
        persistor = PTFileModelPersistor(model=model, source_ckpt_file_full_name=ckpt, filter_id="he_serialize")
        comp = job.to_server(PTModel(model=model, persistor=persistor))
        job.to_server(HEModelSerializeFilter(), id="he_serialize")
        aggregator_id = job.to_server(
            HEInTimeAccumulateWeightedAggregator(expected_data_kind=DataKind.WEIGHT_DIFF, weigh_by_local_iter=False),
            id="aggregator",
        )
        generator_id = job.to_server(HEModelShareableGenerator(), id="shareable_generator")
        job.to_server(
            ScatterAndGather(
                min_clients=config.min_clients,
                num_rounds=config.num_rounds,
                wait_time_after_min_received=config.straggler_wait_s,
                aggregator_id=aggregator_id,
                persistor_id=comp["persistor_id"],
                shareable_generator_id=generator_id,
                train_task_name=TRAIN_TASK,
                train_timeout=config.task_timeout_s,
            )
        )
        job.to_server({"server": {"task_request_interval": config.task_request_interval_s}})
        # every site: its own executor (a per-site script may replace the project's), then filters in this order:
        # incoming decryption; outgoing privacy filters, the site's audit record (plaintext hash), the encryptor LAST
        per_site = per_site_config or {}
        chain = [
            {"type": s.type, "path": s.path, "args": dict(s.args), "sites": list(s.sites or []), "tasks": list(s.tasks)}
            for s in config.filters
        ]
        for site in config.sites:
            custom = dict(per_site.get(site, {}))
            site_script = custom.get("train_script", str(script))
            job.to(
                ScriptRunner(
                    script=site_script,
                    script_args=custom.get("train_args", f"--config {CONFIG_FILE_NAME}"),
                    launch_external_process=config.external_process,
                    command=command,
                    framework=FrameworkType.PYTORCH,
                    server_expected_format=ExchangeFormat.NUMPY,
                    params_transfer_type=TransferType.DIFF,
                ),
                site,
            )
            job.to(str(config_file), site)
            job.to(HEModelDecryptor(), site, tasks=[TRAIN_TASK], filter_type=FilterType.TASK_DATA)
            for spec in config.filters:
                if spec.sites and site not in spec.sites:
                    continue
                job.to(build_filter(spec), site, tasks=list(spec.tasks), filter_type=FilterType.TASK_RESULT)
            job.to(SiteAuditFilter(chain=chain), site, tasks=[TRAIN_TASK], filter_type=FilterType.TASK_RESULT)
            job.to(
                HEModelEncryptor(weigh_by_local_iter=True), site, tasks=[TRAIN_TASK], filter_type=FilterType.TASK_RESULT
            )
        self._script_dirs = [str(staging)] + [
            str(Path(s["train_script"]).resolve().parent) for s in per_site.values() if s.get("train_script")
        ]
        job.to_server(HECiphertextCheck(), tasks=[TRAIN_TASK], filter_type=FilterType.TASK_RESULT)
        super().__init__(job)
        if config.tracking:
            add_experiment_tracking(self, config.tracking)
        if config.scope:
            set_recipe_meta(self, JobMetaKey.SCOPE, config.scope)

    def _with_scripts(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import sys

        saved = list(sys.path)
        sys.path[:0] = self._script_dirs  # NVFlare copies a script relative to the longest sys.path entry
        try:
            return fn(*args, **kwargs)
        finally:
            sys.path[:] = saved

    def export(self, job_dir: str, *args: Any, **kwargs: Any) -> None:
        self._with_scripts(super().export, job_dir, *args, **kwargs)
        check_exported_job(Path(job_dir) / self.config.name, self.train_task)

    def run(self, env: Any, *args: Any, **kwargs: Any) -> Any:
        with tempfile.TemporaryDirectory() as tmp:  # the same order check as for an export, before anything runs
            self.export(tmp)
        return self._with_scripts(super().run, env, *args, **kwargs)


def check_exported_job(job_folder: Path, task: str) -> None:
    """:func:`check_encryptor_last` on every client app of an exported job folder."""
    import json

    configs = sorted(job_folder.glob("*/config/config_fed_client.json"))
    if not configs:
        raise FileNotFoundError(f"no client app config under {job_folder}")
    for path in configs:
        check_encryptor_last(json.loads(path.read_text()), task)
