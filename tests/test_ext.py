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


@pytest.mark.skipif(os.environ.get("D3FAST_PUREPYTHON") == "1", reason="needs d3fast._C")
def test_cpu_levels_are_listed_chosen_and_refused_clearly():
    from d3fast._ext import _C

    levels = _C.cpu_isas()
    assert levels[0] == "baseline" and levels == ["baseline", "avx2", "avx512"][: len(levels)]
    before = _C.cpu_isa()
    assert before in levels and before in _C.build_info()["simd"]
    try:
        for level in levels:
            _C.set_cpu_isa(level)
            assert _C.cpu_isa() == level
        with pytest.raises(ValueError, match="unknown instruction-set level 'sse9'"):
            _C.set_cpu_isa("sse9")
        if levels[-1] != "avx512":
            with pytest.raises(ValueError, match="cannot run the avx512 kernels"):
                _C.set_cpu_isa("avx512")
        assert _C.cpu_isa() == levels[-1]  # a refused level changes nothing
    finally:
        _C.set_cpu_isa(before)


@pytest.mark.skipif(os.environ.get("D3FAST_PUREPYTHON") == "1", reason="needs d3fast._C")
@pytest.mark.parametrize("value", ["baseline", "sse9"])
def test_the_cpu_level_environment_variable(value):
    import subprocess
    import sys

    from d3fast._ext import _C

    default = subprocess.run([sys.executable, "-c", "from d3fast._ext import _C; print(_C.cpu_isa())"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert default in _C.cpu_isas()
    env = {**os.environ, "D3FAST_CPU_ISA": value}
    r = subprocess.run([sys.executable, "-c", "from d3fast._ext import _C; print(_C.cpu_isa())"],
                       capture_output=True, text=True, check=True, env=env)
    if value == "baseline":
        assert r.stdout.strip() == "baseline" and r.stderr == ""
    else:  # one warning line, the default kept
        assert r.stdout.strip() == default
        assert "D3FAST_CPU_ISA ignored: unknown instruction-set level 'sse9'" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
