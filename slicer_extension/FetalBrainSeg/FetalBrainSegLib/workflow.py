"""The radiologist's flow, without any GUI: connect, get a case, segment, correct, submit, fine-tune.

Why here and not in the Slicer module: everything a radiologist does is then testable against the real server
without Slicer; the module's Logic only moves voxel arrays between Slicer nodes and this class.

The state it keeps: the server (URL, token, ``/info/``), its labels, the model (version, origin, privacy), the
current case and its files, and the outbox of corrections not yet delivered.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .client import FINAL_TAG, MonaiLabelClient, normalize_server_url
from .errors import (
    FetalBrainSegError,
    NoCaseError,
    NotConnectedError,
    ProtocolError,
    RequestRejectedError,
    TrainingAlreadyRunningError,
    is_retryable,
)
from .labels import LabelSet
from .outbox import Outbox, OutboxEntry
from .qc import QcReport
from .segio import write_seg_nrrd
from .validation import grid_problems, validate_correction, value_problems
from .volumeio import Geometry, Volume, nifti_bytes, read_geometry, read_volume, suffix_of

log = logging.getLogger(__name__)

STORED = "stored"
QUEUED = "queued"


# ---------------------------------------------------------------------------------------------------------------
# What the server says about its model
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """Version, origin (federated job/round) and privacy (ε) of the served model, as far as ``/info/`` reports them.

    Looked up, most specific first, in ``origin``/``provenance`` (text or ``{source, job, round, site}``), the
    model's ``/info/`` entry and its ``model``/``checkpoint``/``config`` parts, then ``model``/``model_info`` at top
    level: ``model_version``/``version`` (else ``published_at`` + ``sha256``, else ``bundle_version``);
    ``job``/``job_id`` and ``round``; ``privacy`` (``{epsilon, delta, mechanism}``) or a plain ``epsilon``/``delta``.
    Whatever is absent is shown as "not reported", never guessed.
    """

    name: str
    version: str | None = None
    origin: str | None = None
    federated_job: str | None = None
    federated_round: int | None = None
    epsilon: float | None = None
    delta: float | None = None
    privacy_note: str | None = None
    # what the served site model is made of (``parts`` in /info/): the shared, federated part and this site's own
    shared_part: str | None = None
    local_part: str | None = None

    @classmethod
    def from_info(cls, info: Mapping[str, Any], model: str) -> ModelInfo:
        models = _mapping(info.get("models"))
        section = _mapping(models.get(model))
        origin_raw = _first(
            [
                section,
                _mapping(section.get("model")),
                _mapping(section.get("config")),
                _mapping(info.get("model")),
                info,
            ],
            ("origin", "provenance", "model_origin"),
        )
        # where apps put the served checkpoint's description, most specific first
        sources = [
            _mapping(origin_raw),
            _mapping(section.get("model")),
            _mapping(section.get("checkpoint")),
            section,
            _mapping(section.get("config")),
            _mapping(info.get("model")),
            _mapping(info.get("model_info")),
        ]
        version = _first(sources, ("model_version", "version"))
        if version is None:
            stamp = _first(sources, ("published_at", "modified"))
            digest = _first(sources, ("sha256", "checksum"))
            if stamp or digest:
                version = " ".join(x for x in (str(stamp or ""), f"({str(digest)[:12]})" if digest else "") if x)
            elif _first(sources, ("bundle_version",)) is not None:
                version = f"bundle {_first(sources, ('bundle_version',))}"

        job = _first(sources, ("job", "job_id", "federated_job", "job_name"))
        rnd = _first(sources, ("round", "federated_round", "current_round"))
        kind = origin_raw if isinstance(origin_raw, str) else _first(sources[:1], ("source", "kind", "type"))
        parts = [str(kind)] if kind else []
        if job is not None:
            parts.append(f"job {job}")
        if rnd is not None:
            parts.append(f"round {rnd}")
        site = _first(sources[:3], ("site", "sites"))
        if site:
            parts.append(f"site {site}" if isinstance(site, str) else f"sites {', '.join(map(str, site))}")
        if _first(sources, ("trained",)) is False:
            parts = ["untrained (random weights)", *(p for p in parts if p != "untrained")]
        origin_text = ", ".join(parts) or None

        privacy = _first([*sources, info], ("privacy", "differential_privacy", "dp"))
        eps = _first([_mapping(privacy), *sources], ("epsilon", "eps", "ε"))
        delta = _first([_mapping(privacy), *sources], ("delta", "δ"))
        note = None
        if isinstance(privacy, Mapping):
            note = _first([privacy], ("mechanism", "method", "note", "accountant"))
            if eps is None and privacy.get("enabled") is False:
                note = "no differential privacy"
        elif isinstance(privacy, str):
            note = privacy
        elif privacy is False:
            note = "no differential privacy"
        return cls(
            name=model,
            version=None if version is None else str(version),
            origin=origin_text,
            federated_job=None if job is None else str(job),
            federated_round=_as_int(rnd),
            epsilon=_as_float(eps),
            delta=_as_float(delta),
            privacy_note=None if note is None else str(note),
            **_parts_text(_first(sources, ("parts",))),
        )

    @property
    def version_text(self) -> str:
        return self.version or "not reported by the server"

    @property
    def origin_text(self) -> str:
        return self.origin or "not reported by the server"

    @property
    def shared_part_text(self) -> str:
        return self.shared_part or "not reported by the server"

    @property
    def local_part_text(self) -> str:
        return self.local_part or "none (every weight is the shared model's)"

    @property
    def privacy_text(self) -> str:
        """E.g. ``ε = 6 (δ = 1e-05), DP-SGD``; says plainly when the server reports nothing."""
        if self.epsilon is None:
            return self.privacy_note or "not reported by the server (assume no formal privacy guarantee)"
        text = f"ε = {self.epsilon:.3g}"
        if self.delta is not None:
            text += f" (δ = {self.delta:.0e})"
        if self.privacy_note:
            text += f", {self.privacy_note}"
        return text


def _parts_text(parts: Any) -> dict[str, str | None]:
    """``shared_part`` / ``local_part`` sentences from the app's ``parts`` (``{shared: {...}, local: {...}}``)."""
    if not isinstance(parts, Mapping):
        return {}
    shared, local = parts.get("shared"), parts.get("local")
    out: dict[str, str | None] = {"shared_part": None, "local_part": None}
    if isinstance(shared, Mapping):
        where = ", ".join(
            x
            for x in (
                str(shared.get("origin") or "federated"),
                f"job {shared['job_id']}" if shared.get("job_id") is not None else "",
                f"round {shared['round']}" if shared.get("round") is not None else "",
            )
            if x
        )
        privacy = _mapping(shared.get("privacy"))
        eps = _as_float(privacy.get("epsilon"))
        if eps is None:
            guarantee = "no differential-privacy guarantee reported"
        else:
            delta = _as_float(privacy.get("delta"))
            guarantee = f"ε = {eps:.3g}" + (f" (δ = {delta:.0e})" if delta is not None else " (δ not reported)")
            if privacy.get("accountant"):
                guarantee += f", {privacy['accountant']} accountant"
            if privacy.get("privacy_unit"):
                guarantee += f", privacy unit: {privacy['privacy_unit']}"
        out["shared_part"] = f"{where}; {guarantee}"
    elif local is not None:
        out["shared_part"] = "none: every weight of the served model was learned at this site"
    if isinstance(local, Mapping):
        if local.get("error"):
            out["local_part"] = f"cannot be read ({local['error']})"
        else:
            what = str(local.get("parameters") or "some weights")
            if local.get("weights") is not None:
                what += f" ({local['weights']} weights)"
            cases = local.get("training_cases")
            source = f"this site's {cases} cases" if cases is not None else "this site's own cases"
            out["local_part"] = f"{what}, learned without DP from {source}, never sent"
    return out


def _log_message(line: str) -> str:
    """The message part of a server log line (``[time] [pid] [thread] [LEVEL] (where) - message``)."""
    head, sep, message = line.partition(") - ")
    return message if sep and head.startswith("[") else line


def _train_outcome(details: list[str]) -> str:
    """What the app's trainer reported as its result (``Result: {json}``), in words; '' if it did not."""
    for line in reversed(details):
        if line.startswith("Result: {"):
            try:
                result = json.loads(line[len("Result: ") :])
            except ValueError:
                return ""
            dice = result.get("val_mean_dice")
            dice_text = f" (validation Dice {dice:.3f})" if isinstance(dice, (int, float)) else ""
            if result.get("published") is False:
                reason = result.get("not_published_because", "")
                return f"The served model was kept{dice_text}: {reason}." if reason else f"Model kept{dice_text}."
            if result.get("published") is True:
                return f"The new model is now served{dice_text}; the next segmentation uses it."
            return ""
    return ""


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _first(sources: list[Any], keys: tuple[str, ...]) -> Any:
    for source in sources:
        if not isinstance(source, Mapping):
            continue
        for key in keys:
            if source.get(key) not in (None, ""):
                return source[key]
    return None


def _as_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Results shown to the radiologist
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    """The case being worked on: its id on the server, the downloaded image and its grid."""

    image_id: str
    image_path: Path
    geometry: Geometry
    strategy: str | None = None  # the active learning strategy that chose it; None if opened by id
    folder: Path = field(default_factory=Path)


@dataclass
class AutoSegmentation:
    """The server's segmentation of the current case, as a label volume and as a Slicer ``.seg.nrrd``."""

    label: Volume
    label_path: Path
    seg_nrrd_path: Path
    qc: QcReport | None = None  # the server's volume check at the case's gestational age (shown next to the case)


@dataclass
class SubmitResult:
    """What happened to a correction: ``stored`` on the server, or ``queued`` in the outbox."""

    status: str
    image_id: str
    message: str
    label_id: str | None = None
    entry: OutboxEntry | None = None
    qc: QcReport | None = None


@dataclass
class ResendReport:
    sent: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class TrainingStatus:
    """The server's latest fine-tuning task in words."""

    state: str  # none | submitted | running | done | error | stopped | unknown
    message: str
    task: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self.state in ("submitted", "running")

    @classmethod
    def from_task(cls, task: Mapping[str, Any] | None) -> TrainingStatus:
        if not task:
            return cls("none", "No fine-tuning has run on this server yet.", None)
        state = str(task.get("status", "unknown")).lower()
        started = task.get("start_ts", "")
        ended = task.get("end_ts", "")
        details = [_log_message(str(line)) for line in task.get("details") or []]
        last = f" Last log line: {details[-1][:160]}" if details else ""
        outcome = _train_outcome(details)
        texts = {
            "submitted": f"Fine-tuning queued ({started}).",
            "running": f"Fine-tuning running since {started}; you can keep working.{last}",
            "done": f"Fine-tuning finished at {ended}. {outcome}".rstrip(),
            "error": f"Fine-tuning failed at {ended}.{last} Tell the site administrator.",
            "stopped": f"Fine-tuning was stopped at {ended}.",
        }
        return cls(state, texts.get(state, f"Fine-tuning status: {state}."), dict(task))


# ---------------------------------------------------------------------------------------------------------------
# The flow
# ---------------------------------------------------------------------------------------------------------------


class Workflow:
    """State and steps of the clinician's session with one site's server."""

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        *,
        outbox_dir: str | os.PathLike[str] | None = None,
        client_id: str | None = None,
        client_factory: Callable[..., MonaiLabelClient] = MonaiLabelClient,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(outbox_dir if outbox_dir is not None else self.work_dir / "outbox")
        self.client_id = client_id or _default_client_id()
        self._client_factory = client_factory
        self.client: MonaiLabelClient | None = None
        self.info: dict[str, Any] = {}
        self.labels: LabelSet | None = None
        self.model: ModelInfo | None = None
        self.case: Case | None = None
        self.auto: AutoSegmentation | None = None
        self.ga_weeks: float | None = None  # the case's gestational age when the radiologist gave it
        self._training_state = "none"

    # -- connection --------------------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.client is not None and self.labels is not None

    @property
    def server_url(self) -> str | None:
        return self.client.server_url if self.client else None

    def connect(self, server_url: str, token: str | None = None) -> ModelInfo:
        """Read the server's ``/info/``: labels, model, strategies. Replaces any previous connection."""
        client = self._client_factory(normalize_server_url(server_url), token)
        info = client.info()
        model_name = self._pick_model(info)
        labels = LabelSet.from_info(info, model_name)
        self.client, self.info, self.labels = client, info, labels
        self.model = ModelInfo.from_info(info, model_name)
        if self.case is not None and self.case.folder != self._server_folder():
            self.case, self.auto = None, None
        log.info("connected to %s: model %s, %d labels", client.server_url, model_name, len(labels.labels))
        return self.model

    def refresh_info(self) -> ModelInfo:
        """Re-read ``/info/`` (after fine-tuning or a federated model install the version changes)."""
        client = self._require_client()
        return self.connect(client.server_url, client.token)

    def disconnect(self) -> None:
        self.client, self.info, self.labels, self.model = None, {}, None, None
        self.case, self.auto = None, None

    @property
    def strategies(self) -> list[str]:
        """Active learning strategies in the server's order (the app lists its preferred one first)."""
        return list((self.info.get("strategies") or {}).keys())

    @property
    def trainers(self) -> list[str]:
        return list((self.info.get("trainers") or {}).keys())

    def connection_summary(self) -> str:
        if not self.connected or self.model is None:
            return "Not connected."
        pending = len(self.pending())
        text = (
            f"Connected to {self.server_url}. Model '{self.model.name}', version {self.model.version_text}; "
            f"origin: {self.model.origin_text}; privacy: {self.model.privacy_text}."
        )
        if self.model.local_part:
            text += f" Shared part: {self.model.shared_part_text}. Local part: {self.model.local_part_text}."
        if pending:
            text += f" {pending} correction(s) waiting to be sent: press 'Re-send pending'."
        return text

    # -- cases -------------------------------------------------------------------------------------------------
    def next_case(self, strategy: str | None = None) -> Case | None:
        """Ask the server which case to annotate next (active learning); None when every case is done."""
        client = self._require_client()
        strategies = self.strategies
        if strategy is None:
            if not strategies:
                raise ProtocolError("The server offers no active learning strategy; open a case by its id instead.")
            strategy = strategies[0]
        result = client.next_sample(strategy, {"client_id": self.client_id})
        if result is None:
            return None
        return self._load_case(result["id"], strategy)

    def list_cases(self) -> list[str]:
        return self._require_client().list_images()

    def open_case(self, image_id: str) -> Case:
        """Download one case by its id."""
        self._require_client()
        image_id = (image_id or "").strip()
        if not image_id:
            raise ValueError("Enter the id of the case to open.")
        return self._load_case(image_id, None)

    def _load_case(self, image_id: str, strategy: str | None) -> Case:
        client = self._require_client()
        folder = self._server_folder() / _case_folder_name(image_id)
        path = client.download_image(image_id, folder)
        geometry = read_geometry(path)
        if len(geometry.shape) != 3:
            raise ProtocolError(f"Case '{image_id}' is not a 3D volume (shape {geometry.shape}).")
        self.case = Case(image_id, path, geometry, strategy, self._server_folder())
        self.auto = None
        self.ga_weeks = None
        return self.case

    # -- segmentation --------------------------------------------------------------------------------------------
    def segment(self, params: Mapping[str, Any] | None = None) -> AutoSegmentation:
        """Run the server's model on the current case; also writes a ``.seg.nrrd`` with named, coloured tissues."""
        client, case, labels = self._require_client(), self._require_case(), self._require_labels()
        model = self._pick_model(self.info)
        folder = case.image_path.parent
        params = self._with_ga(params)
        path, result = client.infer_with_report(model, case.image_id, folder, params)
        label = read_volume(path)
        problems = grid_problems(label, case.geometry) + value_problems(label.array, labels)
        if problems:
            raise ProtocolError(
                "The server's segmentation does not fit the image, so it was not loaded: " + " ".join(problems)
            )
        label = Volume(
            np.asarray(label.array).astype(np.uint16 if labels.max_value > 255 else np.uint8), case.geometry.affine
        )
        stem = path.name[: len(path.name) - len(suffix_of(path))] if suffix_of(path) else path.name
        seg_path = write_seg_nrrd(folder / f"{stem}.seg.nrrd", label, labels)
        self.auto = AutoSegmentation(label, path, seg_path, QcReport.from_json(result.get("qc")))
        return self.auto

    def _with_ga(self, params: Mapping[str, Any] | None) -> dict[str, Any]:
        """``params`` with the case's GA (``ga_weeks``): the one given now is remembered for the case's submit."""
        out = dict(params or {})
        if out.get("ga_weeks") not in (None, ""):
            self.ga_weeks = out["ga_weeks"]
        elif self.ga_weeks is not None:
            out["ga_weeks"] = self.ga_weeks
        return out

    # -- corrections ---------------------------------------------------------------------------------------------
    def submit(
        self, correction: Volume, params: Mapping[str, Any] | None = None, *, confirm_qc: bool = False
    ) -> SubmitResult:
        """Validate and send the correction as the case's ``final`` label; keep it in the outbox if sending fails.

        Raises :class:`CorrectionInvalidError` (local checks) or :class:`RequestRejectedError` (the server refused
        it): nothing is queued then, the segmentation stays open for fixing. A correction whose tissue volumes are
        far outside the normal range for the gestational age raises :class:`QcConfirmationRequiredError` (its
        ``flags`` say why): ask the radiologist, then call again with ``confirm_qc=True`` to store it anyway.
        Network, server and token failures return a ``queued`` result instead: the correction is on disk and
        "Re-send pending" delivers it.
        """
        client, case, labels = self._require_client(), self._require_case(), self._require_labels()
        array = validate_correction(correction, case.geometry, labels)
        payload = nifti_bytes(array, case.geometry.affine)
        send_params = {"client_id": self.client_id, "source": "FetalBrainSeg", **self._with_ga(params)}
        if confirm_qc:
            send_params["confirm_qc"] = True
        try:
            result = client.save_label(
                case.image_id,
                payload,
                filename=f"{_case_folder_name(case.image_id)}.nii.gz",
                tag=FINAL_TAG,
                params=send_params,
            )
        except FetalBrainSegError as e:
            if not is_retryable(e):
                raise
            entry = self.outbox.put(client.server_url, case.image_id, payload, error=str(e), params=send_params)
            return SubmitResult(
                QUEUED,
                case.image_id,
                f"{e}\nYour correction is saved on this computer and will be sent with 'Re-send pending'.",
                entry=entry,
            )
        stale = self.outbox.find(client.server_url, case.image_id)
        if stale is not None:  # an older pending correction must never overwrite this newer one later
            self.outbox.remove(stale)
        label_id = str(result.get("label", case.image_id))
        return SubmitResult(
            STORED,
            case.image_id,
            f"Correction of case '{case.image_id}' stored on the server.",
            label_id,
            qc=QcReport.from_json(result.get("qc")),
        )

    def pending(self) -> list[OutboxEntry]:
        """Corrections for the connected server (or all, when not connected) waiting to be sent."""
        return self.outbox.entries(self.server_url)

    def resend_pending(self) -> ResendReport:
        """Send every pending correction for this server, oldest first; stop at the first network failure."""
        client = self._require_client()
        report = ResendReport()
        entries = self.outbox.entries(client.server_url)
        for i, entry in enumerate(entries):
            try:
                client.save_label(
                    entry.image_id,
                    self.outbox.label_bytes(entry),
                    filename=f"{_case_folder_name(entry.image_id)}.nii.gz",
                    tag=entry.tag,
                    params=entry.params,
                )
            except RequestRejectedError as e:
                self.outbox.record_failure(entry, str(e), rejected=True)
                report.rejected.append(entry.image_id)
                continue
            except FetalBrainSegError as e:
                if not is_retryable(e):
                    raise
                self.outbox.record_failure(entry, str(e))
                report.kept += [x.image_id for x in entries[i:]]
                report.message = f"{e}\nStill waiting: {len(report.kept)} correction(s); they stay on this computer."
                break
            self.outbox.remove(entry)
            report.sent.append(entry.image_id)
        if not report.message:
            parts = [f"Sent {len(report.sent)} correction(s)." if entries else "No corrections are waiting."]
            if report.rejected:
                parts.append(
                    f"The server refused {len(report.rejected)} ({', '.join(report.rejected)}); they are kept in "
                    f"{self.outbox.root} marked 'rejected'. Open the case, fix the segmentation and submit again."
                )
            report.message = " ".join(parts)
        return report

    def fetch_stored_label(self, image_id: str | None = None, tag: str = FINAL_TAG) -> Volume:
        """Download the label the server stored for a case (to check a submission, or to resume work)."""
        client = self._require_client()
        image_id = image_id or self._require_case().image_id
        folder = self._server_folder() / _case_folder_name(image_id)
        return read_volume(client.download_label(image_id, tag, folder))

    # -- fine-tuning ---------------------------------------------------------------------------------------------
    def start_finetune(self, params: Mapping[str, Any] | None = None) -> TrainingStatus:
        """Start fine-tuning on the server's corrected cases (it runs on the server; keep working meanwhile)."""
        client = self._require_client()
        trainers = self.trainers
        if not trainers:
            raise ProtocolError("This server offers no fine-tuning task.")
        model = self._pick_model(self.info)
        trainer = model if model in trainers else trainers[0]
        try:
            task = client.start_training(trainer, params)
        except TrainingAlreadyRunningError as e:
            status = self.training_status()
            status.message = f"{e} {status.message}"
            return status
        status = TrainingStatus.from_task(task)
        self._training_state = status.state
        return status

    def training_status(self) -> TrainingStatus:
        """The latest fine-tuning task; when one has just finished, re-reads the model's version."""
        client = self._require_client()
        status = TrainingStatus.from_task(client.training_status())
        if self._training_state in ("submitted", "running") and status.state == "done":
            try:
                self.refresh_info()
            except FetalBrainSegError as e:  # the status is still worth showing
                log.warning("could not refresh the model info after fine-tuning: %s", e)
        self._training_state = status.state
        return status

    def stop_finetune(self) -> TrainingStatus:
        client = self._require_client()
        return TrainingStatus.from_task(client.stop_training() or client.training_status())

    # -- helpers -----------------------------------------------------------------------------------------------
    def _pick_model(self, info: Mapping[str, Any]) -> str:
        models = info.get("models") or {}
        if not isinstance(models, Mapping) or not models:
            raise ProtocolError("The server has no segmentation model loaded; ask the site administrator.")
        segmentation = [k for k, v in models.items() if isinstance(v, Mapping) and v.get("type") == "segmentation"]
        return (segmentation or list(models))[0]

    def _require_client(self) -> MonaiLabelClient:
        if self.client is None:
            raise NotConnectedError("Connect to the server first.")
        return self.client

    def _require_labels(self) -> LabelSet:
        if self.labels is None:
            raise NotConnectedError("Connect to the server first.")
        return self.labels

    def _require_case(self) -> Case:
        if self.case is None:
            raise NoCaseError("Open a case first ('Next case' or 'Open case').")
        return self.case

    def _server_folder(self) -> Path:
        url = self.server_url or "none"
        return self.work_dir / "cases" / hashlib.sha256(url.encode()).hexdigest()[:12]


def _case_folder_name(image_id: str) -> str:
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in image_id).strip("._")[:100] or "case"
    if cleaned != image_id:  # keep distinct ids distinct after cleaning
        cleaned += "-" + hashlib.sha256(image_id.encode()).hexdigest()[:8]
    return cleaned


def _default_client_id() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in some sandboxes
        user = "user"
    return f"slicer-{user}@{socket.gethostname()}"
