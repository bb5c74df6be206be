"""Serialise ``ast.parse`` across threads: a CPython bug otherwise fails a federated job at random.

Why: CPython (3.11 here) keeps the AST builder's recursion depth in per-interpreter state; two threads building AST
objects at once (``ast.literal_eval``, which NumPy uses to read every ``.npy`` header) can trip its consistency
check with ``SystemError: AST constructor recursion depth mismatch`` (python/cpython gh-106905). NVFlare's server
receives the sites' arrays on several threads at once, and one such error makes it drop the update and end the
job ("failed to decode streamed submit_update"): seen once in CI on Python 3.11.7 (2026-11-24). A lock around
``ast.parse`` removes the overlap; parsing a ``.npy`` header takes microseconds, so nothing waits noticeably.
Installed when :mod:`nvflare_jobs` is imported, which every NVFlare process of the job does (server components,
client filters, the training script).
"""

from __future__ import annotations

import ast
import functools
import threading
from typing import Any

_LOCK = threading.RLock()
_MARK = "_fetal_fl_serialised"


def install() -> bool:
    """Wrap ``ast.parse`` (and so ``ast.literal_eval``, which calls it) in a process-wide lock; idempotent.

    Returns True if this call installed it. Installed on every Python version: which releases are free of the
    race was not checked here, and the lock costs microseconds."""
    if getattr(ast.parse, _MARK, False):
        return False
    original = ast.parse

    @functools.wraps(original)
    def parse(*args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return original(*args, **kwargs)

    setattr(parse, _MARK, True)
    ast.parse = parse  # ast.literal_eval looks ``parse`` up in the module, so it goes through the lock too
    return True


def installed() -> bool:
    return bool(getattr(ast.parse, _MARK, False))
