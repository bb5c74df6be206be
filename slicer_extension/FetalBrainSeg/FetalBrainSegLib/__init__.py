"""FetalBrainSeg's logic without Slicer: REST client, labels, segmentation files, validation, workflow, outbox.

This package imports neither ``slicer`` nor ``qt`` (a test checks it), needs only the standard library and numpy
(both in Slicer's Python), and is tested under pytest against the real MONAI Label server.
"""

from .client import MonaiLabelClient, normalize_server_url
from .errors import (
    AuthError,
    ConnectionLostError,
    CorrectionInvalidError,
    FetalBrainSegError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
    QcConfirmationRequiredError,
    RequestRejectedError,
    ServerError,
    ServerTimeoutError,
    ServerUnreachableError,
    TokenRejectedError,
    is_retryable,
)
from .labels import LabelSet, TissueLabel
from .outbox import Outbox, OutboxEntry
from .qc import QcReport
from .segio import read_seg_nrrd, write_seg_nrrd
from .validation import correction_problems, validate_correction
from .volumeio import Geometry, Volume, read_volume, write_nifti
from .workflow import ModelInfo, SubmitResult, TrainingStatus, Workflow

__all__ = [
    "AuthError",
    "ConnectionLostError",
    "CorrectionInvalidError",
    "FetalBrainSegError",
    "Geometry",
    "LabelSet",
    "ModelInfo",
    "MonaiLabelClient",
    "NetworkError",
    "NotFoundError",
    "Outbox",
    "OutboxEntry",
    "PermissionDeniedError",
    "ProtocolError",
    "QcConfirmationRequiredError",
    "QcReport",
    "RequestRejectedError",
    "ServerError",
    "ServerTimeoutError",
    "ServerUnreachableError",
    "SubmitResult",
    "TissueLabel",
    "TokenRejectedError",
    "TrainingStatus",
    "Volume",
    "Workflow",
    "correction_problems",
    "is_retryable",
    "normalize_server_url",
    "read_seg_nrrd",
    "read_volume",
    "validate_correction",
    "write_nifti",
    "write_seg_nrrd",
]
