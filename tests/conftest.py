import os

import torch

# The Triton kernels run on CPU tensors through the interpreter when no GPU is present. The
# switch is read when a kernel is defined, so it is set before anything imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from d3fast.data.prepare import prepare  # noqa: E402
from d3fast.recipes.experts import run_experts  # noqa: E402
from tests._utils import cfg_of  # noqa: E402


@pytest.fixture(autouse=True)
def d3fast_home(tmp_path, monkeypatch):
    """Every test gets its own empty d3fast home: nothing touches ~/.d3fast. Unexpected
    exceptions reach the test with their traceback (D3FAST_DEBUG=1), not a crash file."""
    home = tmp_path / "d3home"
    monkeypatch.setenv("D3FAST_HOME", str(home))
    monkeypatch.setenv("D3FAST_DEBUG", "1")
    return home


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    """digits prepared and two tiny experts trained, once per test module that asks."""
    home = tmp_path_factory.mktemp("home")
    mp = pytest.MonkeyPatch()
    mp.setenv("D3FAST_HOME", str(home))
    prepare(cfg_of(), progress=False)
    run_experts(cfg_of(), progress=False)
    mp.undo()
    return home


@pytest.fixture
def home(shared_home, monkeypatch):
    monkeypatch.setenv("D3FAST_HOME", str(shared_home))
    return shared_home
