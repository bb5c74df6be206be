"""Resume a job that a server restart abandoned: a continuation job that starts from its last persisted round.

Why this and not NVFlare's own resume: NVFlare 2.9 removed in-job snapshots (``ServerEngine.persist_components``
is a no-op and nothing calls ``JobRunner.restore_running_job``), so a restarted server has no process for a job
that was running. What survives is the job definition in the job store and the global model NVFlare's
``PTFileModelPersistor`` saved after every round (``<server>/<job>/app_server/FL_global_model.pt``, its round in
``meta_props.current_round``). The continuation is the same job definition, unchanged (NVFlare's ``clone_job``; a
changed app would fail the submitter's signature check in secure kits), whose job meta carries
:data:`RESUME_KEY` ``{"of_job", "abandoned_job", "start_round"}`` (NVFlare writes the meta into every
participant's run folder):

* the server workflow (:class:`nvflare_jobs.controllers.MinClientsMixin`) starts at ``start_round`` R = rounds
  done, runs the rounds left (the total stays the job config's ``num_rounds``) and starts from the abandoned job's
  last global model, loaded through :func:`fetalseg.bundle.load_checkpoint_file` and refused unless it is round
  R-1's;
* each site trains and charges its privacy ledger under ``of_job`` (the chain's first job): its DP accountant
  continues from the steps already taken and its reservation is reused, so no round is counted twice and the
  total ε is one accountant's over all the steps (:func:`check_resumed_accounting` refuses a site whose DP state
  was lost). A DP site re-sends the update of a round it trained after the last save (:func:`keep_sent_update`)
  instead of training it again: the same release costs nothing more.

The server kit's :class:`nvflare_jobs.deploy.InterruptedJobGuard` submits the continuation itself at start-up
(``server.resume_on_restart``, default true); ``fetal-fl fl resume <job id>`` does it by hand through the admin
API (``nvflare job submit`` of the job folder with the record in its ``meta.json``) for a kit where it is off.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nvflare_jobs.config import CONFIG_FILE_NAME

RESUME_KEY = "fetal_fl_resume"  # job meta of a continuation: {"of_job", "abandoned_job", "start_round"}
RESUMES_KEY = "resumes"  # job meta of a continuation: the abandoned job's id
RESUMED_BY_KEY = "resumed_by"  # job meta of an abandoned job: its continuation's id
ROUNDS_DONE_KEY = "rounds_done"  # job meta of an abandoned job: rounds whose global model was saved
ABANDONED = "FINISHED:ABANDONED"
GLOBAL_MODEL = "FL_global_model.pt"  # what NVFlare's PTFileModelPersistor saves after every round
# job meta copied to a continuation: what NVFlare's clone_job copies (data_storage_format too: without it the
# stored definition is read as the old fobs format), less where the old job's data lie, plus scope and submitter
COPIED_META = ("name", "job_folder_name", "deploy_map", "resource_spec", "approvals", "min_clients",
               "mandatory_clients", "data_storage_format", "study", "byoc", "scope", "submitter_name",
               "submitter_org", "submitter_role", "custom_props")  # fmt: skip


class ResumeError(RuntimeError):
    """A job cannot be continued (unknown, not abandoned, already resumed or finished, files missing)."""


def resume_enabled(job_config: Mapping[str, Any]) -> bool:
    """``server.resume_on_restart`` of a raw job config (default true)."""
    return bool((job_config.get("server") or {}).get("resume_on_restart", True))


def check_resumable(job_id: str, meta: Mapping[str, Any] | None) -> int:
    """Refuse (ResumeError) unless ``meta`` is an abandoned job's that was not resumed yet and saved a round;
    return its rounds done."""
    if not meta:
        raise ResumeError(f"job {job_id} is not known to the server: nothing to resume")
    status = meta.get("status")
    if status != ABANDONED:
        raise ResumeError(
            f"job {job_id} is {status}, not {ABANDONED}: only a job a server restart abandoned can be resumed"
        )
    if meta.get(RESUMED_BY_KEY):
        raise ResumeError(f"job {job_id} was already resumed as job {meta[RESUMED_BY_KEY]}")
    done = meta.get(ROUNDS_DONE_KEY)
    if not isinstance(done, int) or done < 1:
        raise ResumeError(f"job {job_id}: no round's global model was saved: submit the job again")
    return done


def resume_record(job_id: str, meta: Mapping[str, Any], rounds_done: int) -> dict[str, Any]:
    """The continuation's :data:`RESUME_KEY`: the first job of the chain (each site's ledger account), the job it
    continues (whose saved global model the server starts from) and the round it starts at."""
    previous = meta.get(RESUME_KEY) or {}
    return {"of_job": previous.get("of_job") or job_id, "abandoned_job": job_id, "start_round": int(rounds_done)}


def continuation_meta(meta: Mapping[str, Any], job_id: str, rounds_done: int) -> dict[str, Any]:
    """The continuation's job meta: the abandoned job's, less what belongs to that run, plus the resume record."""
    out = {k: meta[k] for k in COPIED_META if k in meta}
    out[RESUMES_KEY] = job_id
    out[RESUME_KEY] = resume_record(job_id, meta, rounds_done)
    return out


def stored_job_config(job_manager: Any, job: Any, fl_ctx: Any) -> dict[str, Any]:
    """The raw job config inside a stored job's definition (a site app's ``custom/`` folder)."""
    from nvflare.fuel.utils.zip_utils import unzip_all_from_bytes

    with tempfile.TemporaryDirectory(prefix="fetal_fl_resume_") as tmp:
        unzip_all_from_bytes(job_manager.get_content(job.meta, fl_ctx), tmp)
        for path in sorted(Path(tmp).glob(f"*/app_*/custom/{CONFIG_FILE_NAME}")):
            return json.loads(path.read_text())
    raise ResumeError(f"job {job.job_id}: no app carries the job config {CONFIG_FILE_NAME}")


def clone_in_store(job_manager: Any, job: Any, rounds_done: int, fl_ctx: Any) -> str:
    """Inside the server: the continuation as NVFlare's ``clone_job`` makes it (the stored definition as it is, so
    the submitter's signatures stay valid) with the resume record in its meta; return its id."""
    meta = job_manager.clone(job.job_id, continuation_meta(job.meta, job.job_id, rounds_done), fl_ctx)
    new_id = str(meta["job_id"])
    job_manager.update_meta(job.job_id, {RESUMED_BY_KEY: new_id}, fl_ctx)
    return new_id


# -- inside the continuation's processes ------------------------------------------------------------------------
def read_job_meta(run_dirs: list[Path], job_id: str) -> dict[str, Any]:
    """The job meta NVFlare writes into a job's run folder (``meta.json``), checked to be this job's."""
    for folder in run_dirs:
        path = Path(folder) / "meta.json"
        if path.is_file():
            meta = json.loads(path.read_text())
            if str(meta.get("job_id")) == str(job_id):
                return meta
    return {}


def accounting_job_id(job_id: str, meta: Mapping[str, Any]) -> str:
    """The job id a site charges its ledger (and keeps its DP state) under: the first job of a resumed chain."""
    record = meta.get(RESUME_KEY)
    if not record:
        return job_id
    of_job = record.get("of_job") if isinstance(record, Mapping) else None
    if not isinstance(of_job, str) or not of_job:
        raise ResumeError(f"job {job_id}: malformed {RESUME_KEY} in its meta: {record!r}")
    return of_job


def site_accounting_job_id(job_id: str) -> str:
    """:func:`accounting_job_id` for a site's training process (its working folder is the job's app folder)."""
    return accounting_job_id(job_id, read_job_meta([Path.cwd().parent, Path.cwd()], job_id))


def check_resumed_accounting(ledger: Any, *, dataset_id: str, job_id: str, steps: int) -> None:
    """Refuse to train if the DP accountant restored fewer steps than the ledger already holds for ``job_id``:
    a continuation that lost the site's DP state (``FETALFL_SITE_STATE`` not kept) would count from zero and its
    ε would hide what the first part spent."""
    recorded = [
        int(r.get("steps", 0))
        for r in ledger.records
        if r.get("type") == "spend" and r.get("job_id") == job_id and r.get("dataset_id") == dataset_id
    ]
    if recorded and steps < max(recorded):
        raise ResumeError(
            f"the ledger holds {max(recorded)} DP step(s) of job {job_id} on {dataset_id}, but this site's DP state "
            f"restored {steps}: keep FETALFL_SITE_STATE across the restart (refusing to count from zero)"
        )


def server_resume_record(fl_ctx: Any) -> dict[str, Any] | None:
    """The continuation's resume record, read by its server workflow (None for a plain job)."""
    engine = fl_ctx.get_engine()
    job_id = fl_ctx.get_job_id()
    workspace = engine.get_workspace()
    meta = read_job_meta([Path(workspace.get_run_dir(job_id))], job_id)
    record = meta.get(RESUME_KEY)
    if not record:
        return None
    if not isinstance(record.get("start_round"), int) or not record.get("abandoned_job"):
        raise ResumeError(f"job {job_id}: malformed {RESUME_KEY} in its meta: {record!r}")
    return {**record, "model": str(Path(workspace.get_app_dir(record["abandoned_job"])) / GLOBAL_MODEL)}


def load_resumed_params(model: str | Path, like: Mapping[str, Any], start_round: int) -> dict[str, Any]:
    """The abandoned job's last global model, through the project's one safe loader, as params of the same keys
    and types as ``like`` (the persistor's initial model); refused unless it is the model of round start-1."""
    import numpy as np

    from fetalseg.bundle import load_checkpoint_file

    path = Path(model)
    if not path.is_file():
        raise ResumeError(f"the abandoned job's last global model {path} is missing")
    data = load_checkpoint_file(path)
    weights = data.get("model") if isinstance(data, Mapping) else None
    saved = (data.get("meta_props") or {}).get("current_round") if isinstance(data, Mapping) else None
    if not isinstance(weights, Mapping) or set(weights) != set(like):
        raise ResumeError(f"{path} does not hold this job's model weights")
    if saved != start_round - 1:
        raise ResumeError(f"{path} is the model of round {saved}, not of round {start_round - 1}")
    out = {}
    for key, value in weights.items():
        tensor = value.detach().cpu()
        out[key] = tensor.numpy() if isinstance(like[key], np.ndarray) else tensor
    return out


# -- by hand, through the admin API ------------------------------------------------------------------------------
def resume_by_admin(
    job_id: str,
    job_folder: str | Path,
    admin: Callable[[list[str]], dict[str, Any]],
    workdir: str | Path,
) -> str:
    """``fetal-fl fl resume``: submit the continuation of an abandoned job; return the new job id.

    ``admin(args)`` runs one ``nvflare`` admin command and returns its JSON answer; ``job_folder`` is the job
    folder that was submitted (``fetal-fl fl export``). The job's meta must say abandoned, not yet resumed, with
    a saved round; the continuation is that folder with the resume record in its ``meta.json``."""
    answer = admin(["job", "meta", job_id])
    meta = answer.get("data") if answer.get("status") == "ok" else None
    done = check_resumable(job_id, meta)
    folder = Path(workdir) / "continuation" / Path(job_folder).name
    shutil.copytree(job_folder, folder)
    meta_file = folder / "meta.json"
    job_meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    job_meta.update({RESUMES_KEY: job_id, RESUME_KEY: resume_record(job_id, meta or {}, done)})
    meta_file.write_text(json.dumps(job_meta, indent=4))
    answer = admin(["job", "submit", "-j", str(folder)])
    new_id = (answer.get("data") or {}).get("job_id")
    if answer.get("status") != "ok" or not new_id:
        raise ResumeError(f"submitting the continuation of job {job_id} failed: {answer}")
    return str(new_id)


def admin_runner(startup_kit: str | Path, *, timeout: float = 300) -> Callable[[list[str]], dict[str, Any]]:
    """``admin(args)`` for :func:`resume_by_admin`: one ``nvflare --format json ... --startup-kit`` command."""
    import subprocess

    from nvflare_jobs.deploy import nvflare_executable

    def admin(args: list[str]) -> dict[str, Any]:
        cmd = [*nvflare_executable(), "--format", "json", *args, "--startup-kit", str(startup_kit)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        if not lines:
            raise ResumeError(f"{' '.join(args)}: no JSON answer from the server:\n{out}")
        return json.loads(lines[-1])

    return admin


def register_cli(sub: Any) -> None:
    """``fetal-fl fl resume <job id> --job-folder F --startup-kit K``."""
    p = sub.add_parser(
        "resume",
        help="continue a job a server restart abandoned, from its last saved round",
        description="For a server kit with server.resume_on_restart false (else the server does it at start-up): "
        "checks that the job is FINISHED:ABANDONED, downloads its last global model, and submits the same job "
        "folder as a continuation (rounds continue at the rounds done; each site keeps charging its privacy "
        "ledger under the first job's id).",
    )
    p.add_argument("job_id", help="the abandoned job's id")
    p.add_argument("--job-folder", type=Path, required=True, help="the job folder that was submitted")
    p.add_argument("--startup-kit", type=Path, required=True, help="the admin's startup kit")
    p.set_defaults(handler=_resume_cli)


def _resume_cli(args: Any) -> int:
    with tempfile.TemporaryDirectory(prefix="fetal_fl_resume_") as tmp:
        new_id = resume_by_admin(args.job_id, args.job_folder, admin_runner(args.startup_kit), tmp)
    print(f"job {args.job_id} resumed as job {new_id}")
    return 0


# -- a site's last sent update: re-sent, not retrained, when a continuation asks for that round again ------------
def sent_update_path(state_path: str | Path | None, site: str, job_id: str) -> Path | None:
    """Where a DP site keeps its last sent update (beside its DP state; None without one)."""
    return None if state_path is None else Path(state_path).with_name(f"sent_update_{site}_{job_id}.pt")


def _fingerprint(params: Mapping[str, Any]) -> str:
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for key in sorted(params):
        value = params[key]
        array = np.ascontiguousarray(value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value))
        digest.update(key.encode() + str(array.dtype).encode() + str(array.shape).encode() + array.tobytes())
    return digest.hexdigest()


def keep_sent_update(
    path: Path | None, *, round: int, global_params: Mapping[str, Any], update: dict[str, Any]
) -> None:
    """Before a DP site sends round ``round``'s update (DIFF, metrics, meta): keep it with the global model it was
    trained from. A server restart can lose it after it left the site; the continuation then asks for the same
    round from the same model, and re-sending the same release costs no privacy where retraining would."""
    if path is None:
        return
    import torch

    from fetalseg.plumbing import atomic_open

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "wb") as fh:
        torch.save({"round": int(round), "global_sha256": _fingerprint(global_params), **update}, fh)


def sent_update(path: Path | None, *, round: int, global_params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The kept update if it was for ``round`` trained from exactly ``global_params``, else None (loaded
    tensors-only through :func:`fetalseg.bundle.load_checkpoint_file`)."""
    if path is None or not path.is_file():
        return None
    from fetalseg.bundle import load_checkpoint_file

    kept = load_checkpoint_file(path)
    if kept.get("round") != round or kept.get("global_sha256") != _fingerprint(global_params):
        return None
    return {k: kept[k] for k in ("params", "metrics", "meta")}
