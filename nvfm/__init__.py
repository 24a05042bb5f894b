"""nvfm: a volumetric foundation model toolkit for brain CT and MRI (NeuroVFM method).

Importing nvfm loads the compiled operators (nvfm._C) when they were built and says once,
on stderr, which backend each operator uses (silence with NVFM_QUIET=1).
"""
__version__ = "0.1.0"

from nvfm import ops as _ops  # noqa: F401  (loads the extension, prints the backend table once)
