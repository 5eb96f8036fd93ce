"""d3fast: a training engine for Distributional Dataset Distillation (D3).

The Python API (docs/python-api.md, d3fast/api.py):

    d3fast.distill(dataset, steps=..., set={...}) -> run directory
    d3fast.load(run_or_export) -> Distilled | Merged;  .sample(n_per_class) -> (images, labels)
    d3fast.evaluate(run_or_export_or_image_set, students=..., epochs=...) -> report

Importing the package is cheap (no torch): `d3fast.cli` and the modules it calls, and the
API's functions, import the heavy dependencies on demand, so decode workers start fast.
"""

from typing import Any

__version__ = "0.1.0"

from d3fast.errors import D3FastError

__all__ = ["D3FastError", "__version__", "distill", "evaluate", "load"]


def distill(*args: Any, **kwargs: Any) -> Any:
    """`d3fast.api.distill` (see there)."""
    from d3fast import api

    return api.distill(*args, **kwargs)


def evaluate(*args: Any, **kwargs: Any) -> Any:
    """`d3fast.api.evaluate` (see there)."""
    from d3fast import api

    return api.evaluate(*args, **kwargs)


def load(*args: Any, **kwargs: Any) -> Any:
    """`d3fast.api.load` (see there)."""
    from d3fast import api

    return api.load(*args, **kwargs)
