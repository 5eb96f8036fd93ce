"""The Triton kernels compiled ahead of time for the GPUs d3fast targets, on this CPU-only
machine (`triton.compile` with a `GPUTarget`): every kernel builds for sm_80 (A100) and sm_90
(H100) at the block sizes the launchers pick for CUDA tensors, with the options the launchers
pass (`TRITON_OPTIONS`): FP fusion on, so the fp32 arithmetic holds fused multiply-adds
whichever default the installed Triton has (3.9 fuses unless told, 3.10 will not).

The compiles run in a child process without TRITON_INTERPRET (tests/conftest.py sets it on a
CPU, and the interpreter patches triton.language while it is set)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed"),
              pytest.mark.slow]

CHILD = textwrap.dedent('''
    import json, re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from d3fast.kernels import mmd_triton as mmd, param_dist_triton as pd
    from d3fast.kernels._autograd import TRITON_OPTIONS

    f32 = "*fp32"
    BM, BN, BD = mmd._blocks("cuda")
    mmd_sig = {"z_ptr": f32, "sq_ptr": f32, "lx_ptr": "*i32", "ly_ptr": "*i32", "coef_ptr": f32, "gam_ptr": f32,
               "partial_ptr": f32, "acc_ptr": f32, "N": "i32", "NX": "i32", "D": "i32"}
    mmd_const = {"NUM_GAMMAS": 5, "UNBIASED": True, "IEEE": True, "UPCAST": False, "BM": BM, "BN": BN, "BD": BD}
    block, iters = pd._blocks("cuda")
    cases = {
        "mmd+grad": (mmd._mmd_fwd_kernel, mmd_sig, mmd_const | {"COMPUTE_GRAD": True}),
        "mmd": (mmd._mmd_fwd_kernel, mmd_sig, mmd_const | {"COMPUTE_GRAD": False}),
        "param_dist fwd": (pd._param_dist_fwd_kernel, {"a_ptr": f32, "t_ptr": f32, "s_ptr": f32, "partial_ptr": f32,
                           "P": "i32", "num_partials": "i32", "partial_offset": "i32"}, {"BLOCK": block, "ITERS": iters}),
        "param_dist bwd": (pd._param_dist_bwd_kernel, {"a_ptr": f32, "t_ptr": f32, "s_ptr": f32, "ca_ptr": f32,
                           "cs_ptr": f32, "ga_ptr": f32, "gt_ptr": f32, "gs_ptr": f32, "P": "i32"},
                           {"GRAD_A": True, "GRAD_T": True, "GRAD_S": True, "BLOCK": block}),
    }

    def build(name, arch, **options):
        fn, sig, const = cases[name]
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": 4, **TRITON_OPTIONS, **options})
        ptx = k.asm["ptx"]
        return {"target": re.search(r"\\.target (sm_\\d+)", ptx).group(1), "cubin_bytes": len(k.asm["cubin"]),
                "fma": len(re.findall(r"\\bfma\\.rn\\.f32\\b", ptx))}

    out = {f"{name} sm_{arch}": build(name, arch) for name in cases for arch in (80, 90)}
    out |= {f"{name} sm_90 unfused": build(name, 90, enable_fp_fusion=False) for name in ("mmd+grad", "param_dist fwd")}
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def compiled() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"  # Triton 3.10's default: only TRITON_OPTIONS can turn fusion on
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("case", ["mmd+grad", "mmd", "param_dist fwd", "param_dist bwd"])
def test_every_kernel_compiles_for_the_target_gpus(compiled, case, arch):
    k = compiled[f"{case} sm_{arch}"]
    assert k["target"] == f"sm_{arch}" and k["cubin_bytes"] > 0


@pytest.mark.parametrize("case", ["mmd+grad", "param_dist fwd"])
def test_the_launch_options_keep_fp_fusion_on(compiled, case):
    """Under a default of no fusion (Triton 3.10's, set in the child), the launchers' options
    still give more fused multiply-adds than fusion off: the kernels compile as tested
    whichever default the installed Triton has."""
    fused, unfused = compiled[f"{case} sm_90"]["fma"], compiled[f"{case} sm_90 unfused"]["fma"]
    assert fused > unfused
