import os

import torch

# The Triton kernels run on CPU tensors through the interpreter when no GPU is present. The
# switch is read when a kernel is defined, so it is set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def d3fast_home(tmp_path, monkeypatch):
    """Every test gets its own empty d3fast home: nothing touches ~/.d3fast."""
    home = tmp_path / "d3home"
    monkeypatch.setenv("D3FAST_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
