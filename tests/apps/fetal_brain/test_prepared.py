"""The cache of pre-processed datastore images: keys follow the file, misses compute once, failures keep nothing."""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from apps.fetal_brain.lib.prepared import PreparedInputs, prepared_nbytes


def _prepare_counting(calls: list[str], *, size: int = 1000, delay_s: float = 0.0):
    def prepare(path: str) -> dict:
        calls.append(path)
        time.sleep(delay_s)
        return {"image": torch.zeros(size, dtype=torch.float32), "label": "dropped: only the image is kept"}

    return prepare


@pytest.fixture
def studies(tmp_path):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(b"a")
    (folder / "b.nii.gz").write_bytes(b"b")
    return folder


def test_second_get_is_a_hit_and_returns_the_same_item(studies):
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")
    calls: list[str] = []
    first = cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    second = cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    assert len(calls) == 1 and second is first and set(first) == {"image"}
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"], stats["bytes"]) == (1, 1, 1, 4000)


def test_a_replaced_file_is_prepared_again(studies):
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")
    calls: list[str] = []
    cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    replacement = studies / "new.tmp"
    replacement.write_bytes(b"a2")
    os.replace(replacement, studies / "a.nii.gz")  # the datastore's atomic replace: new inode, size, mtime
    cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    assert len(calls) == 2


def test_files_outside_the_studies_folder_and_a_zero_budget_are_never_kept(studies, tmp_path):
    outside = tmp_path / "upload.nii.gz"
    outside.write_bytes(b"x")
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")
    calls: list[str] = []
    for _ in range(2):
        cache.get(outside, _prepare_counting(calls))
    assert len(calls) == 2 and cache.stats()["entries"] == 0
    assert not cache.prefetch(outside, _prepare_counting(calls))
    off = PreparedInputs(root=studies, max_bytes=0, fingerprint="f")
    for _ in range(2):
        off.get(studies / "a.nii.gz", _prepare_counting(calls))
    assert len(calls) == 4 and not off.enabled and not off.prefetch(studies / "a.nii.gz", _prepare_counting(calls))


def test_least_recently_used_entry_is_dropped_beyond_the_budget(studies):
    cache = PreparedInputs(root=studies, max_bytes=6000, fingerprint="f")  # room for one 4000-byte item
    calls: list[str] = []
    cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    cache.get(studies / "b.nii.gz", _prepare_counting(calls))
    assert cache.stats()["entries"] == 1 and cache.stats()["bytes"] == 4000
    cache.get(studies / "b.nii.gz", _prepare_counting(calls))
    cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    assert [os.path.basename(c) for c in calls] == ["a.nii.gz", "b.nii.gz", "a.nii.gz"]


def test_a_failed_preparation_raises_to_the_caller_and_keeps_nothing(studies):
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")

    def broken(path: str) -> dict:
        raise ValueError("corrupt volume")

    with pytest.raises(ValueError, match="corrupt volume"):
        cache.get(studies / "a.nii.gz", broken)
    assert cache.stats()["entries"] == 0 and cache.stats()["pending"] == 0
    calls: list[str] = []
    cache.get(studies / "a.nii.gz", _prepare_counting(calls))  # the next request tries again
    assert len(calls) == 1


def test_prefetch_runs_in_the_background_and_the_request_waits_for_it(studies):
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")
    calls: list[str] = []
    caller = threading.get_ident()
    threads: list[int] = []

    def slow(path: str) -> dict:
        threads.append(threading.get_ident())
        return _prepare_counting(calls, delay_s=0.3)(path)

    assert cache.prefetch(studies / "a.nii.gz", slow)
    assert not cache.prefetch(studies / "a.nii.gz", slow)  # already pending: not queued twice
    item = cache.get(studies / "a.nii.gz", _prepare_counting(calls))  # waits for the prefetch, never redoes it
    assert len(calls) == 1 and threads and threads[0] != caller
    assert item is cache.get(studies / "a.nii.gz", _prepare_counting(calls))
    stats = cache.stats()
    assert stats["prefetched"] == 1 and stats["misses"] == 0 and stats["hits"] == 2
    cache.close()


def test_a_failed_prefetch_is_counted_and_the_request_sees_the_error(studies):
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")

    def broken(path: str) -> dict:
        raise ValueError("not an image")

    cache.prefetch(studies / "a.nii.gz", broken)
    cache.wait_idle(timeout=10)
    assert cache.stats()["failed_prefetches"] == 1 and cache.stats()["entries"] == 0
    calls: list[str] = []
    cache.get(studies / "a.nii.gz", _prepare_counting(calls))  # nothing poisoned: prepared afresh
    assert len(calls) == 1
    cache.close()


def test_negative_budget_is_refused(studies):
    with pytest.raises(ValueError, match="max_bytes"):
        PreparedInputs(root=studies, max_bytes=-1, fingerprint="f")


def test_prepared_nbytes_counts_tensors_and_arrays():
    assert prepared_nbytes({"image": torch.zeros(10), "x": np.zeros(3, dtype=np.uint8), "name": "s"}) == 43


def _wait(thread) -> None:
    thread.join(timeout=30)
    assert not thread.is_alive()


def test_warm_up_prepares_studies_in_order_until_the_budget_is_full_and_evicts_nothing(studies):
    (studies / "c.nii.gz").write_bytes(b"c")
    cache = PreparedInputs(root=studies, max_bytes=9000, fingerprint="f")  # room for two 4000-byte items
    calls: list[str] = []
    cache.get(studies / "c.nii.gz", _prepare_counting(calls))  # a user's entry, kept whatever the warm-up does
    _wait(cache.warm([studies / n for n in ("c.nii.gz", "a.nii.gz", "b.nii.gz")], _prepare_counting(calls)))
    assert [os.path.basename(c) for c in calls] == ["c.nii.gz", "a.nii.gz", "b.nii.gz"]  # c skipped: already kept
    stats = cache.stats()
    assert stats["entries"] == 2 and stats["bytes"] == 8000  # b did not fit: nothing was dropped for it
    assert stats["warm_up"] == {
        "state": "stopped: memory budget full (prepared_cache_mb)", "prepared": 1, "failed": 0, "studies": 3,
    }  # fmt: skip
    assert cache.get(studies / "c.nii.gz", _prepare_counting(calls)) and len(calls) == 3  # c: still a hit


def test_warm_up_goes_on_after_a_bad_study_and_runs_at_the_lowest_priority(studies):
    cache = PreparedInputs(root=studies, max_bytes=10**6, fingerprint="f")
    niceness: list[int] = []

    def prepare(path: str) -> dict:
        if os.path.basename(path) == "a.nii.gz":
            raise ValueError("corrupt volume")
        if hasattr(os, "getpriority"):
            niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return {"image": torch.zeros(10)}

    _wait(cache.warm([studies / "a.nii.gz", studies / "b.nii.gz", studies.parent / "outside.nii.gz"], prepare))
    stats = cache.stats()
    assert stats["warm_up"] == {"state": "done", "prepared": 1, "failed": 1, "studies": 3}
    assert stats["entries"] == 1 and stats["misses"] == 0
    if sys.platform.startswith("linux"):  # only the warm-up thread was lowered, not the caller's
        assert niceness == [19] and os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < 19


def test_warm_up_with_the_cache_off_does_nothing(studies):
    cache = PreparedInputs(root=studies, max_bytes=0, fingerprint="f")
    assert cache.warm([studies / "a.nii.gz"], _prepare_counting([])) is None
    assert cache.stats()["warm_up"]["state"] == "off"
