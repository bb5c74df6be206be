"""Write synthetic multi-site federations on disk, one FeTA-style BIDS dataset per site.

Why on disk and in the real FeTA layout: every consumer (FeTA loaders, NVFlare clients, the MONAI Label datastore)
then reads synthetic and real data through the same code path, and a site folder is exactly what one hospital
would hold. Folders appear atomically (written to a hidden sibling, then renamed) so a crash never leaves a
half-written site that a later run could mistake for a complete one.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fetalseg import __version__
from fetalseg.data.io import write_nifti
from fetalseg.data.phantom import Phantom, SiteProfile, generate_phantom, site_profiles
from fetalseg.plumbing import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

BIDS_VERSION = "1.9.0"
PARTICIPANTS_COLUMNS = ("participant_id", "Pathology", "Gestational age", "site")
FEDERATION_FILE = "federation.json"


def subject_id(number: int) -> str:
    """FeTA subject id, e.g. ``sub-007``."""
    if not 0 <= number <= 999:
        raise ValueError(f"subject number must be 0..999 for a 3-digit id, got {number}")
    return f"sub-{number:03d}"


def case_paths(site_dir: Path, subject: str, rec_method: str) -> tuple[Path, Path]:
    """(T2w image, dseg label) paths of one subject in the FeTA BIDS layout."""
    anat = Path(site_dir) / subject / "anat"
    stem = f"{subject}_rec-{rec_method}"
    return anat / f"{stem}_T2w.nii.gz", anat / f"{stem}_dseg.nii.gz"


def _case_draw(profile: SiteProfile, seed: int, number: int) -> tuple[float, int]:
    """GA (0.1 wk, as written to participants.tsv) and phantom seed of one subject: depends on (seed, number)
    only, so a subject is the same whatever n_cases or first_subject."""
    rng = np.random.default_rng([int(seed), int(number)])
    ga = round(profile.sample_ga(rng), 1)
    return ga, int(rng.integers(0, 2**31 - 1))


def _write_case(site_dir: Path, subject: str, profile: SiteProfile, phantom: Phantom) -> None:
    image_path, label_path = case_paths(site_dir, subject, profile.rec_method)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(phantom.image, phantom.affine, image_path, dtype=np.float32)
    write_nifti(phantom.label, phantom.affine, label_path, dtype=np.uint8)


def _write_participants(site_dir: Path, rows: Sequence[tuple[str, float]], site_name: str) -> None:
    with open(site_dir / "participants.tsv", "w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(PARTICIPANTS_COLUMNS)
        for subject, ga in rows:
            writer.writerow((subject, "Neurotypical", f"{ga:.1f}", site_name))
    sidecar = {
        "participant_id": {"Description": "Subject identifier"},
        "Pathology": {"Description": "Neurotypical or Pathological (FeTA convention); phantoms are neurotypical"},
        "Gestational age": {"Description": "Gestational age at scan", "Units": "weeks"},
        "site": {"Description": "Name of the synthetic acquisition-site profile"},
    }
    _write_json(site_dir / "participants.json", sidecar)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def _dataset_description(profile: SiteProfile, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "Name": f"fetalseg synthetic fetal brain T2w phantoms, site {profile.name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "raw",
        "License": "CC0",
        "GeneratedBy": [
            {
                "Name": "fetalseg",
                "Version": __version__,
                "Description": "Synthetic phantoms from fetalseg.data.phantom.generate_phantom (not real subjects)",
                "Parameters": {**params, "profile": profile.to_dict()},
            }
        ],
    }


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _check_target(path: Path, *, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    if _is_nonempty_dir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")


def write_site(
    out_dir: Path,
    profile: SiteProfile,
    *,
    n_cases: int,
    shape: tuple[int, int, int],
    seed: int,
    first_subject: int = 1,
    fov_mm: float = 128.0,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write one site's FeTA-style BIDS dataset to ``out_dir`` and return it.

    Raises :class:`FileExistsError` if ``out_dir`` exists and is not empty, unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    if n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    numbers = range(first_subject, first_subject + n_cases)
    for number in (numbers[0], numbers[-1]):
        subject_id(number)  # validate the id range before doing any work
    _check_target(out_dir, overwrite=overwrite)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    rows: list[tuple[str, float]] = []
    with atomic_dir(out_dir) as tmp:  # a hidden sibling, renamed onto out_dir only if everything below succeeds
        for number in tqdm(numbers, desc=out_dir.name, unit="case", disable=not progress):
            subject = subject_id(number)
            ga, case_seed = _case_draw(profile, seed, number)
            phantom = generate_phantom(shape=shape, ga_weeks=ga, profile=profile, seed=case_seed, fov_mm=fov_mm)
            _write_case(tmp, subject, profile, phantom)
            rows.append((subject, ga))
        _write_participants(tmp, rows, profile.name)
        params = {
            "seed": int(seed),
            "n_cases": int(n_cases),
            "first_subject": int(first_subject),
            "shape": list(shape),
            "fov_mm": float(fov_mm),
        }
        _write_json(tmp / "dataset_description.json", _dataset_description(profile, params))
        _check_target(out_dir, overwrite=overwrite)  # re-check just before the swap: someone may have written
    log.info("wrote site %s (%d cases, profile %s) to %s", out_dir.name, n_cases, profile.name, out_dir)
    return out_dir


def site_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th site (0-based) of a federation, independent across sites."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_federation(
    out_dir: Path,
    *,
    n_sites: int = 3,
    cases_per_site: int = 8,
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    fov_mm: float = 128.0,
    progress: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``out_dir/site-1 .. site-N`` (one BIDS dataset each) and ``out_dir/federation.json``.

    Every target is checked before anything is written, so a refusal leaves the disk untouched.
    """
    out_dir = Path(out_dir)
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    profiles = site_profiles(n_sites, seed=seed)
    site_dirs = [out_dir / f"site-{i + 1}" for i in range(n_sites)]
    for d in site_dirs:
        _check_target(d, overwrite=overwrite)
    summary_path = out_dir / FEDERATION_FILE
    if summary_path.exists() and not overwrite:
        raise FileExistsError(f"{summary_path} exists; pass overwrite=True to replace the federation")

    sites = []
    for i, (profile, site_dir) in enumerate(zip(profiles, site_dirs)):
        s_seed = site_seed(seed, i)
        write_site(
            site_dir,
            profile,
            n_cases=cases_per_site,
            shape=shape,
            seed=s_seed,
            fov_mm=fov_mm,
            progress=progress,
            overwrite=overwrite,
        )
        sites.append({"folder": site_dir.name, "seed": s_seed, "n_cases": cases_per_site, "profile": profile.to_dict()})
    summary = {
        "generator": "fetalseg.data.federation.write_federation",
        "version": __version__,
        "seed": int(seed),
        "n_sites": int(n_sites),
        "cases_per_site": int(cases_per_site),
        "shape": [int(s) for s in shape],
        "fov_mm": float(fov_mm),
        "sites": sites,
    }
    atomic_write_json(summary_path, summary, indent=2)
    return site_dirs


def write_more_cases(
    federation_dir: Path,
    out_dir: Path,
    *,
    n_cases: int,
    progress: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``n_cases`` NEW subjects per site of an existing federation to ``out_dir/<site folder>``.

    Why: a held-out set larger than the federation's own test split, from the same sites (same profile, seed,
    shape and field of view, read from ``federation.json``) but never part of the federation, so no training or
    model selection can have seen it. Subjects are numbered after the federation's (``cases_per_site + 1`` on);
    since a subject depends only on (site seed, number), they are exactly the subjects a larger federation would
    have had.
    """
    federation_dir, out_dir = Path(federation_dir), Path(out_dir)
    summary = json.loads((federation_dir / FEDERATION_FILE).read_text())
    sites = summary["sites"]
    targets = [out_dir / s["folder"] for s in sites]
    if out_dir.resolve() == federation_dir.resolve():
        raise ValueError("write_more_cases writes to a separate folder, not into the federation itself")
    for d in targets:
        _check_target(d, overwrite=overwrite)
    shape = tuple(int(x) for x in summary["shape"])
    for site, target in zip(sites, targets):
        write_site(
            target,
            SiteProfile.from_dict(site["profile"]),
            n_cases=n_cases,
            shape=shape,  # type: ignore[arg-type]
            seed=int(site["seed"]),
            first_subject=int(site["n_cases"]) + 1,
            fov_mm=float(summary["fov_mm"]),
            progress=progress,
            overwrite=overwrite,
        )
    return targets
