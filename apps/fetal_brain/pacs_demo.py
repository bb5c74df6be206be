"""``fetal-fl app pacs-demo``: the PACS round trip on this machine, with a real Orthanc and synthetic cases.

What it does: starts a private Orthanc (DICOMweb plugin, 127.0.0.1, auth on; :mod:`apps.fetal_brain.orthanc`),
stores synthetic fetal brain cases in it as DICOM MR series, writes the PACS credentials to a 0600 file and starts
this app with ``--studies <Orthanc>/dicom-web`` reading them from that file. Then either ``--check`` (one round:
next case, inference stored back as DICOM SEG, a correction stored back, printed as a table) or it waits until
Ctrl-C so a user can connect the Slicer module (or any DICOMweb viewer, to the Orthanc URL) and try it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from apps.fetal_brain import orthanc
from apps.fetal_brain.launcher import start
from fetalseg.data.dicom_series import write_dicom_series
from fetalseg.data.io import write_nifti
from fetalseg.data.phantom import generate_phantom, site_profiles

MODEL = "fetal_brain_seg"


def store_cases(pacs: orthanc.Orthanc, folder: Path, n: int, *, shape: int, seed: int = 0) -> dict[str, Any]:
    """``n`` phantoms (one patient and study each) stored through Orthanc's REST API; SeriesInstanceUID -> case."""
    import pydicom

    cases = {}
    for i in range(n):
        case = generate_phantom(
            shape=(shape,) * 3, ga_weeks=22.0 + (i * 3.7) % 12, profile=site_profiles(1)[0], seed=seed + i
        )
        files = write_dicom_series(case.image, case.affine, folder / f"case{i:02d}", patient_id=f"DEMO{i:03d}")
        pacs.store(files)
        uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
        cases[uid] = case
    return cases


def check_round(url: str, cases: dict[str, Any], workdir: Path, pacs: orthanc.Orthanc) -> list[tuple[str, str]]:
    """Next case, inference kept as DICOM SEG, the phantom's label saved as the correction; rows for a table."""
    rows = []
    nxt = requests.post(f"{url}/activelearning/random", json={}, timeout=120)
    nxt.raise_for_status()
    uid = nxt.json()["id"]
    rows.append(("next case (SeriesInstanceUID)", uid))
    t0 = time.perf_counter()
    infer = requests.post(
        f"{url}/infer/{MODEL}?image={uid}&output=json", data={"params": json.dumps({"save_label": True})}, timeout=600
    )
    infer.raise_for_status()
    rows.append(("inference + DICOM SEG stored (s)", f"{time.perf_counter() - t0:.1f}"))
    case = cases[uid]
    label = write_nifti(case.label, case.affine, workdir / "correction.nii.gz", dtype="uint8")
    with open(label, "rb") as fh:
        saved = requests.put(
            f"{url}/datastore/label?image={uid}&tag=final", files={"label": ("correction.nii.gz", fh)}, timeout=300
        )
    saved.raise_for_status()
    segs = [s for s in pacs.series() if s.get("MainDicomTags", {}).get("Modality") == "SEG"]
    rows.append(("DICOM SEG series in the PACS", str(len(segs))))
    rows.append(
        ("their descriptions", "; ".join(sorted(s["MainDicomTags"].get("SeriesDescription", "") for s in segs)))
    )
    return rows


def run(args: argparse.Namespace) -> int:
    keep = args.workdir is not None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fetal-pacs-demo-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    reason = orthanc.missing()
    if reason:
        print(f"pacs-demo needs Orthanc: {reason}", file=sys.stderr)
        return 2
    pacs = orthanc.start(workdir / "orthanc")
    app = None
    try:
        cases = store_cases(pacs, workdir / "dicom", args.cases, shape=args.shape)
        creds = orthanc.credentials_file(pacs, workdir / "pacs_credentials.json")
        conf = [
            ("variant", args.variant),
            ("model_path", str(workdir / "model" / "model.pt")),
            ("pacs_credentials", str(creds)),
            ("pacs_cache", str(workdir / "pacs_cache")),
        ]
        app = start(pacs.dicomweb_url, workdir=workdir / "app", conf=conf, timeout_s=300)
        print(f"Orthanc (PACS):  {pacs.url}  DICOMweb {pacs.dicomweb_url}  credentials in {creds}")
        print(f"fetal brain app: {app.url}  (--studies {pacs.dicomweb_url}); {len(cases)} synthetic MR series")
        if args.check:
            rows = check_round(app.url, cases, workdir, pacs)
            width = max(len(k) for k, _ in rows)
            for key, value in rows:
                print(f"{key:<{width}}  {value}")
            return 0
        print("Connect the FetalBrainSeg Slicer module to the app URL; Ctrl-C stops both servers.")
        while app.process.poll() is None and pacs.running():
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if app is not None:
            app.stop()
        pacs.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def register(sub: Any) -> None:
    """Add ``fetal-fl app pacs-demo``."""
    demo = sub.add_parser(
        "pacs-demo",
        help="the PACS round trip on this machine: a private Orthanc with synthetic cases, this app reading it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--workdir", help="keep everything here (default: a temporary folder, removed at the end)")
    demo.add_argument("--cases", type=int, default=3, help="synthetic cases to store (default 3)")
    demo.add_argument("--shape", type=int, default=32, help="phantom size per axis (default 32, the tiny variant)")
    demo.add_argument("--variant", default="tiny", help="bundle variant the app serves (default tiny)")
    demo.add_argument("--check", action="store_true", help="run one round trip, print it, stop (no waiting)")
    demo.set_defaults(handler=run)
