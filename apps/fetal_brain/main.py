"""MONAI Label entry point of the fetal brain app (``monailabel start_server --app apps/fetal_brain ...``).

MONAI Label loads this file by path and instantiates the ``MONAILabelApp`` subclass it finds here. The app itself
lives in ``apps.fetal_brain.lib`` (importable as a package, so the server front, the CLI and the tests use the very
same classes); when the project is not installed, the repository root is put on ``sys.path`` first.
"""

import sys
from pathlib import Path

try:
    import apps.fetal_brain  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.append(str(Path(__file__).resolve().parents[2]))

from apps.fetal_brain.lib.app import FetalBrainApp

__all__ = ["FetalBrainApp"]
