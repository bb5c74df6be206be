"""The ast.parse lock that keeps NVFlare's threaded array downloads clear of CPython gh-106905."""

from __future__ import annotations

import ast
import threading

import numpy as np

import nvflare_jobs  # noqa: F401  (installs the guard, as every job process does)
from nvflare_jobs import ast_guard


def test_importing_the_package_serialises_ast_parse_and_literal_eval_still_works() -> None:
    assert ast_guard.installed()
    assert not ast_guard.install()  # idempotent: never wrapped twice
    assert ast.literal_eval("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}")["shape"] == (2, 3)


def test_literal_eval_goes_through_the_lock(tmp_path) -> None:
    """While another thread holds the lock, a .npy header cannot be parsed; it is once the lock is released."""
    np.save(tmp_path / "a.npy", np.zeros((2, 3), dtype=np.float32))
    done = threading.Event()

    def load() -> None:
        np.load(tmp_path / "a.npy")
        done.set()

    with ast_guard._LOCK:
        thread = threading.Thread(target=load)
        thread.start()
        assert not done.wait(0.3)  # blocked on the lock: the header parse is serialised
    thread.join(timeout=10)
    assert done.is_set()
