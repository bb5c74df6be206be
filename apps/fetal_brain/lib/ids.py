"""Which image ids, label tags and model names the API accepts.

An id becomes a file name inside the studies folder, so it must never carry a path: no separators, no ``..``,
no absolute paths, no control characters. Checking the text (not the resolved path) keeps the rule simple and
the same on every operating system.
"""

from __future__ import annotations

import re

from apps.fetal_brain.lib.errors import BadRequestError

MAX_ID_LENGTH = 128
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def id_problem(value: object, *, what: str = "image id") -> str | None:
    """Why ``value`` is not a safe id (None if it is)."""
    if not isinstance(value, str) or not value:
        return f"{what} is missing or empty"
    shown = value if len(value) <= 80 else value[:77] + "..."
    if len(value) > MAX_ID_LENGTH:
        return f"{what} {shown!r} is longer than {MAX_ID_LENGTH} characters"
    if "/" in value or "\\" in value:
        return f"{what} {shown!r} contains a path separator; ids name a case, not a path"
    if ".." in value:
        return f"{what} {shown!r} contains '..'"
    if not _ID.match(value):
        return f"{what} {shown!r} has characters outside A-Z a-z 0-9 . _ + - (or does not start with a letter or digit)"
    return None


def check_id(value: object, *, what: str = "image id") -> str:
    """Return ``value`` if it is a safe id, else raise :class:`BadRequestError` (HTTP 400)."""
    problem = id_problem(value, what=what)
    if problem:
        raise BadRequestError(problem)
    return str(value)


def check_tag(value: object) -> str:
    """Return ``value`` if it is a safe label tag (``final``, ``original``...), else raise BadRequestError."""
    if not isinstance(value, str) or not _TAG.match(value):
        raise BadRequestError(f"label tag {str(value)[:80]!r} must be 1-64 characters A-Z a-z 0-9 _ - (e.g. 'final')")
    return value
