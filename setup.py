"""Builds the optional C++ extension d3fast._C from csrc/.

Set D3FAST_PUREPYTHON=1 to skip the build; d3fast then uses its pure-PyTorch fallbacks.
Everything else (metadata, packages, package_dir) lives in pyproject.toml.
"""

import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("D3FAST_PUREPYTHON", "0") != "1":
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext

    ParallelCompile("D3FAST_BUILD_JOBS", default=0).install()
    openmp = sys.platform.startswith("linux")
    ext_modules.append(
        Pybind11Extension(
            "d3fast._C",
            sources=["csrc/d3fast_core.cpp", "csrc/mmd.cpp", "csrc/param_dist.cpp", "csrc/bindings.cpp"],
            include_dirs=["csrc"],
            # without them an edit to a header alone leaves the old build in place
            depends=["csrc/d3fast_core.h", "csrc/simd.h"],
            cxx_std=17,
            extra_compile_args=["-O3", "-ffp-contract=fast", "-fno-trapping-math", "-fno-math-errno", "-Wno-psabi"] + (["-fopenmp"] if openmp else []),
            extra_link_args=["-fopenmp"] if openmp else [],
            define_macros=[("D3FAST_VERSION", '"0.1.0"')],
        )
    )
    cmdclass["build_ext"] = build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
