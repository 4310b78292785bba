"""Build script; the metadata lives in pyproject.toml.

The CUDA extension (``csrc/`` -> ``peftops._C``) is built ahead of time only when asked:

    PEFTOPS_BUILD_CUDA=1 pip install --no-build-isolation -e .

(``--no-build-isolation`` so that the build sees the installed torch). Without it, nothing
is compiled; on a GPU machine the same sources are built just in time on first use instead
(``peftops/cuda_ext.py``), and CPU-only installs never need them.
"""

import os
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("PEFTOPS_BUILD_CUDA") == "1":
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    here = Path(__file__).parent
    csrc = sorted(str(p.relative_to(here)) for p in (here / "csrc").glob("*.cu"))
    ext_modules = [
        CUDAExtension(
            "peftops._C",
            sources=csrc + ["csrc/module.cpp"],
            # Keep in step with peftops.cuda_ext.NVCC_FLAGS (the JIT build's flags).
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]},
        )
    ]
    cmdclass = {"build_ext": BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
