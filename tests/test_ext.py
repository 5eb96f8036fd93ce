"""The C++ extension and the backend dispatch; scripts/test.sh runs these twice, the
second time with D3FAST_PUREPYTHON=1."""

import os

import pytest
import torch

pytestmark = pytest.mark.purepython


def test_extension_mode_matches_environment():
    from d3fast import _ext, kernels

    if os.environ.get("D3FAST_PUREPYTHON") == "1":
        assert not _ext.HAS_EXT and _ext._C is None
        assert "D3FAST_PUREPYTHON" in _ext.REASON
        assert kernels.backend(torch.zeros(1)) == "reference"
    else:
        assert _ext.HAS_EXT, f"d3fast._C should be built by bootstrap: {_ext.REASON}"
        info = _ext._C.build_info()
        assert info["version"] == _ext._C.__version__
        assert set(info) == {"version", "compiler", "openmp_threads", "simd"}
        assert kernels.backend(torch.zeros(1)) == "cpp"


def test_triton_can_be_disabled(monkeypatch):
    from d3fast import kernels

    monkeypatch.delenv("D3FAST_PUREPYTHON", raising=False)
    monkeypatch.setenv("D3FAST_DISABLE_TRITON", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, why = kernels.triton_status()
    assert not ok and "D3FAST_DISABLE_TRITON" in why
    monkeypatch.setenv("D3FAST_DISABLE_TRITON", "0")
    ok, why = kernels.triton_status()
    assert ok, why
    # CPU tensors never take Triton by dispatch, even with the interpreter on
    assert kernels.backend(torch.zeros(1)) != "triton"


def test_pure_python_forces_the_reference(monkeypatch):
    from d3fast import kernels

    monkeypatch.setenv("D3FAST_PUREPYTHON", "1")
    assert kernels.backend(torch.zeros(1)) == "reference"
    assert not kernels.triton_status()[0]
