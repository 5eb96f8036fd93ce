"""Loads the C++ extension d3fast._C, or says why it is not used.

`D3FAST_PUREPYTHON=1` forces the pure-PyTorch fallbacks even when the extension is built
(the test suite runs both ways). A missing or broken build logs one warning.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

_C: ModuleType | None = None
HAS_EXT = False
REASON = ""

if os.environ.get("D3FAST_PUREPYTHON", "0") == "1":
    REASON = "disabled by D3FAST_PUREPYTHON=1"
else:
    try:
        from d3fast import _C as _C  # type: ignore[attr-defined,no-redef]

        HAS_EXT = True
        REASON = "built"
    except ImportError as e:
        REASON = f"not built ({e}); reinstall with `pip install -e .`"
        logging.getLogger("d3fast").warning("d3fast._C unavailable, using PyTorch fallbacks: %s", e)

__all__ = ["HAS_EXT", "REASON", "_C"]
