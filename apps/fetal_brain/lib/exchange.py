"""Model exchange with federated training: install a global model, export the site's corrected cases.

The MONAI Label app and the NVFlare jobs never import each other (see the architecture notes); they meet through
two kinds of files, handled here:

* a checkpoint produced by an NVFlare job -> :func:`install_model` checks that it loads into the bundle's network
  and produces finite output, then publishes it as the served model, keeping its origin (job id, round);
* the corrected cases -> :func:`export_cases` writes ``images/`` + ``labels/`` (NIfTI) that
  :func:`fetalseg.data.loaders.load_dataset` reads, for the site's NVFlare client. The export stays on the site:
  corrected labels leave only as (filtered) model updates.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apps.fetal_brain.lib.errors import InputError, NotFoundError, UnprocessableError
from apps.fetal_brain.lib.model_store import ModelStore, file_sha256, load_into, read_checkpoint, utc_now
from apps.fetal_brain.lib.volumes import is_dicom_dir, load_image, load_label_for
from fetalseg.data.io import write_nifti
from fetalseg.data.loaders import load_dataset
from fetalseg.plumbing import atomic_dir

log = logging.getLogger(__name__)

# Preferred in this order: the bundle-format best model the project's NVFlare job writes (a file-name contract
# with nvflare_jobs/, which this app must not import), then NVFlare's own persistor files, then a bundle model.
CHECKPOINT_NAMES = ("fetal_brain_best.pt", "FL_global_model.pt", "best_FL_global_model.pt", "model.pt")
MANIFEST = "export_manifest.json"


def find_checkpoint(source: str | Path) -> Path:
    """The checkpoint file ``source`` names, or the one global model inside a finished job's folder."""
    source = Path(source).expanduser()
    if source.is_file():
        return source
    if not source.exists():
        raise NotFoundError(f"{source} does not exist")
    for name in CHECKPOINT_NAMES:
        found = sorted(source.rglob(name))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            listed = ", ".join(str(p) for p in found[:5])
            raise InputError(f"{source} holds {len(found)} files named {name} ({listed}); name the one to install")
    pts = sorted(source.rglob("*.pt"))
    if len(pts) == 1:
        return pts[0]
    raise NotFoundError(
        f"no checkpoint found in {source} (looked for {', '.join(CHECKPOINT_NAMES)} or a single *.pt file"
        + (f"; found {len(pts)} *.pt files, name one" if pts else "")
        + ")"
    )


def check_forward(network: torch.nn.Module, *, patch_size: tuple[int, ...], num_classes: int) -> None:
    """One forward pass on a deterministic random patch: right output shape, finite values."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((1, 1, *patch_size), generator=generator)
    network.eval()
    with torch.no_grad():
        y = network(x)
    if tuple(y.shape) != (1, num_classes, *patch_size):
        raise UnprocessableError(f"model output has shape {tuple(y.shape)}, expected {(1, num_classes, *patch_size)}")
    if not torch.isfinite(y).all():
        raise UnprocessableError("model produces NaN or infinite values; refusing to install it")


def check_grid(info: dict[str, Any], *, served: tuple[float, ...], allow: bool, source: str) -> None:
    """Refuse a checkpoint whose recorded training voxel size differs from the one this app resamples to."""
    overrides = info.get("bundle_overrides")
    pixdim = overrides.get("pixdim") if isinstance(overrides, dict) else None
    if pixdim is None:
        return
    trained = tuple(float(v) for v in (pixdim if isinstance(pixdim, list) else [pixdim] * 3))
    if len(trained) == len(served) and all(abs(a - b) < 1e-6 for a, b in zip(trained, served)):
        return
    message = (
        f"checkpoint {source} was trained at pixdim {list(trained)} but this app resamples to {list(served)}; "
        "serve it with the matching bundle settings (e.g. --conf variant / --conf pixdim)"
    )
    if not allow:
        raise UnprocessableError(message + ", or pass --allow-grid-mismatch")
    log.warning(message)


def install_model(
    source: str | Path,
    *,
    store: ModelStore,
    origin: str | None = None,
    job_id: str | None = None,
    fl_round: int | None = None,
    trust_pickle: bool = False,
    allow_grid_mismatch: bool = False,
) -> dict[str, Any]:
    """Check a (federated) checkpoint against the bundle and make it the served model; return its description.

    Origin facts come from the arguments, else from the checkpoint's own info (``origin``, ``job_id``,
    ``round``), else ``origin="federated"``. A model trained on another voxel grid (the checkpoint's recorded
    ``bundle_overrides`` pixdim) is refused unless ``allow_grid_mismatch``: its weights would load but segment
    badly. Nothing is replaced if any check fails.
    """
    path = find_checkpoint(source)
    state, info = read_checkpoint(path, trust_pickle=trust_pickle)
    check_grid(info, served=tuple(store.bundle.pixdim), allow=allow_grid_mismatch, source=path.name)
    network = store.untrained_network()
    load_into(network, state, source=path.name)
    bundle = store.bundle
    check_forward(network, patch_size=tuple(bundle.patch_size), num_classes=bundle.num_classes)
    carried = {k: v for k, v in info.items() if k not in {"published_at", "bundle_version", "train_conf"}}
    meta = info.get("meta_props")
    if "round" not in carried and isinstance(meta, dict) and isinstance(meta.get("current_round"), int):
        carried["round"] = meta["current_round"]  # NVFlare's persisted global model
    if origin:
        carried["origin"] = origin
    carried.setdefault("origin", "federated")
    if job_id:
        carried["job_id"] = job_id
    if fl_round is not None:
        carried["round"] = int(fl_round)
    described = store.publish(
        network,
        **carried,
        installed_from=str(path.resolve()),
        source_sha256=file_sha256(path),
        installed_at=utc_now(),
    )
    log.info("installed %s as the served model (%s)", path, described.get("origin"))
    return described


def export_cases(
    datastore: Any, out_dir: str | Path, *, site: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Write every corrected case as ``out_dir/images/<id>.nii.gz`` + ``out_dir/labels/<id>.nii.gz``.

    Each pair is checked (image readable, label on its grid with values 0..7); invalid pairs are listed in the
    manifest and left out. DICOM series are converted to NIfTI on their own grid. The folder appears atomically
    (written next to it, then renamed) and is read back with ``load_dataset`` before this returns.
    """
    out_dir = Path(out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InputError(f"{out_dir} exists and is not empty; pass overwrite to replace it", status=409)
    cases = datastore.final_cases()
    if not cases:
        raise NotFoundError("the datastore has no corrected cases (images with a 'final' label) to export")
    exported, skipped = [], []
    with atomic_dir(out_dir) as staging:  # written beside out_dir, renamed onto it only if every step succeeds
        (staging / "images").mkdir()
        (staging / "labels").mkdir()
        for image_id, image, label in cases:
            try:
                label_array = load_label_for(image, label)
                vol = load_image(image)
            except InputError as exc:
                skipped.append({"id": image_id, "problem": str(exc)})
                continue
            image_out = staging / "images" / f"{image_id}.nii.gz"
            if image.is_file() and image.name.endswith(".nii.gz"):
                shutil.copyfile(image, image_out)
            else:
                write_nifti(vol.array, vol.affine, image_out, dtype=np.float32 if is_dicom_dir(image) else None)
            write_nifti(label_array, vol.affine, staging / "labels" / f"{image_id}.nii.gz", dtype=np.uint8)
            exported.append(
                {"id": image_id, "source": image.name, "label_sha256": file_sha256(label), "image_format": "nifti"}
            )
        if not exported:
            raise UnprocessableError(f"none of the {len(cases)} corrected cases is valid: {skipped}")
        manifest = {
            "created": utc_now(),
            "site": site or out_dir.name,
            "studies": str(Path(datastore.root)),
            "cases": exported,
            "skipped": skipped,
            "layout": "images/ + labels/ (fetalseg.data.loaders.load_dataset)",
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        load_dataset(staging, site=site or out_dir.name)  # the consumer's reader accepts it, or nothing is replaced
    log.info("exported %d corrected cases to %s (%d skipped)", len(exported), out_dir, len(skipped))
    return {"out_dir": str(out_dir), "exported": len(exported), "skipped": skipped, "manifest": str(out_dir / MANIFEST)}
