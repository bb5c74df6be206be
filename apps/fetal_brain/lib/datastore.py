"""The studies folder as a MONAI Label datastore that checks everything before it writes.

Stock ``LocalDatastore`` copies whatever it is given to wherever the id points (``../../x`` included) and accepts
any label. Here every id and tag is checked (:mod:`apps.fetal_brain.lib.ids`), images must be readable 3D volumes,
labels must lie on their image's grid with values 0..7, and files are written to a staging folder inside the
studies folder and renamed into place, so a failed request leaves the datastore exactly as it was and a reader
(the training subprocess) never sees half a file. Labels are stored as NIfTI whatever the upload format.
DICOM series folders inside the studies folder are images too (id = folder name).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore

from apps.fetal_brain.lib.errors import BadRequestError, ConflictError, NotFoundError, UnprocessableError
from apps.fetal_brain.lib.ids import check_id, check_tag, id_problem
from apps.fetal_brain.lib.uploads import IMAGE_SUFFIXES
from apps.fetal_brain.lib.volumes import image_geometry, is_dicom_dir, load_image, load_label_for
from fetalseg.data.io import suffix_of, write_nifti
from fetalseg.plumbing import file_lock

log = logging.getLogger(__name__)

IMAGE_PATTERNS = [f"*{s}" for s in IMAGE_SUFFIXES]
LABEL_SUFFIX = ".nii.gz"
STAGING = ".staging"
MAX_INFO_BYTES = 64 * 1024


class FetalDatastore(LocalDatastore):
    """A checked local datastore of fetal brain images (NIfTI, NRRD, DICOM folders) and FeTA labels."""

    def __init__(self, studies: str | Path, *, auto_reload: bool = True, read_only: bool = False) -> None:
        super().__init__(str(studies), extensions=IMAGE_PATTERNS, auto_reload=auto_reload, read_only=read_only)
        unsafe = [i for i in self.list_images() if id_problem(i)]
        if unsafe:
            log.warning("images whose names are not valid ids cannot be used through the API: %s", unsafe[:10])

    # -- paths --------------------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self._datastore.image_path()).resolve()

    def _staging(self) -> Path:
        path = Path(self._datastore_path) / STAGING
        path.mkdir(exist_ok=True)
        return path

    def image_file(self, image_id: str) -> Path:
        """The image (file or DICOM folder) of a known, safe id; :class:`NotFoundError` (404) otherwise."""
        check_id(image_id)
        if image_id not in self._datastore.objects:
            self._init_from_datastore_file()
        if image_id not in self._datastore.objects:
            raise NotFoundError(f"image {image_id!r} is not in the datastore")
        path = Path(self.get_image_uri(image_id))
        if self.root not in path.parents:  # ids are checked, but never serve a file outside the studies folder
            raise NotFoundError(f"image {image_id!r} is not in the studies folder")
        return path

    # -- listing: skip hidden/staging files, add DICOM series folders ---------------------------------------------
    def _list_files(self, path, patterns):
        return {k: v for k, v in super()._list_files(path, patterns).items() if not k.startswith(".")}

    def _add_non_existing_images(self) -> int:
        invalidate = super()._add_non_existing_images()
        labels_dir = Path(self._datastore.label_path(None)).resolve()
        for entry in sorted(self.root.iterdir()):
            if (
                entry.is_dir()
                and not entry.name.startswith(".")
                and entry.resolve() != labels_dir
                and entry.name not in self._datastore.objects
                and id_problem(entry.name) is None
                and is_dicom_dir(entry)
            ):
                info = {"ts": int(time.time()), "name": entry.name, "format": "dicom"}
                self._datastore.objects[entry.name] = ImageLabelModel(image=DataModel(info=info, ext=""))
                invalidate += 1
        return invalidate

    # -- images ---------------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Check and store an image (NIfTI/NRRD file or DICOM series folder) under ``image_id``."""
        check_id(image_id)
        source = Path(image_filename)
        info = _checked_info(image_info)
        existing = self._datastore.objects.get(image_id)
        if existing is not None and existing.labels:
            raise ConflictError(
                f"image {image_id!r} already exists with labels ({', '.join(sorted(existing.labels))}); "
                "upload under a new id or remove it first"
            )
        if source.is_dir():
            load_image(source)  # a readable single DICOM series
            ext = ""
        else:
            ext = suffix_of(source)
            if ext not in IMAGE_SUFFIXES:
                raise UnprocessableError(f"image {source.name}: not a NIfTI/NRRD file")
            load_image(source)  # reads every voxel: truncated or corrupt files fail here
        dest = self.root / f"{image_id}{ext}"
        staged = Path(tempfile.mkdtemp(prefix="image-", dir=self._staging())) / dest.name
        try:
            if source.is_dir():
                shutil.copytree(source, staged)
            else:
                shutil.copyfile(source, staged)
            with file_lock(self._lock_file):  # the lock file MONAI Label's own datastore code takes
                self._remove_image_files(image_id)
                os.replace(staged, dest)
                info.update(ts=int(time.time()), name=dest.name)
                if not ext:
                    info["format"] = "dicom"
                self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=ext))
                self._update_datastore_file(lock=False)
        finally:
            shutil.rmtree(staged.parent, ignore_errors=True)
        log.info("added image %s (%s)", image_id, dest.name)
        return image_id

    def _remove_image_files(self, image_id: str) -> None:
        """Other representations of ``image_id`` (another suffix, or a DICOM folder) that a new upload replaces."""
        for suffix in ("", *IMAGE_SUFFIXES):
            path = self.root / f"{image_id}{suffix}"
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def remove_image(self, image_id: str) -> None:
        self.image_file(image_id)
        super().remove_image(image_id)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        self.image_file(image_id)
        super().update_image_info(image_id, _checked_info(info))

    # -- labels ---------------------------------------------------------------------------------------------------
    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Check a label against its image (grid, values 0..7) and store it as NIfTI under ``label_tag``."""
        image = self.image_file(image_id)
        tag = check_tag(label_tag or "final")
        info = _checked_info(label_info)
        label = load_label_for(image, Path(label_filename))
        _, affine = image_geometry(image)
        label_dir = Path(self._datastore.label_path(tag))
        label_dir.mkdir(parents=True, exist_ok=True)
        dest = label_dir / f"{image_id}{LABEL_SUFFIX}"
        staged = self._staging() / f".label-{os.getpid()}-{time.monotonic_ns()}{LABEL_SUFFIX}"
        try:
            write_nifti(label, affine, staged, dtype=np.uint8)
            with file_lock(self._lock_file):  # the lock file MONAI Label's own datastore code takes
                for suffix in (".nii", ".nrrd", ".seg.nrrd"):
                    (label_dir / f"{image_id}{suffix}").unlink(missing_ok=True)
                os.replace(staged, dest)
                obj = self._datastore.objects[image_id]
                info.update(ts=int(time.time()), name=dest.name)
                obj.labels[tag] = DataModel(info=info, ext=LABEL_SUFFIX)
                self._update_datastore_file(lock=False)
        finally:
            staged.unlink(missing_ok=True)
        log.info("saved %s label for %s", tag, image_id)
        return image_id

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_tag(label_tag)
        self.image_file(label_id)
        super().remove_label(label_id, label_tag)
        # stock MONAI Label refreshes its index only without auto-reload (else when the file watcher fires): refresh
        # now, so a listing right after the DELETE no longer shows the label
        self.refresh()

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        check_tag(label_tag)
        self.image_file(label_id)
        super().update_label_info(label_id, label_tag, _checked_info(info))

    def final_cases(self) -> list[tuple[str, Path, Path]]:
        """(id, image, final label) of every corrected case, for fine-tuning and export."""
        self._init_from_datastore_file()
        out = []
        for image_id, obj in sorted(self._datastore.objects.items()):
            if "final" in obj.labels and id_problem(image_id) is None:
                out.append((image_id, self.image_file(image_id), Path(self.get_label_uri(image_id, "final"))))
        return out


def _checked_info(info: Any) -> dict[str, Any]:
    """Client-supplied info/params: a JSON object of bounded size."""
    if info is None:
        return {}
    if not isinstance(info, dict):
        raise BadRequestError(f"params must be a JSON object, got {type(info).__name__}")
    try:
        text = json.dumps(info, default=str)
    except (TypeError, ValueError) as exc:
        raise BadRequestError(f"params cannot be stored as JSON ({exc})") from exc
    if len(text) > MAX_INFO_BYTES:
        raise BadRequestError(f"params are {len(text)} bytes of JSON; at most {MAX_INFO_BYTES} allowed")
    return json.loads(text)
