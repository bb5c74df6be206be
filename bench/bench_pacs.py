"""The PACS round trip's own costs, measured with a real Orthanc (DICOMweb plugin) on this machine.

Per volume size (synthetic phantom, one MR series): storing the series in Orthanc (REST ``POST /instances``), the
app's datastore fetching it (WADO-RS, staged, checked), writing the DICOM SEG of the phantom's label map
(pydicom-seg), storing it (STOW-RS) and decoding it back onto the series' grid, with the decoded map compared to
the label voxel by voxel, and the SEG's size. The model is not run (bench_infer measures inference). Writes
``bench/results/pacs.md`` and ``pacs.json`` (or ``--out``). Measured first by the PACS work's author (2026-12-03, loaded
2-core machine); committed by the lead.

    python bench/bench_pacs.py                    # 64³ and 128³, 3 repeats
    python bench/bench_pacs.py --sizes 32         # smoke run
"""

from __future__ import annotations

import argparse
import io
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from apps.fetal_brain import orthanc
from apps.fetal_brain.lib.dicom_seg import label_to_seg, seg_to_label
from apps.fetal_brain.lib.dicomweb_store import PacsDatastore
from fetalseg.data.dicom_series import write_dicom_series
from fetalseg.data.io import read_dicom_series
from fetalseg.data.phantom import generate_phantom, site_profiles
from fetalseg.plumbing import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).parent / "results"


def one(pacs: orthanc.Orthanc, work: Path, size: int, seed: int) -> dict[str, float]:
    import pydicom

    case = generate_phantom(shape=(size,) * 3, ga_weeks=28.0, profile=site_profiles(1)[0], seed=seed)
    files = write_dicom_series(case.image, case.affine, work / f"s{size}-{seed}", patient_id=f"B{seed}")
    uid = str(pydicom.dcmread(str(files[0]), stop_before_pixels=True).SeriesInstanceUID)
    t = time.perf_counter()
    pacs.store(files)
    store_s = time.perf_counter() - t
    datastore = PacsDatastore(pacs.dicomweb_url, work / f"cache{size}-{seed}", credentials=pacs.auth)
    t = time.perf_counter()
    folder = datastore.image_file(uid)
    fetch_s = time.perf_counter() - t
    affine = read_dicom_series(folder).affine
    t = time.perf_counter()
    seg = label_to_seg(case.label, affine, folder, tag="final", algorithm="bench")
    write_s = time.perf_counter() - t
    t = time.perf_counter()
    datastore.client.store_instances([seg])
    stow_s = time.perf_counter() - t
    buf = io.BytesIO()
    seg.save_as(buf, write_like_original=False)
    t = time.perf_counter()
    decoded, _ = seg_to_label(pydicom.dcmread(io.BytesIO(buf.getvalue())), folder)
    read_s = time.perf_counter() - t
    return {
        "store_series_s": store_s,
        "fetch_series_s": fetch_s,
        "seg_write_s": write_s,
        "seg_stow_s": stow_s,
        "seg_read_s": read_s,
        "seg_mb": len(buf.getvalue()) / 1e6,
        "equal": float(np.array_equal(decoded, case.label)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "pacs.md", help="the table; the JSON goes beside it")
    args = parser.parse_args(argv)
    reason = orthanc.missing()
    if reason:
        print(f"bench_pacs needs Orthanc: {reason}", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        pacs = orthanc.start(Path(tmp) / "orthanc")
        try:
            for size in args.sizes:
                runs = [one(pacs, Path(tmp), size, seed) for seed in range(args.repeats)]
                row = {"size": size, "repeats": args.repeats}
                for key in runs[0]:
                    row[key] = statistics.median(r[key] for r in runs)
                row["equal"] = all(r["equal"] == 1.0 for r in runs)
                rows.append(row)
        finally:
            pacs.stop()
    header = (
        "| size | store series (REST) s | fetch series (WADO) s | SEG write s | SEG STOW s | SEG read s | SEG MB "
        "| SEG == label |"
    )
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['size']}³ | {r['store_series_s']:.2f} | {r['fetch_series_s']:.2f} | {r['seg_write_s']:.2f} | "
            f"{r['seg_stow_s']:.2f} | {r['seg_read_s']:.2f} | {r['seg_mb']:.2f} | {'yes' if r['equal'] else 'NO'} |"
        )
    table = "\n".join(lines)
    print(table)
    meta = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "orthanc": str(orthanc.orthanc_binary()),
        "note": "medians of the repeats; one Orthanc for the whole run; phantom label maps (7 tissues)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), {"meta": meta, "rows": rows}, indent=2)
    atomic_write_text(
        args.out,
        f"# PACS round trip costs (bench/bench_pacs.py)\n\n{meta['when']}, {meta['machine']}; {meta['note']}.\n\n"
        f"{table}\n",
    )
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
