"""fetalseg: the core shared by every front end of the fetal brain federation.

Data (synthetic phantoms, FeTA BIDS and folder loaders, validation), loading the one network definition from
the MONAI bundle, training and evaluation steps, metrics. It imports neither monailabel nor nvflare so that the
MONAI Label app, the NVFlare jobs, the privacy layer and the benchmarks can all build on it.
"""

__version__ = "0.1.0"
