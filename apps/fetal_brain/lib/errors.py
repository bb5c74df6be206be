"""Errors for rejected input, each carrying the HTTP status a client should see.

They are raised deep inside the app (datastore, tasks, model store) where the problem is found, and turned into
a clear 4xx by the ASGI front (``apps.fetal_brain.routes``); a plain Python caller (CLI, tests) gets a ValueError
with the same message.
"""

from __future__ import annotations

from collections.abc import Sequence


class InputError(ValueError):
    """The request or file cannot be used; ``status`` is the HTTP code, ``problems`` one sentence each."""

    status: int = 422

    def __init__(self, problems: str | Sequence[str], *, status: int | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if not self.problems:
            raise ValueError("InputError needs at least one problem")
        if status is not None:
            self.status = int(status)
        super().__init__("; ".join(self.problems))


class BadRequestError(InputError):
    """Malformed request (bad id, bad parameter, missing part)."""

    status = 400


class NotFoundError(InputError):
    """Unknown image, label, model or strategy."""

    status = 404


class ConflictError(InputError):
    """The request would overwrite something that must not change (e.g. an image that already has labels)."""

    status = 409


class PayloadTooLargeError(InputError):
    """Upload bigger than the configured limit."""

    status = 413


class UnsupportedMediaTypeError(InputError):
    """Upload that is not an image format this app reads."""

    status = 415


class UnprocessableError(InputError):
    """Well-formed request whose file content is unusable (corrupt, 2D/4D, wrong grid, bad label values)."""

    status = 422
