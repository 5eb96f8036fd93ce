"""Loads the C++ extension d3fast._C, or says why it is not used.

`D3FAST_PUREPYTHON=1` forces the pure-PyTorch fallbacks even when the extension is built
(the test suite runs both ways). A missing or broken build logs one warning.
`D3FAST_CPU_ISA=baseline|avx2|avx512` runs the float32 kernels at that instruction-set level
instead of the one measured fastest for this CPU (`_C.cpu_isa()`; csrc/d3fast_core.h); a level
the CPU lacks, or an unknown one, logs one warning and keeps the default.
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
    if _C is not None and os.environ.get("D3FAST_CPU_ISA"):
        try:
            _C.set_cpu_isa(os.environ["D3FAST_CPU_ISA"])
        except ValueError as e:
            logging.getLogger("d3fast").warning("D3FAST_CPU_ISA ignored: %s; running %s", e, _C.cpu_isa())

__all__ = ["HAS_EXT", "REASON", "_C"]
