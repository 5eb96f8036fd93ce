"""d3fast: a training engine for Distributional Dataset Distillation (D3).

Importing the package is cheap (no torch): `d3fast.cli` and the modules it calls
import the heavy dependencies on demand, so decode workers start fast.
"""

__version__ = "0.1.0"

from d3fast.errors import D3FastError

__all__ = ["D3FastError", "__version__"]
