"""The CUDA C++ extension (``csrc/``): build, load, and the ``cuda`` backend it provides.

Two ways to get it, neither needed on CPU-only installs:

* ahead of time: ``PEFTOPS_BUILD_CUDA=1 pip install --no-build-isolation -e .`` compiles
  ``csrc/*.cu`` into ``peftops._C`` (``setup.py``);
* just in time: on the first call that needs it, ``torch.utils.cpp_extension.load`` builds
  the same sources with ninja into a persistent cache (``$PEFTOPS_CACHE``, default
  ``~/.cache/peftops``, one folder per torch/CUDA version), and later processes reuse it.

The sources register their ops with ``TORCH_LIBRARY`` under the ``peftops`` namespace
(``torch.ops.peftops.multi_lora_gather_down_cuda``, ``..._up_cuda``); this module wraps them as
the ``cuda`` backend of the public ops: today ``multi_lora_linear``'s gathered decode forward.

There was a CUDA-core forward of ``bottleneck_adapter`` here. It ran 117x slower than the
Triton kernel on the H100 (19.2 ms against 0.16 ms at 16384 x 4096, r64: weights re-read from
L2 per 8-row block, no tensor cores) and was removed rather than kept as a backend nobody
should pick; a tensor-core rebuild would need a GPU to verify it, which the sessions that
could have written it did not have.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from pathlib import Path

import torch

from .backends import OpImpl, backend_status, implementation, register_backend, register_impl
from .kernels.common import dtype_reason

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
    torch.library.register_fake("peftops::multi_lora_gather_down_cuda")(_gather_down_fake)
    torch.library.register_fake("peftops::multi_lora_gather_up_cuda")(_gather_up_fake)


def _gather_down_fake(x, lora_a, scales, ranks, ids, stream):
    return x.new_empty((x.shape[0], lora_a.shape[1]))


def _gather_up_fake(y, u, lora_b, ranks, ids, stream):
    return None


# -- the cuda backend of multi_lora_linear: the gathered decode forward -------------------------


def _multi_lora_forward(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed):
    load()
    # The base GEMM once, on cuBLAS; the C++ kernels add each token's own adapter.
    y = torch.nn.functional.linear(x, weight, bias).contiguous()
    ranks32 = ranks.to(torch.int32).contiguous() if ranks is not None else None
    ids = adapter_ids.contiguous()
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream().cuda_stream
        u = torch.ops.peftops.multi_lora_gather_down_cuda(
            x.contiguous(), lora_a.contiguous(), scales.float().contiguous(), ranks32, ids, stream
        )
        torch.ops.peftops.multi_lora_gather_up_cuda(y, u, lora_b.contiguous(), ranks32, ids, stream)
    return y, u


def _multi_lora_backward(*args):
    # u is the Triton forward's (same values), so the Triton segmented backward takes it as is.
    return implementation("multi_lora_linear", "triton").backward(*args)


def _multi_lora_supports(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed) -> str | None:
    reason = dtype_reason(x.dtype, "the CUDA kernels take")
    if reason is not None:
        return reason
    if dropout_p > 0:
        return f"the CUDA decode kernels have no dropout (serving), got dropout_p={dropout_p}"
    vec = 16 // x.element_size()
    if x.shape[-1] % vec or lora_a.shape[1] % vec:
        return (
            f"the CUDA kernels read 16-byte vectors: in_features and r_max must be multiples of {vec}, "
            f"got {x.shape[-1]} and {lora_a.shape[1]}"
        )
    # The backward runs the Triton kernels, so a call is supported only where they run too.
    reason = backend_status("triton", x.device)
    if reason is not None:
        return f"the cuda backend's backward runs the Triton kernels, which cannot: {reason}"
    try:
        triton_impl = implementation("multi_lora_linear", "triton")
    except RuntimeError as exc:
        return f"the cuda backend's backward runs the Triton kernels: {exc}"
    reason = triton_impl.supports(x, weight, lora_a, lora_b, adapter_ids, scales, bias, ranks, dropout_p, seed)
    if reason is not None:
        return f"the cuda backend's backward runs the Triton kernels, which do not support this call: {reason}"
    return None


def _status(device_type: str) -> str | None:
    if device_type != "cuda":
        return f"the cuda backend needs CUDA tensors, got a {device_type} tensor"
    return why_unavailable()


register_backend("cuda", _status)
register_impl(
    "multi_lora_linear",
    "cuda",
    OpImpl(forward=_multi_lora_forward, backward=_multi_lora_backward, supports=_multi_lora_supports),
)
