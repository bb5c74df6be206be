"""fetalseg: the core shared by every front end of the fetal brain federation.

Data (synthetic phantoms, FeTA BIDS and folder loaders, validation), loading the one network definition from
the MONAI bundle, training and evaluation steps, metrics. It imports neither monailabel nor nvflare so that the
MONAI Label app, the NVFlare jobs, the privacy layer and the benchmarks can all build on it.
"""

import logging as _logging
import warnings as _warnings

__version__ = "0.1.0"

# MONAI probes for NVIDIA's image codec on every image load and complains when it is absent (always, on CPU).
_logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(_logging.ERROR)
_warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
