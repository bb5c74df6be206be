"""The API routes this app answers itself instead of stock MONAI Label: every route that takes a file or runs
the model.

Why replace them: stock MONAI Label 0.8.5 writes uploads wherever the id points, infers on any path it is given,
turns every bad input into a 500, and runs inference on the event loop so ``GET /info/`` waits behind it. These
routes keep the MONAI Label URLs, parameters and response formats (``MONAILabelClient`` and the Slicer plugin
work unchanged) but check ids, sizes and file contents first (400/404/409/413/415/422 with a sentence saying
what is wrong), store through the checking datastore, and run inference and active learning in a worker pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import BackgroundTasks, Body, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from monailabel.endpoints import activelearning as stock_activelearning
from monailabel.endpoints import train as stock_train
from monailabel.endpoints.infer import send_response
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException, MONAILabelException
from monailabel.interfaces.utils.app import app_instance
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from apps.fetal_brain.lib import audit
from apps.fetal_brain.lib import qc as app_qc
from apps.fetal_brain.lib.errors import (
    BadRequestError,
    InputError,
    NotFoundError,
    PayloadTooLargeError,
    UnprocessableError,
)
from apps.fetal_brain.lib.ids import check_id, check_tag
from apps.fetal_brain.lib.model_store import read_checkpoint
from apps.fetal_brain.lib.uploads import (
    IMAGE_SUFFIXES,
    LABEL_SUFFIXES,
    ZIP,
    check_upload,
    discard,
    new_upload_path,
    scrub,
    sniff_suffix,
    unpack_dicom_zip,
)
from apps.fetal_brain.lib.volumes import image_geometry
from fetalseg.data.io import stem_of
from fetalseg.data.validation import DataValidationError
from fetalseg.local_part import NEVER_SENT, holds_local_parts

log = logging.getLogger(__name__)

INFER_PARAMS = {"result_extension", "sw_overlap", "roi_size", "save_label", "client_id", "device", "label_tag"}
INFER_PARAMS |= {"ga_weeks"}  # gestational age for the volume check (apps.fetal_brain.lib.qc)
FORBIDDEN_INFER_PARAMS = {"image", "model", "label", "file", "session", "session_id", "model_filename", "images"}
OUTPUTS = {"json", "image", "all"}
_COPY_BLOCK = 1 << 20


class BodyTooLargeError(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit; FastAPI re-raises HTTPExceptions as is."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body is larger than the {limit}-byte limit")


def error_response(status: int, detail: str, problems: list[str] | None = None) -> JSONResponse:
    """A JSON error: ``detail`` (one string, as FastAPI errors) and ``problems`` (one sentence each)."""
    problems = [scrub(p) for p in (problems or [detail])]
    return JSONResponse(status_code=status, content={"detail": scrub(detail), "problems": problems})


def install_error_handlers(app: FastAPI) -> None:
    """Map the app's input errors (and MONAI Label's not-found errors) to 4xx JSON answers."""

    async def input_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, InputError)
        return error_response(exc.status, str(exc), exc.problems)

    async def data_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, DataValidationError)
        return error_response(422, str(exc), exc.problems)

    async def monailabel_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, MONAILabelException)
        status = 404 if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)) else 500
        return error_response(status, str(exc.msg))

    app.add_exception_handler(InputError, input_error)
    app.add_exception_handler(DataValidationError, data_error)
    app.add_exception_handler(MONAILabelException, monailabel_error)


def parse_object(text: str | None, *, what: str = "params") -> dict[str, Any]:
    """A form field holding a JSON object ('' means {})."""
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"{what} is not valid JSON ({exc.msg} at position {exc.pos})") from exc
    if not isinstance(value, dict):
        raise BadRequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def infer_params(text: str | None) -> dict[str, Any]:
    """Client infer parameters: path-like keys are refused, unknown keys dropped (clients send UI settings)."""
    params = parse_object(text)
    forbidden = sorted(set(params) & FORBIDDEN_INFER_PARAMS)
    if forbidden:
        raise BadRequestError(f"params may not set {forbidden}; name the image with ?image=<id> or upload a file")
    dropped = sorted(set(params) - INFER_PARAMS)
    if dropped:
        log.info("ignoring infer params %s", dropped)
    return {k: v for k, v in params.items() if k in INFER_PARAMS}


def _copy_upload(upload: UploadFile, target: Path, *, limit: int) -> None:
    """Copy an upload to ``target`` (in the private folder); 400 if empty, 413 if too big."""
    size = 0
    with open(target, "wb") as out:
        upload.file.seek(0)
        while block := upload.file.read(_COPY_BLOCK):
            size += len(block)
            if size > limit:
                raise PayloadTooLargeError(f"upload is larger than the {limit}-byte limit")
            out.write(block)
    if size == 0:
        raise BadRequestError(f"upload {upload.filename or ''!r} is empty (0 bytes)")


def _finish_upload(
    raw: Path, filename: str | None, *, allowed: tuple[str, ...], limit: int, role: str, grid: tuple[int, ...] | None
) -> Path:
    """Give a copied upload its real suffix, unpack a zipped DICOM series to a folder, and check what its header
    declares (:func:`check_upload`) before anything reads its voxels."""
    suffix = sniff_suffix(raw, filename, allowed=allowed)
    path = raw.with_name(raw.name[: -len(".upload")] + suffix)
    raw.replace(path)
    if suffix != ZIP:
        check_upload(path, role=role, grid=grid)
        return path
    folder = unpack_dicom_zip(path, max_bytes=limit)
    check_upload(folder, role=role, grid=grid, name=path.name)
    path.unlink(missing_ok=True)
    return folder


async def receive_upload(
    upload: UploadFile,
    *,
    allowed: tuple[str, ...],
    limit: int,
    role: str = "image",
    grid: tuple[int, ...] | None = None,
) -> Path:
    """The upload, copied to the private folder and checked (type, size, header; a label against its image's
    ``grid``). On every failure, cancellation included (client gone, server stopping), its private sub-folder is
    removed here: the path is made before any worker thread runs, so no thread can finish with a file nobody owns."""
    raw = new_upload_path(".upload", name=upload.filename)
    try:
        await run_in_threadpool(_copy_upload, upload, raw, limit=limit)
        return await run_in_threadpool(
            _finish_upload, raw, upload.filename, allowed=allowed, limit=limit, role=role, grid=grid
        )
    except BaseException:
        discard(raw)
        raise


def _who(request: Request) -> tuple[str, str | None]:
    """The authenticated user and role the server front put in the scope (anonymous when auth is off)."""
    principal = request.scope.get("state", {}).get("principal")
    return (principal.user, principal.role) if principal is not None else ("anonymous", None)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_COPY_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _served_model(instance: Any) -> dict[str, Any]:
    store = getattr(instance, "store", None)
    try:
        return audit.model_version(store.describe()) if store is not None else {}
    except Exception as exc:  # the audit record must not fail the request
        return {"error": str(exc)}


def _prefetch(instance: Any, image_id: str) -> None:
    """Start pre-processing ``image_id`` for its coming /infer (apps without a prefetch hook: nothing)."""
    prefetch = getattr(instance, "prefetch", None)
    if prefetch is not None:
        prefetch(image_id)


def build_front(*, max_upload_bytes: int, infer_pool: ThreadPoolExecutor, audit_log: Path | None = None) -> FastAPI:
    """The FastAPI app holding the replaced routes (no docs of its own; the stock app's /docs stays)."""
    front = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    install_error_handlers(front)
    audit_path = audit.audit_log_path(audit_log)

    async def in_infer_pool(fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the inference pool (bounded, off the event loop); counted as queued until it starts."""
        activity = getattr(app_instance(), "activity", None)
        if activity is None:
            return await asyncio.get_running_loop().run_in_executor(infer_pool, fn, *args)
        activity.enter("queued")
        started = False

        def run() -> Any:
            nonlocal started
            started = True
            activity.leave("queued")
            return fn(*args)

        try:
            return await asyncio.get_running_loop().run_in_executor(infer_pool, run)
        finally:
            if not started:  # cancelled before a worker took it
                activity.leave("queued")

    @front.post("/infer/{model}")
    async def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        output: str | None = None,
        params: str = Form("{}"),
        file: UploadFile | None = File(None),
        label: UploadFile | None = File(None),
    ) -> Any:
        instance = app_instance()
        if model not in instance.info_models():
            raise NotFoundError(f"no model {model!r}; available: {instance.info_models()}")
        if session_id:
            raise BadRequestError("sessions are not supported; pass ?image=<id> or upload the image with the request")
        if label is not None:
            raise BadRequestError("this model takes no input label")
        if output is not None and output not in OUTPUTS:
            raise BadRequestError(f"output must be one of {sorted(OUTPUTS)}, got {output!r}")
        request = {"model": model, **infer_params(params)}
        if file is not None and image:
            raise BadRequestError("send either ?image=<id> or a file, not both")
        path: Path | None = None
        if file is not None:
            path = await receive_upload(file, allowed=(*IMAGE_SUFFIXES, ZIP), limit=max_upload_bytes)
            request["image"] = str(path)
            request.pop("save_label", None)
        elif image:
            await run_in_threadpool(instance.datastore().image_file, check_id(image))  # a PACS fetches here
            request["image"] = image
        else:
            raise BadRequestError("no image: pass ?image=<datastore id> or upload a file")
        try:  # a missing GA is fine, an absurd one is a 4xx before the model runs
            qc_image = path if path is not None else instance.datastore().image_file(image)
            await run_in_threadpool(app_qc.resolve_ga, qc_image, request.get(app_qc.GA_PARAM))
        except Exception:
            if path is not None:
                discard(path)
            raise
        try:
            result = await in_infer_pool(instance.infer, request)
        finally:  # the input is not needed once the model ran; on errors no background task would remove it
            if path is not None:
                discard(path)
        return send_response(instance.datastore(), result, output, background_tasks)

    async def add_image(image: str | None, params: str, file: UploadFile) -> dict[str, str]:
        instance = app_instance()
        image_id = check_id(image if image else stem_of(file.filename or ""), what="image id")
        info = parse_object(params)
        path = await receive_upload(file, allowed=(*IMAGE_SUFFIXES, ZIP), limit=max_upload_bytes)
        try:
            await run_in_threadpool(instance.datastore().add_image, image_id, str(path), info)
        finally:
            discard(path)
        _prefetch(instance, image_id)
        return {"image": image_id}

    @front.put("/datastore/")
    async def put_image_legacy(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...)):
        return await add_image(image, params, file)

    @front.put("/datastore/image")
    async def put_image(image: str | None = None, params: str = Form("{}"), file: UploadFile = File(...)):
        return await add_image(image, params, file)

    @front.put("/datastore/label")
    async def put_label(
        request: Request, image: str, params: str = Form("{}"), tag: str = "final", label: UploadFile = File(...)
    ) -> dict[str, Any]:
        instance = app_instance()
        datastore = instance.datastore()
        image_path = await run_in_threadpool(datastore.image_file, check_id(image))  # a PACS fetches here
        tag = check_tag(tag or "final")
        info = parse_object(params)
        grid, _ = await run_in_threadpool(image_geometry, image_path)  # the shape the label must declare
        path = await receive_upload(label, allowed=LABEL_SUFFIXES, limit=max_upload_bytes, role="label", grid=grid)
        try:
            sha = await run_in_threadpool(_file_sha256, path)
            info["qc"] = await run_in_threadpool(app_qc.check_correction, image_path, path, info)  # 409 if flagged
            label_id = await run_in_threadpool(datastore.save_label, image, str(path), tag, info)
        finally:
            discard(path)
        user, role = _who(request)
        audit.record(
            audit_path,
            "label_saved",
            user=user,
            role=role,
            image=image,
            label=label_id,
            tag=tag,
            upload_sha256=sha,
            model=_served_model(instance),
            qc={k: info["qc"].get(k) for k in ("ga_weeks", "ga_source", "flagged", "confirmed", "flags")},
        )
        res = instance.on_save_label(image, label_id) or {}
        res.update({"image": image, "label": label_id, "tag": tag, "qc": info["qc"]})
        return res

    @front.post("/activelearning/{strategy}")
    async def next_sample(strategy: str, params: dict[str, Any] | None = Body(None)) -> dict[str, Any]:
        instance = app_instance()
        if strategy not in instance.strategy_names():
            raise NotFoundError(f"no strategy {strategy!r}; available: {instance.strategy_names()}")
        # a strategy that runs no model (random) must not queue behind inferences: measured by bench_load, the
        # next case waited as long as an inference (p50 3.3 s vs 18 ms for /info/) when it shared their pool
        run = in_infer_pool if instance.strategy_uses_model(strategy) else run_in_threadpool
        result = await run(stock_activelearning.sample, strategy, params or {}, None)
        if isinstance(result, dict) and isinstance(result.get("id"), str):
            _prefetch(instance, result["id"])  # the client's /infer on this case comes next
        return result

    @front.post("/train/{model}")
    async def train(
        request: Request,
        model: str,
        params: dict[str, Any] | None = Body(None),
        run_sync: bool = False,
        enqueue: bool = False,
    ) -> Any:
        instance = app_instance()
        trainer = instance.trainer(model)
        trainer.validate(params)
        if not await run_in_threadpool(instance.datastore().final_cases):
            raise UnprocessableError("no corrected cases (images with a 'final' label) to fine-tune on yet")
        user, role = _who(request)
        base = _served_model(instance)  # the model the run starts from
        audit.record(audit_path, "train_requested", user=user, role=role, task=model, params=params, model=base)
        return await run_in_threadpool(stock_train.run_model, model, params, run_sync, enqueue)

    @front.post("/train/")
    async def train_all(request: Request, params: dict[str, Any] | None = Body(None), run_sync: bool = False) -> Any:
        instance = app_instance()
        params = params or {}
        for model in instance.trainer_names():
            sub = params.get(model)
            if sub is not None and not isinstance(sub, dict):
                raise BadRequestError(f"params[{model!r}] must be a JSON object")
            instance.trainer(model).validate(sub)
        user, role = _who(request)
        audit.record(
            audit_path, "train_requested", user=user, role=role, task="*", params=params, model=_served_model(instance)
        )
        return await run_in_threadpool(stock_train.run, params, run_sync)

    @front.get("/model/{model}")
    async def download_model(model: str) -> Any:
        """The served model's SHARED part only: the global checkpoint file, never the site's local part (a separate
        file) and never a model fine-tuned here (learned from this site's cases without DP): those are refused."""
        instance = app_instance()
        if model not in instance.info_models():
            raise NotFoundError(f"no model {model!r}; available: {instance.info_models()}")
        store = instance.store
        if not store.path.is_file():
            raise NotFoundError(f"model {model!r} has no checkpoint yet (the server runs untrained weights)")
        _, info = await run_in_threadpool(read_checkpoint, store.path)
        if holds_local_parts(info):
            raise InputError(
                f"the served model holds this site's local part ({NEVER_SENT}; learned without DP from this site's "
                "cases): it is not handed out. Share the federated global checkpoint instead",
                status=403,
            )
        return FileResponse(store.path, media_type="application/octet-stream", filename=f"{model}.pt")

    return front
