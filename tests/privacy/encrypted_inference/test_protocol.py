"""Model owner, dealer and data owner as real processes on 127.0.0.1 (tiny bundle, 16³ patch, one window).

Checks: ≥ 99.9 % voxel agreement with plaintext inference of the same weights; labels 0..7 on the input's grid,
written only by the data owner; neither party's secret (scan / weights) in what the other received (the audit);
and the failures: another model version, an image the network cannot take, a volume over the server's limit, a
server that goes away mid-protocol -> a clear error, no output file, no hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fetalseg.bundle import Bundle, load_checkpoint, save_checkpoint
from fetalseg.data.io import write_nifti
from fetalseg.data.phantom import generate_phantom, site_profiles
from fetalseg.inference import Segmenter
from fetalseg.plumbing import free_port
from privacy.encrypted_inference import audit

OVERRIDES = ["--variant", "tiny", "--set", "patch_size=[16,16,16]"]
BUNDLE = {"variant": "tiny", "overrides": {"patch_size": [16, 16, 16]}}
AFFINE = np.diag([-4.0, 4.0, 4.0, 1.0])  # 4 mm (the tiny grid), L-R flipped: the inverse must undo it
TIMEOUT = 60


def _start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "privacy.encrypted_inference", *args],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # its session children go with it
    )


def _wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process exited: {log.read_text()}")
        time.sleep(0.5)
    raise AssertionError(f"{text!r} not in {log}: {log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _segment_here(image: Path, port: int, out: Path, capsys, extra: list[str] = ()) -> tuple[int, str]:
    """The data owner's command in this process (no start-up cost): exit code and stderr."""
    from privacy.encrypted_inference.__main__ import main

    code = main(["segment", str(image), "--server", f"127.0.0.1:{port}", "--out", str(out), "--timeout", str(TIMEOUT),
                 *OVERRIDES, *extra])  # fmt: skip
    return code, capsys.readouterr().err


def _segment(
    image: Path, port: int, out: Path, env: dict | None = None, extra: list[str] = ()
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "privacy.encrypted_inference",
            "segment",
            str(image),
            "--server",
            f"127.0.0.1:{port}",
            "--out",
            str(out),
            "--timeout",
            str(TIMEOUT),
            *OVERRIDES,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("private_infer")
    torch.manual_seed(3)
    bundle = Bundle("common", **BUNDLE)
    net = bundle.network().eval()
    save_checkpoint(net, tmp / "model.pt")
    ph = generate_phantom(shape=(16, 16, 16), ga_weeks=30.0, profile=site_profiles(1, 2)[0], seed=2)
    image = write_nifti(ph.image, AFFINE, tmp / "scan.nii.gz")
    # the secrets each party's audit compares its received bytes with: the OTHER party's input
    pre = Segmenter(net, bundle=bundle).preprocess(image)["image"].as_tensor().numpy()
    np.save(tmp / "scan_secret.npy", pre)
    np.save(tmp / "weights_secret.npy", torch.cat([p.detach().flatten() for p in net.parameters()]).numpy())
    return tmp, bundle, image


@pytest.fixture(scope="module")
def server(case):
    tmp, _, _ = case
    port = free_port()
    env = {audit.ENV_OUT: str(tmp / "audit_model_owner.json"), audit.ENV_SECRET: str(tmp / "scan_secret.npy")}
    serve = _start(
        [
            "serve",
            "--weights",
            str(tmp / "model.pt"),
            "--port",
            str(port),
            "--max-voxels",
            str(20**3),
            "--timeout",
            str(TIMEOUT),
            *OVERRIDES,
        ],
        tmp / "serve.log",
        env,
    )
    dealer = None
    try:
        _wait_for(tmp / "serve.log", "listening", serve)
        dealer = _start(["dealer", "--server", f"127.0.0.1:{port}", "--timeout", str(TIMEOUT)], tmp / "dealer.log")
        _wait_for(tmp / "serve.log", "dealer connected", serve)
        yield port, serve, tmp / "serve.log"
    finally:
        for p in (dealer, serve):
            if p is not None:
                _stop(p)


def test_encrypted_segmentation_agrees_with_plaintext_and_leaks_neither_input(case, server):
    tmp, bundle, image = case
    out = tmp / "out" / "seg.nii.gz"
    env = {audit.ENV_OUT: str(tmp / "audit_data_owner.json"), audit.ENV_SECRET: str(tmp / "weights_secret.npy")}
    done = _segment(image, server[0], out, env, ["--stats-json", str(tmp / "stats.json")])
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Approximate" in done.stdout
    got = nib.load(out)
    net = bundle.network().eval()
    load_checkpoint(net, tmp / "model.pt")
    want = Segmenter(net, bundle=bundle).segment(image)
    label = np.asarray(got.dataobj)
    assert label.shape == want.label.shape == (16, 16, 16)
    assert np.allclose(got.affine, AFFINE)
    assert label.dtype == np.uint8 and label.max() <= 7
    agreement = float((label == want.label).mean())
    assert agreement >= 0.999, agreement
    assert len(np.unique(want.label)) > 1  # a real comparison, not all background

    for side in ("model_owner", "data_owner"):  # scan not in the model owner's bytes, weights not in the data owner's
        rep = __import__("json").loads((tmp / f"audit_{side}.json").read_text())
        assert rep["received_bytes"] > 1e6 and rep["elements_checked"] > 1e5 and rep["secret_values"] > 1000
        assert rep["hits"] <= 2, rep  # random ring elements: ~1e-9 expected; plaintext would give thousands
        assert rep["max_abs_correlation"] < 0.1, rep
    assert rep["revealed_result_bytes"] > 0  # the data owner did receive its logits (not compared: its result)
    stats = __import__("json").loads((tmp / "stats.json").read_text())
    assert stats["encrypted_weights"] is True and stats["windows"] == 1 and stats["crypten_bytes"] > 0


def test_mismatched_model_version_is_refused_before_any_traffic(case, server, capsys):
    tmp, _, image = case
    out = tmp / "mismatch.nii.gz"
    code, err = _segment_here(image, server[0], out, capsys, ["--set", "sw_overlap=0.5"])
    assert code == 2
    assert "model mismatch" in err
    assert not out.exists()


def test_volume_over_the_server_limit_is_refused(case, server, capsys):
    tmp, _, _ = case
    big = write_nifti(np.random.default_rng(0).random((24, 24, 24), dtype=np.float32), AFFINE, tmp / "big.nii.gz")
    code, err = _segment_here(big, server[0], tmp / "big_seg.nii.gz", capsys)
    assert code == 2 and "over this server's limit" in err
    assert not (tmp / "big_seg.nii.gz").exists()


@pytest.mark.parametrize("kind", ["two_channels", "not_an_image", "missing"])
def test_image_the_network_cannot_take(kind, tmp_path, capsys):
    bad = tmp_path / "bad.nii.gz"
    if kind == "two_channels":
        write_nifti(np.zeros((12, 12, 12, 2), np.float32), AFFINE, bad)
    elif kind == "not_an_image":
        bad.write_bytes(b"not a nifti file")
    code, err = _segment_here(bad, free_port(), tmp_path / "seg.nii.gz", capsys)  # fails before connecting
    assert code == 2
    assert {"two_channels": "one-channel 3D", "not_an_image": "cannot be read", "missing": "no such file"}[kind] in err
    assert not (tmp_path / "seg.nii.gz").exists()


def test_server_going_away_mid_protocol_fails_clearly(case, server, tmp_path):
    """Runs last: it takes the module's server down (the fixture's teardown copes)."""
    _, _, image = case
    port, serve, log = server
    out = tmp_path / "seg.nii.gz"
    before = log.read_text().count("rendezvous")
    client = subprocess.Popen(
        [sys.executable, "-m", "privacy.encrypted_inference", "segment", str(image), "--server",
         f"127.0.0.1:{port}", "--out", str(out), "--timeout", "30", *OVERRIDES],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while log.read_text().count("rendezvous") == before:  # wait until this client's session has started
        assert time.monotonic() < deadline and client.poll() is None, log.read_text()
        time.sleep(0.5)
    _stop(serve)  # the model owner and its session process go away
    stdout, stderr = client.communicate(timeout=240)
    assert client.returncode == 2, stdout + stderr
    assert "went away or timed out" in stderr
    assert not out.exists() and list(tmp_path.glob("*seg*")) == []
