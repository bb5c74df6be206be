"""MONAI Label /infer end-to-end vs the bare model's sliding window, on a FeTA-size volume (256³ at 0.5 mm).

One run, one machine, interleaved measurements: for each sliding-window setting (ROI, overlap) and repeat,
1. the bare model: the network's sliding window alone on the pre-processed volume (``Segmenter.logits``);
2. in-process segmentation: load, pre-process, sliding window, inversion to the input grid (``Segmenter.segment``);
3. ``POST /infer`` on the real server (this app behind its front, in a subprocess): everything a client waits for,
   including the NIfTI result on the input grid and the HTTP transfer, twice: *cold* (the file's modification time
   is changed first, so the server has prepared nothing) and *after next case* (``POST /activelearning/random``
   first, which has the server pre-process the case in the background, as when a radiologist fetches the next
   case and then runs the model; the wait for that preparation is not timed).
Reports medians, the ratios /infer ÷ sliding window (goal ≤ 1.25) and /infer ÷ in-process, peak server RSS,
``GET /info/`` latency while an inference runs, and Dice against the phantom's truth (meaningful only with a
trained ``--model-path``; otherwise agreement with the default setting is shown). Prints a Markdown table and
writes ``bench/results/infer.md``.

    python bench/bench_infer.py                      # 256³ phantom, default bundle
    python bench/bench_infer.py --size 64 --repeats 1 --variant tiny   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import psutil
import requests
import torch

from apps.fetal_brain import launcher
from apps.fetal_brain.lib.config import MODEL_NAME, AppConfig
from apps.fetal_brain.lib.model_store import ModelStore
from fetalseg.data.io import write_nifti
from fetalseg.data.phantom import generate_phantom, site_profiles
from fetalseg.inference import Segmenter
from fetalseg.labels import foreground_labels
from fetalseg.metrics import dice_per_label, nanmean

RESULTS = Path(__file__).parent / "results"
IMAGE_ID = "feta"


class RssSampler:
    """Peak resident memory of a process and its children, sampled in a thread (children re-listed every ~2 s:
    walking /proc on every sample would slow the benchmark process itself)."""

    def __init__(self, pid: int, *, interval_s: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def current(self, children: list[psutil.Process] | None = None) -> int:
        total = 0
        for p in [self.process, *(self.process.children(recursive=True) if children is None else children)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        children: list[psutil.Process] = []
        ticks = 0
        while not self._stop.is_set():
            if ticks % 20 == 0:
                children = self.process.children(recursive=True)
            self.peak = max(self.peak, self.current(children))
            ticks += 1
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def infer_http(url: str, *, roi: int | None, overlap: float | None) -> tuple[float, np.ndarray]:
    params: dict[str, Any] = {}
    if roi is not None:
        params["roi_size"] = roi
    if overlap is not None:
        params["sw_overlap"] = overlap
    start = time.perf_counter()
    response = requests.post(
        f"{url}/infer/{MODEL_NAME}",
        params={"image": IMAGE_ID, "output": "image"},
        data={"params": json.dumps(params)},
        timeout=1800,
    )
    elapsed = time.perf_counter() - start
    response.raise_for_status()
    return elapsed, np.asarray(_decode(response.content).dataobj)


def _decode(content: bytes) -> nib.Nifti1Image:
    import gzip

    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(raw)


def touch(path: Path) -> None:
    """Give ``path`` a new modification time: to the server a file version it has not prepared (a cold /infer)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def next_case(url: str, *, timeout_s: float = 600) -> None:
    """``POST /activelearning/random`` (the phantom is the only case) and wait until the server has prepared it."""
    response = requests.post(f"{url}/activelearning/random", json={}, timeout=timeout_s)
    response.raise_for_status()
    if response.json().get("id") != IMAGE_ID:
        raise RuntimeError(f"next case should be {IMAGE_ID!r}, got {response.text}")
    deadline = time.monotonic() + timeout_s
    while requests.get(f"{url}/info/", timeout=60).json()["prepared_inputs"]["pending"]:
        if time.monotonic() > deadline:
            raise TimeoutError("the next case was not prepared in time")
        time.sleep(0.02)


def info_latency_during_infer(url: str) -> tuple[float, float, int]:
    """(median, max) seconds of GET /info/ while one default /infer runs, and how many answers came."""
    done = threading.Event()

    def run() -> None:
        try:
            infer_http(url, roi=None, overlap=None)
        finally:
            done.set()

    worker = threading.Thread(target=run)
    worker.start()
    latencies = []
    while not done.is_set():
        start = time.perf_counter()
        info = requests.get(f"{url}/info/", timeout=600).json()
        if info["inference"]["running"]:
            latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    worker.join()
    if not latencies:
        return float("nan"), float("nan"), 0
    return statistics.median(latencies), max(latencies), len(latencies)


def mean_dice(pred: np.ndarray, truth: np.ndarray) -> float:
    values = [lab.value for lab in foreground_labels()]
    return nanmean(dice_per_label(pred, truth, values).values())


def quick_train(config: AppConfig, *, minutes: float, work: Path, out: Path) -> float:
    """Train the bundle's network on a small synthetic site for ``minutes``; save it to ``out``; return val Dice."""
    from fetalseg.bundle import save_checkpoint
    from fetalseg.data.federation import write_federation
    from fetalseg.data.loaders import load_dataset, split_cases
    from fetalseg.training import fit

    sites = write_federation(work / "train_data", n_sites=1, cases_per_site=8, shape=(64, 64, 64), seed=1)
    train, val = split_cases(load_dataset(sites[0]), val_fraction=0.25, seed=0)
    model, result = fit(
        config.bundle("train"), train, val, max_epochs=100000, time_budget_s=minutes * 60, val_interval=10, seed=0
    )
    save_checkpoint(model.cpu(), out, origin="bench-quick-train", val_mean_dice=result.best_mean_dice)
    return float(result.best_mean_dice)


def fmt(x: float, digits: int = 2) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256, help="phantom voxels per axis (256 = FeTA size at 0.5 mm)")
    ap.add_argument("--fov-mm", type=float, default=128.0, help="field of view (128 mm / 256 voxels = 0.5 mm)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per setting (after one warm-up)")
    ap.add_argument("--variant", default=None, help="bundle variant (e.g. tiny for a smoke run, feta)")
    ap.add_argument("--model-path", type=Path, help="trained checkpoint (default: untrained network)")
    ap.add_argument(
        "--train-minutes",
        type=float,
        default=0.0,
        help="without --model-path: first train the bundle's network this long on 64³ phantoms (for Dice columns)",
    )
    ap.add_argument("--rois", default="", help="comma-separated ROI sizes to compare (default: bundle, +16, +32)")
    ap.add_argument("--overlaps", default="0,0.25,0.5", help="comma-separated overlaps to compare")
    ap.add_argument("--out", type=Path, default=RESULTS / "infer.md")
    args = ap.parse_args(argv)
    if args.size < 16 or args.repeats < 1:
        ap.error("--size must be >= 16 and --repeats >= 1")

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench-infer-"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    """The benchmark in the scratch folder ``work``."""
    load_before = os.getloadavg()
    studies = work / "studies"
    t = time.perf_counter()
    phantom = generate_phantom(
        shape=(args.size,) * 3, ga_weeks=28.0, profile=site_profiles(1)[0], seed=0, fov_mm=args.fov_mm
    )
    image_path = write_nifti(phantom.image, phantom.affine, studies / f"{IMAGE_ID}.nii.gz", dtype=np.float32)
    synth_s = time.perf_counter() - t
    spacing = float(np.sqrt((phantom.affine[:3, :3] ** 2).sum(0)).mean())

    model_path = work / "model" / "model.pt"
    conf = [("model_path", str(model_path))] + ([("variant", args.variant)] if args.variant else [])
    config = AppConfig.from_conf(dict(conf), env={})
    train_note = ""
    if args.model_path:
        model_path.parent.mkdir(parents=True)
        model_path.write_bytes(args.model_path.read_bytes())
    elif args.train_minutes > 0:
        dice = quick_train(config, minutes=args.train_minutes, work=work, out=model_path)
        train_note = f" (trained {args.train_minutes:g} min on 64³ phantoms here, validation Dice {dice:.3f})"
    common = config.bundle("inference")  # the sliding-window defaults live in inference.json
    store = ModelStore(model_path, bundle=config.bundle("inference"))
    network = store.current().network
    trained = store.describe()["trained"]

    default_roi, default_overlap = int(common.get("sw_roi_size")[0]), float(common.get("sw_overlap"))
    rois = [int(r) for r in args.rois.split(",") if r] or [default_roi, default_roi + 16, default_roi + 32]
    overlaps = [float(o) for o in args.overlaps.split(",") if o]
    settings = [(default_roi, default_overlap)]
    settings += [(r, o) for r in rois for o in overlaps if (r, o) != (default_roi, default_overlap)]

    server = launcher.start(studies, workdir=work, conf=conf, timeout_s=300)
    rows = []
    try:
        sampler_pid = server.process.pid
        idle_rss = RssSampler(sampler_pid).current()
        with RssSampler(sampler_pid) as rss:
            reference = None
            for roi, overlap in settings:
                segmenter = Segmenter(
                    network, bundle=config.bundle("inference", sw_roi_size=[roi] * 3, sw_overlap=overlap)
                )
                data = segmenter.preprocess(str(image_path))
                segmenter.logits(data)  # warm-up of this window size
                infer_http(server.url, roi=roi, overlap=overlap)
                sw, local, http, prefetched = [], [], [], []
                label = None
                same = True
                for _ in range(args.repeats):
                    t = time.perf_counter()
                    segmenter.logits(data)
                    sw.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    segmenter.segment(str(image_path))
                    local.append(time.perf_counter() - t)
                    touch(image_path)  # a file version the server has not seen: nothing prepared
                    seconds, label = infer_http(server.url, roi=roi, overlap=overlap)
                    http.append(seconds)
                    touch(image_path)
                    next_case(server.url)  # the radiologist's "next case": the server prepares it meanwhile
                    seconds, prefetched_label = infer_http(server.url, roi=roi, overlap=overlap)
                    prefetched.append(seconds)
                    same &= bool(np.array_equal(prefetched_label, label))
                if reference is None:
                    reference = label
                rows.append(
                    {
                        "roi": roi,
                        "overlap": overlap,
                        "grid": list(data["image"].shape[1:]),
                        "sw_s": statistics.median(sw),
                        "local_s": statistics.median(local),
                        "infer_s": statistics.median(http),
                        "infer_prefetched_s": statistics.median(prefetched),
                        "prefetched_same_labels": same,
                        "dice_truth": mean_dice(label, phantom.label) if trained else float("nan"),
                        "agreement": mean_dice(label, reference),
                        "shape_ok": tuple(label.shape) == tuple(phantom.image.shape),
                    }
                )
            median_info, max_info, n_info = info_latency_during_infer(server.url)
        peak_rss = rss.peak
    finally:
        server.stop()

    default = rows[0]
    load_after = os.getloadavg()
    lines = [
        "# /infer benchmark (MONAI Label app)",
        "",
        f"Volume {args.size}³ at {spacing:.2f} mm (synthetic FeTA phantom), model grid {default['grid']} "
        f"(bundle pixdim {list(common.pixdim)}), {'trained' if trained else 'untrained'} network{train_note}, "
        f"{args.repeats} repeats, medians. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (other work on the machine inflates times).",
        "",
        "| measure | value |",
        "|---|---|",
        f"| /infer end-to-end, cold: a file the server has not seen (default ROI {default['roi']}, overlap "
        f"{default['overlap']}) | {fmt(default['infer_s'])} s |",
        f"| /infer end-to-end after 'next case' (the server prepared the case in the background) "
        f"| {fmt(default['infer_prefetched_s'])} s |",
        f"| bare model sliding window | {fmt(default['sw_s'])} s |",
        f"| **ratio /infer ÷ sliding window, cold** (goal ≤ 1.25) | **{fmt(default['infer_s'] / default['sw_s'])}** |",
        f"| **ratio /infer ÷ sliding window, after next case** (goal ≤ 1.25) "
        f"| **{fmt(default['infer_prefetched_s'] / default['sw_s'])}** |",
        f"| same labels cold and prepared (every setting, every repeat) "
        f"| {'yes' if all(r['prefetched_same_labels'] for r in rows) else 'NO'} |",
        f"| in-process segmentation (load + pre + window + inversion) | {fmt(default['local_s'])} s |",
        f"| ratio /infer ÷ in-process segmentation (server overhead) "
        f"| {fmt(default['infer_s'] / default['local_s'])} |",
        f"| server RSS idle / peak | {idle_rss / 2**30:.2f} / {peak_rss / 2**30:.2f} GiB |",
        f"| GET /info/ during /infer: median / max ({n_info} answers) | {fmt(median_info, 3)} / {fmt(max_info, 3)} s |",
        f"| result on the input grid ({args.size}³) | {'yes' if all(r['shape_ok'] for r in rows) else 'NO'} |",
        f"| phantom synthesis (not timed above) | {synth_s:.1f} s |",
        "",
        "Time vs sliding-window ROI and overlap (agreement = mean Dice with the default setting's labels;"
        " Dice vs truth needs --model-path or --train-minutes):",
        "",
        "| ROI | overlap | sliding window s | in-process s | /infer cold s | ÷ window | /infer after next case s "
        "| ÷ window | Dice vs truth | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['roi']} | {r['overlap']} | {fmt(r['sw_s'])} | {fmt(r['local_s'])} | {fmt(r['infer_s'])} | "
            f"{fmt(r['infer_s'] / r['sw_s'])} | {fmt(r['infer_prefetched_s'])} | "
            f"{fmt(r['infer_prefetched_s'] / r['sw_s'])} | {fmt(r['dice_truth'], 3)} | {fmt(r['agreement'], 3)} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "peak_rss": peak_rss}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
