"""nvfm: a volumetric foundation model toolkit for brain CT and MRI (NeuroVFM method).

Importing nvfm loads the compiled operators (nvfm._C) when they were built. Quiet by default: a
missing or stale extension warns in one line; NVFM_VERBOSE=1 prints, on stderr, which backend each
operator uses (`python -m nvfm.ops` prints that table; `python -m nvfm.doctor` checks an installation).
NVFM_QUIET=1 is still accepted (it keeps the table off even with NVFM_VERBOSE=1).
"""
import warnings as _warnings

__version__ = "0.1.0"

# `python -m nvfm.ops` runs ops.py as __main__ after this package imported nvfm.ops: runpy's
# notice about that is expected here (ops.py handles it), not something for the user.
_warnings.filterwarnings("ignore", message=r"'nvfm\.ops' found in sys\.modules", category=RuntimeWarning)

from nvfm import ops as _ops  # noqa: F401,E402  (loads the extension; warns once if missing or stale)
