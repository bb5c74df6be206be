"""The one home of the project's plumbing (fetalseg.plumbing) and its one checkpoint loader: one behaviour a test."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from fetalseg.bundle import load_checkpoint, load_checkpoint_file
from fetalseg.plumbing import (
    append_jsonl,
    atomic_dir,
    atomic_open,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    file_lock,
    free_port,
    lock_file_for,
)

REPO = Path(__file__).resolve().parents[2]


def test_concurrent_writers_of_one_target_never_collide(tmp_path):
    target = tmp_path / "state.bin"
    payloads = [bytes([i]) * 200_000 for i in range(6)]
    errors: list[BaseException] = []

    def write(payload: bytes) -> None:
        try:
            for _ in range(10):
                atomic_write_bytes(target, payload)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in payloads  # one writer's whole file, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]  # no temporary file left


def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_open(target) as fh:
        fh.write(b"half a new")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "label.nii.gz") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer crashed")
    with pytest.raises(TypeError):
        atomic_write_json(target, {"not json": object()})
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_path_keeps_the_extension_and_writes_land_whole(tmp_path):
    with atomic_path(tmp_path / "seg.nii.gz") as tmp:
        assert tmp.name.endswith("-seg.nii.gz") and tmp.parent == tmp_path  # libraries pick the format from it
        tmp.write_bytes(b"label")
    atomic_write_text(tmp_path / "a.txt", "é")
    atomic_write_json(tmp_path / "a.json", {"b": 1}, indent=2)
    assert (tmp_path / "seg.nii.gz").read_bytes() == b"label"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "é"
    assert json.loads((tmp_path / "a.json").read_text()) == {"b": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.txt", "seg.nii.gz"]


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    atomic_write_text(tmp_path / "atomic", "x")
    (tmp_path / "plain").write_text("x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode
    atomic_write_text(tmp_path / "secret", "x", perm=0o600)
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600


def test_atomic_dir_replaces_a_folder_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "site-1"
    with atomic_dir(target) as staging:
        (staging / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        (staging / "b").write_text("2")
        raise RuntimeError("half written")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as staging:
        (staging / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert [p.name for p in tmp_path.iterdir()] == ["site-1"]  # no .partial / .old sibling left


_APPENDER = """
import sys
from fetalseg.plumbing import append_jsonl
path, writer = sys.argv[1], sys.argv[2]
for i in range(40):
    append_jsonl(path, {"writer": writer, "i": i, "pad": writer * 20_000})  # lines far above PIPE_BUF
"""


def test_append_jsonl_from_several_processes_gives_whole_lines(tmp_path):
    path = tmp_path / "audit" / "updates.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(path), w], cwd=str(REPO)) for w in ("a", "b", "c")]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0]
    rows = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses: none interleaved
    assert len(rows) == 120
    for w in "abc":
        assert [r["i"] for r in rows if r["writer"] == w] == list(range(40))  # each writer's records in order
        assert all(r["pad"] == w * 20_000 for r in rows if r["writer"] == w)
    assert path.stat().st_mode & 0o777 == 0o640


def test_append_jsonl_refuses_to_create_when_told_not_to(tmp_path):
    with pytest.raises(FileNotFoundError):
        append_jsonl(tmp_path / "ledger.jsonl", {"type": "spend"}, create=False)
    assert list(tmp_path.iterdir()) == []


def test_file_lock_excludes_another_holder(tmp_path):
    lock = lock_file_for(tmp_path / "ledger.jsonl")
    assert lock.name == ".ledger.jsonl.lock"
    with file_lock(lock):
        other = file_lock(lock, timeout=0.2)
        with pytest.raises(TimeoutError):  # filelock.Timeout is a TimeoutError
            other.acquire()


def test_free_port_is_free_on_loopback():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_a_pickled_checkpoint_with_an_arbitrary_object_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    net = torch.nn.Linear(2, 2)
    torch.save({"model": net.state_dict(), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint_file(path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(net, path)
    assert not marker.exists()  # refused before the object was built: nothing ran


def test_nvflares_persisted_global_model_format_loads_without_an_allow_list(tmp_path):
    """FL_global_model.pt (NVFlare's PTFileModelPersistor): OrderedDict of tensors plus plain-valued dicts."""
    path = tmp_path / "FL_global_model.pt"
    model = OrderedDict(w=torch.ones(2), b=torch.zeros(1))
    meta = {"nr_aggregated": 3, "current_round": 1, "metrics_aggregation_info": {"method": "weighted_average"}}
    torch.save({"model": model, "meta_props": meta, "train_conf": {"train": {"model": "FetalBrainNet"}}}, path)
    loaded = load_checkpoint_file(path)
    assert torch.equal(loaded["model"]["w"], model["w"]) and loaded["meta_props"] == meta


def test_stop_process_kills_a_child_that_ignores_sigterm() -> None:
    import subprocess
    import sys

    from fetalseg.plumbing import stop_process

    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"  # the handler is installed before we stop it
    stop_process(child, timeout=0.5)
    assert child.returncode is not None and child.returncode < 0  # killed by a signal, not exited by itself
    stop_process(child)  # stopping a stopped process is a no-op
