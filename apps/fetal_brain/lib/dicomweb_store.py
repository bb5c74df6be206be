"""A DICOMweb server (a hospital PACS, e.g. Orthanc) as the app's datastore: MONAI Label's ``--studies <URL>``.

Why not stock ``DICOMWebDatastore``: it downloads whatever id it is given (no id checks), converts with the dcmqi
binary it downloads at start-up, stores only final labels back, has no time-outs (a PACS that hangs hangs every
request) and turns a PACS that is down into a 500. Here:

* images are the PACS's T2-weighted (reconstructed) MR series, id = SeriesInstanceUID (checked as an id and as a
  DICOM UID); an id the PACS does not list is 404, so only that server's series are reachable. A case is a series
  whose SeriesDescription matches ``series_pattern`` (:data:`DEFAULT_SERIES_PATTERN`: T2 / HASTE / SSFSE and the
  usual reconstruction names); the study's other series (localisers, DWI, T1, raw stacks named otherwise) are not
  cases. Asking for such a series, or for a study without a usable series, is a 422 that names what the study
  holds;
* a series is fetched once (WADO-RS) into a local cache folder, written to a staging folder and renamed into
  place, checked as a readable single 3D series; everything else (labels on the image grid, values 0..7, atomic
  writes, bounded params) is :class:`~apps.fetal_brain.lib.datastore.FetalDatastore`'s, on that cache folder;
* every label saved (the model's result, tag ``original``, and the radiologist's correction, ``final``) is stored
  back in the PACS as a DICOM SEG on its series (:mod:`apps.fetal_brain.lib.dicom_seg`) BEFORE it is kept
  locally: if the PACS refuses or is down, the request fails and nothing changes;
* a PACS that is down, slow or refuses our credentials is a clear 424 (the request depended on the PACS), never
  a 500; series already fetched keep working while it is down;
* credentials come from a file (``pacs_credentials``, mode 0600) or the environment, never the command line, and
  are sent over plain HTTP only to this machine.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import numpy as np
import requests
from monailabel.datastore.local import DataModel, ImageLabelModel

from apps.fetal_brain.lib import qc as app_qc
from apps.fetal_brain.lib.datastore import FetalDatastore
from apps.fetal_brain.lib.dicom_seg import (
    CONTENT_LABEL,
    EmptySegmentationError,
    label_to_seg,
    qc_confirmed,
    seg_to_label,
    series_description,
)
from apps.fetal_brain.lib.errors import InputError, NotFoundError, UnprocessableError
from apps.fetal_brain.lib.ids import check_id, check_tag
from apps.fetal_brain.lib.volumes import image_geometry, load_image, load_label_for
from fetalseg.data.io import MAX_DICOM_FILES, write_nifti
from fetalseg.plumbing import atomic_write_json, file_lock

log = logging.getLogger(__name__)

T = TypeVar("T")
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
LIST_TTL_S = 5.0
CONVERTED = ".nifti"  # hidden: never listed as an image
SOURCE_FILE = ".pacs_source.json"  # which PACS a cache folder belongs to
DEFAULT_TIMEOUT_S = 30.0
# What a usable case is called in the PACS: a T2-weighted series (T2, HASTE, SSFSE, single shot TSE; not T2*) or a
# reconstructed volume (SVR/SRR, NiftyMIC, NeSVoR, SVRTK, "recon"); matched anywhere in SeriesDescription, any case.
DEFAULT_SERIES_PATTERN = r"(?i)(t2(?!\*)|haste|ss-?fse|sshtse|ssh-tse|svr|srr|niftymic|nesvor|recon)"
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class PacsUnavailableError(InputError):
    """The request needed the PACS and the PACS did not answer (down, slow, refused our credentials)."""

    status = 424


class PacsRefusedError(InputError):
    """Operations the PACS datastore does not offer (adding or deleting PACS images through this app)."""

    status = 405


def check_uid(value: object) -> str:
    """A safe id that is also a DICOM UID (digits and dots, at most 64 characters)."""
    text = check_id(value)
    if len(text) > 64 or not _UID.match(text):
        raise NotFoundError(f"image {text!r} is not a DICOM SeriesInstanceUID of this PACS")
    return text


def read_credentials(path: str | Path | None, env: dict[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) from a JSON file ``{"user": ..., "password": ...}`` readable by its owner only, else from
    ``FETAL_BRAIN_PACS_USER`` / ``FETAL_BRAIN_PACS_PASSWORD``; None when neither is set."""
    env = dict(os.environ) if env is None else env
    if path:
        path = Path(path).expanduser()
        try:
            mode = path.stat().st_mode
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"pacs_credentials {path}: cannot be read as JSON ({exc})") from exc
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ValueError(f"pacs_credentials {path}: readable by others; chmod 600 it")
        if not isinstance(data, dict) or not isinstance(data.get("user"), str) or "password" not in data:
            raise ValueError(f'pacs_credentials {path}: expected {{"user": ..., "password": ...}}')
        return data["user"], str(data["password"])
    user, password = env.get("FETAL_BRAIN_PACS_USER"), env.get("FETAL_BRAIN_PACS_PASSWORD")
    if user and password is not None:
        return user, password
    if password and not user:
        raise ValueError("FETAL_BRAIN_PACS_PASSWORD is set without FETAL_BRAIN_PACS_USER")
    return None


class _TimeoutSession(requests.Session):
    """A session whose requests time out (dicomweb-client passes none: a hung PACS would hang the app)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self.timeout_s = timeout_s

    def request(self, method, url, **kwargs):  # type: ignore[override]
        kwargs.setdefault("timeout", self.timeout_s)
        return super().request(method, url, **kwargs)


class PacsDatastore(FetalDatastore):
    """The MR series of one DICOMweb server, cached locally; labels stored back as DICOM SEG."""

    def __init__(
        self,
        url: str,
        cache: str | Path,
        *,
        credentials: tuple[str, str] | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        modality: str = "MR",
        algorithm: str = "fetal_brain_seg",
        read_only: bool = False,
        series_pattern: str = DEFAULT_SERIES_PATTERN,
    ) -> None:
        from dicomweb_client.api import DICOMwebClient

        url = url.rstrip("/")
        parsed = urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"--studies {url!r} is not an http(s) DICOMweb URL")
        if parsed.username or parsed.password:
            raise ValueError("put PACS credentials in pacs_credentials or the environment, not in the URL")
        if credentials and parsed.scheme == "http" and parsed.hostname not in _LOOPBACK:
            raise ValueError(f"refusing to send PACS credentials over plain http to {parsed.hostname}; use https")
        self.url = url
        self.modality = modality
        self.series_pattern = series_pattern
        self._usable = compile_series_pattern(series_pattern)
        self._warned_studies: set[str] = set()
        self.not_pulled: list[dict[str, str]] = []  # corrections in the PACS left out by the last pull, and why
        self.algorithm = algorithm
        session = _TimeoutSession(timeout_s)
        if credentials:
            session.auth = credentials
        self.client = DICOMwebClient(url=url, session=session)
        # no retries: dicomweb-client retries ANY failure 5 times with back-off (1+2+4+8+16 s measured as 30 s for a
        # PACS that is down); the user gets the 424 at once and retries when the PACS is back
        self.client.set_http_retry_params(retry=False)
        self._listing: tuple[float, dict[str, dict[str, str]]] | None = None
        self._fetch_lock = threading.Lock()
        _claim_cache(Path(cache), url)
        super().__init__(cache, auto_reload=False, read_only=read_only)

    def name(self) -> str:
        return self.url

    # -- the PACS -------------------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run a PACS request; its failures become 424 with the reason (404 stays 404)."""
        try:
            return fn()
        except requests.HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else None
            if code == 404:
                raise NotFoundError(f"{what}: the PACS at {self.url} does not have it (any more)") from exc
            if code in (401, 403):
                reason = f"refused our credentials (HTTP {code}; check pacs_credentials)"
            else:
                reason = f"answered HTTP {code}"
            raise PacsUnavailableError(f"{what}: the PACS at {self.url} {reason}; nothing was changed") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise PacsUnavailableError(
                f"{what}: the PACS at {self.url} is not reachable ({type(exc).__name__}); nothing was changed, "
                "try again when it is back"
            ) from exc
        except ValueError as exc:  # dicomweb-client/pydicom could not read the answer
            raise PacsUnavailableError(
                f"{what}: the PACS at {self.url} sent an answer that cannot be read ({exc}); nothing was changed"
            ) from exc
        except requests.RequestException as exc:
            raise PacsUnavailableError(f"{what}: the PACS at {self.url} failed ({exc}); nothing was changed") from exc

    def all_series(self, *, fresh: bool = False) -> dict[str, dict[str, str]]:
        """SeriesInstanceUID -> {StudyInstanceUID, PatientID, SeriesDescription, ...} of EVERY series of
        ``modality`` in the PACS (usable or not); cached for :data:`LIST_TTL_S`."""
        now = time.monotonic()
        if not fresh and self._listing is not None and now - self._listing[0] < LIST_TTL_S:
            return self._listing[1]
        from pydicom.dataset import Dataset

        found = self._call(
            "listing series",
            lambda: self.client.search_for_series(
                search_filters={"Modality": self.modality}, fields=["SeriesDescription"], get_remaining=True
            ),
        )
        series: dict[str, dict[str, str]] = {}
        for item in found:
            ds = Dataset.from_json(item)
            uid = str(ds.get("SeriesInstanceUID", ""))
            if _UID.match(uid) and len(uid) <= 64:
                series[uid] = {
                    key: str(ds.get(key, ""))
                    for key in ("StudyInstanceUID", "PatientID", "StudyDate", "SeriesDescription", "Modality")
                }
                series[uid]["SeriesInstanceUID"] = uid
        self._listing = (now, series)
        self._warn_unusable_studies(series)
        return series

    def usable(self, meta: dict[str, str]) -> bool:
        """Whether a series is a case: its SeriesDescription matches ``series_pattern``."""
        return bool(self._usable.search(meta.get("SeriesDescription", "")))

    def remote_series(self, *, fresh: bool = False) -> dict[str, dict[str, str]]:
        """The cases: the PACS's series of ``modality`` whose description matches ``series_pattern``."""
        return {uid: meta for uid, meta in self.all_series(fresh=fresh).items() if self.usable(meta)}

    def _warn_unusable_studies(self, series: dict[str, dict[str, str]]) -> None:
        """Log once per study that holds MR series but none this app can use (the site admin sees why)."""
        for study, metas in _by_study(series).items():
            if study not in self._warned_studies and not any(self.usable(m) for m in metas):
                self._warned_studies.add(study)
                log.warning("%s", self._study_problem(study, metas))

    def _study_problem(self, study: str, metas: list[dict[str, str]]) -> str:
        names = sorted({repr(m.get("SeriesDescription", "")) for m in metas})
        return (
            f"study {study} has no T2-weighted reconstructed series (SeriesDescription matching "
            f"pacs_series {self.series_pattern!r}); its {self.modality} series are {', '.join(names)}: it is not a "
            "case of this app (store the T2w/SVR volume in the PACS, or set --conf pacs_series)"
        )

    def _not_a_case(self, uid: str) -> InputError | None:
        """A clear 422 when ``uid`` is a listed series that is not a case, or a study; None when unknown."""
        listing = self.all_series()
        meta = listing.get(uid)
        if meta is not None:
            study = meta.get("StudyInstanceUID", "")
            usable = sorted(u for u, m in listing.items() if m.get("StudyInstanceUID") == study and self.usable(m))
            hint = f"use its T2w series {usable}" if usable else "the study has no usable series"
            return UnprocessableError(
                f"series {uid} ({meta.get('SeriesDescription', '')!r}) of study {study} is not a T2-weighted "
                f"reconstructed series (pacs_series {self.series_pattern!r}): {hint}"
            )
        metas = _by_study(listing).get(uid)
        if metas:
            usable = sorted(m["SeriesInstanceUID"] for m in metas if self.usable(m))
            if not usable:
                return UnprocessableError(self._study_problem(uid, metas))
            return UnprocessableError(f"{uid} is a study; image ids are its T2w series: {usable}")
        return None

    def _cached(self, image_id: str) -> bool:
        obj = self._datastore.objects.get(image_id)
        return obj is not None and (self.root / image_id).is_dir()

    def check_image(self, image_id: str) -> str:
        """404 unless ``image_id`` is a series of this PACS (cached or listed); cheap: nothing is downloaded."""
        uid = check_uid(image_id)
        if self._cached(uid):
            return uid
        if uid not in self.remote_series() and uid not in self.remote_series(fresh=True):  # stored just now?
            problem = self._not_a_case(uid)
            if problem is not None:
                raise problem
            raise NotFoundError(f"image {uid!r} is not an {self.modality} series of the PACS at {self.url}")
        return uid

    def image_file(self, image_id: str) -> Path:
        """The cached series folder of ``image_id``, fetched from the PACS on first use."""
        uid = self.check_image(image_id)
        if not self._cached(uid):
            with self._fetch_lock:
                if not self._cached(uid):
                    meta = self.remote_series().get(uid)
                    if meta is None:
                        raise NotFoundError(f"image {uid!r} is no longer a series of the PACS at {self.url}")
                    self._fetch(uid, meta)
        return self.root / uid

    def get_image_uri(self, image_id: str) -> str:
        """A NIfTI copy of the cached series (what ``GET /datastore/image`` hands a client such as the Slicer
        module: stock MONAI Label serves files, not folders); same voxels and grid as the series."""
        folder = self.image_file(image_id)
        out = self.root / CONVERTED / f"{folder.name}.nii.gz"
        if not out.is_file():
            vol = load_image(folder)
            write_nifti(np.asarray(vol.array), vol.affine, out)
        return str(out)

    def _fetch(self, uid: str, meta: dict[str, str]) -> None:
        """Retrieve one series (WADO-RS) into the cache: staged, checked, renamed into place."""
        instances = self._call(
            f"fetching series {uid}", lambda: self.client.retrieve_series(meta["StudyInstanceUID"], uid)
        )
        if not instances or len(instances) > MAX_DICOM_FILES:
            raise InputError(f"series {uid}: {len(instances)} instances (expected 1..{MAX_DICOM_FILES})", status=422)
        staged = Path(tempfile.mkdtemp(prefix="series-", dir=self._staging()))
        try:
            for i, ds in enumerate(instances):
                if str(ds.get("SeriesInstanceUID", "")) != uid:
                    raise InputError(f"series {uid}: the PACS returned an instance of another series", status=422)
                ds.save_as(str(staged / f"{i:05d}.dcm"), write_like_original=False)
            load_image(staged)  # one readable 3D series, or 422 with the reason
            with file_lock(self._lock_file):
                dest = self.root / uid
                if dest.exists():
                    shutil.rmtree(dest)
                os.replace(staged, dest)
                info = {**meta, "ts": int(time.time()), "name": uid, "format": "dicom", "source": self.url}
                existing = self._datastore.objects.get(uid)
                labels = existing.labels if existing is not None else {}
                self._datastore.objects[uid] = ImageLabelModel(image=DataModel(info=info, ext=""), labels=labels)
                self._update_datastore_file(lock=False)
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        log.info("fetched series %s (%d instances) from %s", uid, len(instances), self.url)

    # -- listing (MONAI Label's datastore API) ---------------------------------------------------------------------
    def list_images(self) -> list[str]:
        """The PACS's series; while it is down, the series already fetched (so /info/ and /datastore/ answer)."""
        try:
            return sorted(self.remote_series())
        except PacsUnavailableError as exc:
            log.warning("%s; listing cached series only", exc)
            return sorted(uid for uid in self._datastore.objects if self._cached(uid))

    def get_unlabeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        tag = label_tag or "final"
        return [uid for uid in self.list_images() if tag not in getattr(self._datastore.objects.get(uid), "labels", {})]

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        tag = label_tag or "final"
        return [uid for uid, obj in sorted(self._datastore.objects.items()) if tag in obj.labels]

    def _add_non_existing_images(self) -> int:
        return 0  # the cache lists only what was fetched through _fetch (never files dropped in its folder)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        uid = self.check_image(image_id)
        obj = self._datastore.objects.get(uid)
        if obj is not None:
            return dict(obj.image.info)
        return dict(self.remote_series().get(uid, {}))

    # -- corrections already in the PACS -------------------------------------------------------------------------
    def pull_corrections(self) -> list[str]:
        """Keep locally every correction (this app's ``final`` DICOM SEG) the PACS holds for its series that this
        cache lacks (a new cache, another workstation's save); returns their image ids. PACS down: none pulled."""
        from pydicom.dataset import Dataset

        try:
            listed = self.remote_series(fresh=True)
            found = self._call(
                "listing corrections",
                lambda: self.client.search_for_series(
                    search_filters={"Modality": "SEG"}, fields=["SeriesDate", "SeriesTime"], get_remaining=True
                ),
            )
        except PacsUnavailableError as exc:
            log.warning("%s; fine-tuning on the corrections kept locally", exc)
            return []
        known = {
            str(obj.labels["final"].info.get("pacs", {}).get("SeriesInstanceUID", ""))
            for obj in self._datastore.objects.values()
            if "final" in obj.labels
        }
        pulled: list[str] = []
        refused: set[str] = set()  # images whose newest correction was refused: an older one must not stand in
        self.not_pulled = []
        metas = [Dataset.from_json(item) for item in found]
        # newest first: of several corrections of one series in the PACS, the latest is the one kept
        metas.sort(key=lambda m: (str(m.get("SeriesDate", "")), str(m.get("SeriesTime", ""))), reverse=True)
        for meta in metas:
            seg_uid, study = str(meta.get("SeriesInstanceUID", "")), str(meta.get("StudyInstanceUID", ""))
            # filtered here: Orthanc's QIDO matched no SeriesDescription holding parentheses
            if not seg_uid or seg_uid in known or str(meta.get("SeriesDescription", "")) != series_description("final"):
                continue
            try:
                pulled += self._pull_one(study, seg_uid, listed, refused)
            except InputError as exc:
                self.not_pulled.append({"SeriesInstanceUID": seg_uid, "StudyInstanceUID": study, "problem": str(exc)})
                log.warning("correction %s in the PACS not used: %s", seg_uid, exc)
        return pulled

    def _pull_one(self, study: str, seg_uid: str, listed: dict[str, dict[str, str]], refused: set[str]) -> list[str]:
        instances = self._call(f"fetching correction {seg_uid}", lambda: self.client.retrieve_series(study, seg_uid))
        pulled = []
        for seg in instances:
            if str(seg.get("ContentLabel", "")) != CONTENT_LABEL:
                continue
            refs = [str(r.SeriesInstanceUID) for r in seg.get("ReferencedSeriesSequence", [])]
            image_id = next((r for r in refs if r in listed), None)
            if image_id is None or image_id in refused:
                continue
            existing = self._datastore.objects.get(image_id)
            if existing is not None and "final" in existing.labels:
                continue  # a correction saved here wins over an older one in the PACS
            folder = self.image_file(image_id)
            label, affine = seg_to_label(seg, folder)
            staged = self._staging() / f".pulled-{os.getpid()}-{time.monotonic_ns()}.nii.gz"
            try:
                write_nifti(label, affine, staged, dtype=np.uint8)
                info: dict[str, Any] = {"pacs": {"stored": True, "SeriesInstanceUID": seg_uid, "pulled": True}}
                # the rule the server applies to a saved correction, applied to one saved elsewhere: flagged
                # volumes are used (fine-tuning, export) only if the SEG records the radiologist's confirmation
                confirmed = qc_confirmed(seg)
                try:
                    info["qc"] = app_qc.check_correction(folder, staged, {app_qc.CONFIRM_PARAM: confirmed})
                except InputError:
                    refused.add(image_id)
                    raise
                info[app_qc.CONFIRM_PARAM] = confirmed
                FetalDatastore.save_label(self, image_id, str(staged), "final", info)
            finally:
                staged.unlink(missing_ok=True)
            pulled.append(image_id)
            log.info("pulled correction %s of %s from the PACS", seg_uid, image_id)
        return pulled

    def final_cases(self) -> list[tuple[str, Path, Path]]:
        """Corrected cases for fine-tuning: the ones kept here plus those only the PACS holds (pulled first)."""
        self.pull_corrections()
        return super().final_cases()

    # -- writes ---------------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        raise PacsRefusedError("images come from the PACS: store the series there (this app does not add images)")

    def remove_image(self, image_id: str) -> None:
        raise PacsRefusedError("images live in the PACS: this app never deletes them")

    def remove_label(self, label_id: str, label_tag: str) -> None:
        raise PacsRefusedError(
            "labels are stored in the PACS as DICOM SEG: delete the SEG series there (a label removed only here "
            "would come back from the PACS at the next fine-tune)"
        )

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check the label, store it in the PACS as a DICOM SEG on its series, then keep it locally (NIfTI)."""
        folder = self.image_file(image_id)
        tag = check_tag(label_tag or "final")
        label = load_label_for(folder, Path(label_filename))
        _, affine = image_geometry(folder)
        info = dict(label_info or {})
        qc_report = info.get("qc")
        confirmed = isinstance(qc_report, dict) and qc_report.get("confirmed") is True
        try:
            seg = label_to_seg(
                np.asarray(label), affine, folder, tag=tag, algorithm=self.algorithm, qc_confirmed=confirmed
            )
        except EmptySegmentationError as exc:
            info["pacs"] = {"stored": False, "reason": str(exc)}
            log.warning("label %s/%s not stored in the PACS: %s", image_id, tag, exc)
        else:
            self._call(f"storing the {tag} label of {image_id}", lambda: self.client.store_instances([seg]))
            info["pacs"] = {
                "stored": True,
                "SeriesInstanceUID": str(seg.SeriesInstanceUID),
                "SOPInstanceUID": str(seg.SOPInstanceUID),
                "StudyInstanceUID": str(seg.StudyInstanceUID),
            }
            log.info("stored %s label of %s in the PACS as SEG series %s", tag, image_id, seg.SeriesInstanceUID)
        return super().save_label(image_id, label_filename, tag, info)


def compile_series_pattern(pattern: str) -> re.Pattern[str]:
    """The ``pacs_series`` regular expression, compiled; a ValueError naming the setting if it is not one."""
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"pacs_series {pattern!r} is not a regular expression ({exc})") from exc


def _by_study(series: dict[str, dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    out: dict[str, list[dict[str, str]]] = {}
    for meta in series.values():
        out.setdefault(meta.get("StudyInstanceUID", ""), []).append(meta)
    return out


def _claim_cache(cache: Path, url: str) -> None:
    """Mark ``cache`` as this PACS's (first use) or refuse it if it holds another PACS's series: a cache shared
    between two URLs would serve one PACS's images as the other's."""
    cache.mkdir(parents=True, exist_ok=True)
    marker = cache / SOURCE_FILE
    if marker.is_file():
        try:
            owner = json.loads(marker.read_text()).get("url")
        except (OSError, json.JSONDecodeError, AttributeError) as exc:
            raise ValueError(f"pacs_cache {cache}: unreadable {SOURCE_FILE} ({exc})") from exc
        if owner != url:
            raise ValueError(f"pacs_cache {cache} holds series of {owner}, not {url}: use another pacs_cache folder")
        return
    if any(p.name not in (".lock",) for p in cache.iterdir()):
        raise ValueError(f"pacs_cache {cache} is not empty and not a PACS cache: use an empty or new folder")
    atomic_write_json(marker, {"url": url})


def open_pacs_datastore(url: str, config: Any, *, read_only: bool = False) -> PacsDatastore:
    """The app's PACS datastore from its settings (cache folder, credentials, time-out)."""
    from hashlib import sha256

    cache = config.pacs_cache or Path.home() / ".cache" / "fetal-fl" / "pacs" / sha256(url.encode()).hexdigest()[:16]
    return PacsDatastore(
        url,
        cache,
        credentials=read_credentials(config.pacs_credentials),
        timeout_s=config.pacs_timeout_s,
        read_only=read_only,
        series_pattern=getattr(config, "pacs_series", None) or DEFAULT_SERIES_PATTERN,
    )
