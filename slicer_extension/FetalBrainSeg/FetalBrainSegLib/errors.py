"""Errors the module shows to the radiologist.

Every error carries a message written for a clinician (what happened, what to do), because the Widget displays
``str(error)`` as is. The classes also decide what happens to a correction that could not be sent: only
:func:`is_retryable` errors put it in the outbox (the same bytes may succeed later); an error that says the correction
itself is wrong does not, since sending it again would be rejected again.
"""

from __future__ import annotations

from collections.abc import Sequence


class FetalBrainSegError(Exception):
    """Base class: ``str(error)`` is the message for the radiologist."""


# ---------------------------------------------------------------------------------------------------------------
# The network or the server is not available: the request may succeed later, unchanged.
# ---------------------------------------------------------------------------------------------------------------


class NetworkError(FetalBrainSegError):
    """The request did not get an answer (retryable)."""

    def __init__(self, message: str, *, url: str = "") -> None:
        super().__init__(message)
        self.url = url


class ServerUnreachableError(NetworkError):
    """No connection could be made (server not running, wrong address, network down)."""


class ConnectionLostError(NetworkError):
    """The connection was made but broke before the answer was complete (server stopped mid-request)."""


class ServerTimeoutError(ConnectionLostError):
    """The server accepted the request but did not answer in time."""


class ServerError(FetalBrainSegError):
    """The server answered with a 5xx status: its fault, possibly transient (retryable)."""

    def __init__(self, message: str, *, status: int, server_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


# ---------------------------------------------------------------------------------------------------------------
# Who you are: the request is fine but the credentials are not (retryable after signing in again).
# ---------------------------------------------------------------------------------------------------------------


class AuthError(FetalBrainSegError):
    """401/403: the correction is fine, the credentials are not; keep it until the user has a valid token."""

    def __init__(self, message: str, *, status: int, server_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class TokenRejectedError(AuthError):
    """401: no token, an invalid one, or an expired one."""


class PermissionDeniedError(AuthError):
    """403: a valid token whose role may not do this (e.g. an annotator starting training)."""


# ---------------------------------------------------------------------------------------------------------------
# The request itself is wrong: sending it again changes nothing.
# ---------------------------------------------------------------------------------------------------------------


class RequestRejectedError(FetalBrainSegError):
    """A 4xx answer other than 401/403: the server refused this request and said why."""

    def __init__(self, message: str, *, status: int, server_message: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.server_message = server_message


class NotFoundError(RequestRejectedError):
    """404: the case (or label, or model) does not exist on this server."""


class QcConfirmationRequiredError(RequestRejectedError):
    """409 from a label upload: the correction's tissue volumes are far outside the normal range for the case's
    gestational age. Nothing was stored; ``flags`` says which tissues. Ask the radiologist, then submit again with
    ``confirm_qc=True`` to have it used for fine-tuning and federated training anyway."""

    def __init__(self, message: str, *, status: int, server_message: str = "", flags: Sequence[str] = ()) -> None:
        super().__init__(message, status=status, server_message=server_message)
        self.flags = list(flags)


class TrainingAlreadyRunningError(RequestRejectedError):
    """429 from /train: a fine-tuning run is already in progress."""


class ProtocolError(FetalBrainSegError):
    """The server answered something this module cannot read (probably not the project's MONAI Label server)."""


class NotConnectedError(FetalBrainSegError):
    """An action that needs the server was asked for before connecting."""


class NoCaseError(FetalBrainSegError):
    """An action that needs an open case (segment, submit) was asked for without one."""


class CorrectionInvalidError(FetalBrainSegError, ValueError):
    """The correction fails the checks done before sending it (shape, geometry, label values)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        bullet = "\n".join(f"- {p}" for p in self.problems)
        super().__init__(f"The correction was not sent because it does not fit the case:\n{bullet}")


class FileFormatError(FetalBrainSegError, ValueError):
    """A volume or segmentation file could not be read (corrupt, truncated or an unsupported variant)."""


def is_retryable(error: BaseException) -> bool:
    """True if sending the same request again later may succeed: network/server trouble or credentials."""
    return isinstance(error, (NetworkError, ServerError, AuthError))
