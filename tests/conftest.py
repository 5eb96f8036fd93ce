import pytest
import torch


@pytest.fixture(autouse=True)
def d3fast_home(tmp_path, monkeypatch):
    """Every test gets its own empty d3fast home: nothing touches ~/.d3fast."""
    home = tmp_path / "d3home"
    monkeypatch.setenv("D3FAST_HOME", str(home))
    return home


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
