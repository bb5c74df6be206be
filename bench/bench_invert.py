"""Inverting a prediction to the input's grid: MONAI's ``Invertd`` vs the index-array path of ``Segmenter``.

``Segmenter.to_input_space`` used to run MONAI's ``Invertd`` (``affine_grid`` + ``grid_sample`` over every input
voxel); it now gathers the label map with three per-axis index arrays computed with MONAI's own arithmetic
(``fetalseg.inference._nearest_inverse``). This script times both on FeTA-size inputs (256³ at 0.5 mm, RAS and a
flipped/permuted orientation), interleaved in one run, and checks that both give the same labels voxel for voxel.
Writes ``bench/results/invert.md``.

    python bench/bench_invert.py               # 256³, 3 repeats
    python bench/bench_invert.py --size 64     # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fetalseg.bundle import Bundle
from fetalseg.data.io import write_nifti
from fetalseg.inference import Segmenter, _nearest_inverse

RESULTS = Path(__file__).parent / "results"


def geometries(size: int, fov_mm: float) -> dict[str, np.ndarray]:
    s = fov_mm / size
    ras = np.diag([s, s, s, 1.0])
    ras[:3, 3] = -fov_mm / 2
    permuted = np.array([[0, 0, s, -fov_mm / 2], [-s, 0, 0, fov_mm / 2], [0, -s * 1.2, 0, 70.0], [0, 0, 0, 1]])
    return {"RAS": ras, "flipped+permuted, anisotropic": permuted}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--fov-mm", type=float, default=128.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "invert.md")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    bundle = Bundle("common")
    segmenter = Segmenter(bundle.network(), bundle=bundle)
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-invert-") as tmp:
        for name, affine in geometries(args.size, args.fov_mm).items():
            image = rng.random((args.size,) * 3, dtype=np.float32)
            data = segmenter.preprocess(write_nifti(image, affine, Path(tmp) / "img.nii.gz"))
            pred = torch.randint(0, 8, (1, *data["image"].shape[1:]), dtype=torch.uint8)
            monai_s, index_s, equal = [], [], True
            for _ in range(args.repeats):
                t = time.perf_counter()
                reference = segmenter._invert_with_monai(data, pred)
                monai_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                fast = _nearest_inverse(data["image"], pred)
                index_s.append(time.perf_counter() - t)
                equal = equal and fast is not None and np.array_equal(fast, reference)
            rows.append(
                (name, list(data["image"].shape[1:]), statistics.median(monai_s), statistics.median(index_s), equal)
            )
    load_after = os.getloadavg()
    lines = [
        "# Inversion to the input grid: MONAI Invertd vs index arrays",
        "",
        f"Input {args.size}³ at {args.fov_mm / args.size:.2f} mm, bundle `common` (model grid pixdim "
        f"{list(bundle.pixdim)}), random labels on the model grid, {args.repeats} interleaved repeats, medians. "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (the machine is shared: compare the ratio).",
        "",
        "| input orientation | model grid | MONAI Invertd s | index arrays s | speed-up | identical labels |",
        "|---|---|---|---|---|---|",
    ]
    for name, grid, slow, fast, equal in rows:
        lines.append(f"| {name} | {grid} | {slow:.3f} | {fast:.3f} | {slow / fast:.0f}× | {'yes' if equal else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0 if all(r[-1] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
