"""The CUDA C++ extension (``csrc/``): build, load, and the ``cuda`` backend it provides.

Two ways to get it, neither needed on CPU-only installs:

* ahead of time: ``PEFTOPS_BUILD_CUDA=1 pip install --no-build-isolation -e .`` compiles
  ``csrc/*.cu`` into ``peftops._C`` (``setup.py``);
* just in time: on the first call that needs it, ``torch.utils.cpp_extension.load`` builds
  the same sources with ninja into a persistent cache (``$PEFTOPS_CACHE``, default
  ``~/.cache/peftops``, one folder per torch/CUDA version), and later processes reuse it.

The sources register their ops with ``TORCH_LIBRARY`` under the ``peftops`` namespace
(``torch.ops.peftops.bottleneck_adapter_fwd_cuda``); this module wraps them as the ``cuda``
backend of the public ops.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .backends import OpImpl, backend_status, implementation, register_backend, register_impl
from .kernels.common import ACT_CODES, dtype_reason

CSRC = Path(__file__).resolve().parent.parent / "csrc"

#: nvcc flags shared by the JIT build, the AOT build (setup.py) and the CI compile check.
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]


def sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu"))


def cache_dir() -> Path:
    root = Path(os.environ.get("PEFTOPS_CACHE", Path.home() / ".cache" / "peftops"))
    return root / f"torch{torch.__version__.split('+')[0]}-cuda{torch.version.cuda}"


def why_unavailable() -> str | None:
    """``None`` if the extension is built or can be built here, else the reason."""
    if importlib.util.find_spec("peftops._C") is not None:
        return None
    if torch.version.cuda is None:
        return "this torch build has no CUDA"
    if not sources():
        return f"no CUDA sources in {CSRC} (install from a clone, or build ahead of time: README, Install on GPU)"
    if shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
        return "the extension is not built and nvcc is not on PATH to build it"
    if shutil.which("ninja") is None:
        return "the extension is not built and ninja is not installed to build it"
    return None


@functools.cache
def load() -> None:
    """Make ``torch.ops.peftops.*_cuda`` available: import the AOT build, else JIT-build."""
    if importlib.util.find_spec("peftops._C") is not None:
        import peftops._C  # noqa: F401  (registers the ops)
    else:
        from torch.utils.cpp_extension import load as jit_load

        build = cache_dir()
        build.mkdir(parents=True, exist_ok=True)
        jit_load(
            name="peftops_C",
            sources=[str(s) for s in sources()],
            build_directory=str(build),
            extra_cuda_cflags=NVCC_FLAGS,
            is_python_module=False,
            verbose=False,
        )
    torch.library.register_fake("peftops::bottleneck_adapter_fwd_cuda")(_adapter_fwd_fake)


def _adapter_fwd_fake(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale, stream):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], down_weight.shape[0]), dtype=torch.float32)


# -- the cuda backend of bottleneck_adapter ---------------------------------------------------


def _adapter_forward(x, down_weight, down_bias, up_weight, up_bias, residual, activation, scale):
    load()
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    res2 = residual.reshape(-1, d).contiguous() if residual is not None else None
    contig = [None if t is None else t.contiguous() for t in (down_weight, down_bias, up_weight, up_bias)]
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream().cuda_stream
        y, h = torch.ops.peftops.bottleneck_adapter_fwd_cuda(
            x2, contig[0], contig[1], contig[2], contig[3], res2, ACT_CODES[activation], scale, stream
        )
    return y.reshape(*lead, d), h.reshape(*lead, down_weight.shape[0])


def _adapter_backward(*args):
    # The backward stays in Triton (tensor-core GEMMs and token reductions); the C++ side has
    # the forward only, as the issue allows unless a C++ backward measures faster.
    return implementation("bottleneck_adapter", "triton").backward(*args)


def _adapter_supports(x, down_weight, *rest) -> str | None:
    reason = dtype_reason(x.dtype, "the CUDA kernel takes")
    if reason is not None:
        return reason
    # The backward runs the Triton kernels, so a call is supported only where they run too.
    reason = backend_status("triton", x.device)
    if reason is not None:
        return f"the cuda backend's backward runs the Triton kernels, which cannot: {reason}"
    try:
        triton_impl = implementation("bottleneck_adapter", "triton")
    except RuntimeError as exc:
        return f"the cuda backend's backward runs the Triton kernels: {exc}"
    reason = triton_impl.supports(x, down_weight, *rest)
    if reason is not None:
        return f"the cuda backend's backward runs the Triton kernels, which do not support this call: {reason}"
    return None  # whether the extension can be built is the backend's (cached) status


def _status(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, got a {device_type} tensor"
    return why_unavailable()


register_backend("cuda", _status)
register_impl(
    "bottleneck_adapter",
    "cuda",
    OpImpl(forward=_adapter_forward, backward=_adapter_backward, supports=_adapter_supports),
)
