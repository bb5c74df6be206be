"""fetalseg: the core shared by every front end of the fetal brain federation.

Data (synthetic phantoms, FeTA BIDS and folder loaders, validation), loading the one network definition from
the MONAI bundle, training and evaluation steps, metrics. It imports neither monailabel nor nvflare so that the
MONAI Label app, the NVFlare jobs, the privacy layer and the benchmarks can all build on it.
"""

__version__ = "0.1.0"

import logging as _logging

# MONAI probes for NVIDIA's image codec on every image load and warns when it is absent (always, on CPU machines).
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)

import warnings as _warnings

_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
