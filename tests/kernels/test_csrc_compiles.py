"""csrc/ compiles wherever nvcc exists, GPU or not (CI has nvcc and no GPU), so a syntax or
type error in the CUDA sources cannot land. GPU runs of the kernels are in
tests/kernels/test_cuda_multi_lora.py."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

from peftops import cuda_ext

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: there is no compiler to check csrc/ with")


def _flags() -> list[str]:
    return [
        *cuda_ext.NVCC_FLAGS,
        *cpp_extension.COMMON_NVCC_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
    ]


def test_there_are_sources_to_check():
    assert [p.name for p in cuda_ext.sources()] == ["multi_lora_gather.cu"]


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("source", cuda_ext.sources(), ids=lambda p: p.name)
def test_cuda_source_compiles_for_hopper(source, tmp_path):
    cmd = [NVCC, "-c", str(source), "-o", str(tmp_path / "out.o"), "-arch=sm_90", *_flags()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_module_entry_point_compiles(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    cmd = [
        cxx,
        "-fsyntax-only",
        "-std=c++17",
        f"-I{sysconfig.get_paths()['include']}",
        str(cuda_ext.CSRC / "module.cpp"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
