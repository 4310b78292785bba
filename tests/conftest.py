"""Test configuration shared by the whole suite.

* ``TRITON_INTERPRET=1`` is set before anything imports a kernel when no CUDA device is
  present, so the ``triton`` backend runs on CPU tensors (``triton.jit`` reads it at
  decoration time).
* ``PEFTOPS_POISON_OUTPUTS=1``: kernel launchers fill their outputs with NaN before launch.
* ``TORCHINDUCTOR_CACHE_DIR``: a fresh directory per run unless set.
* hypothesis profiles: ``ci`` (the default: bounded examples, no deadline, because the
  interpreter and first-call compilation make timings meaningless) and ``dev`` (more
  examples); pick with ``HYPOTHESIS_PROFILE``.
* ``gpu`` tests are skipped where there is no CUDA device, with the reason in the summary.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN, so an element a kernel never writes cannot pass unnoticed.
os.environ.setdefault("PEFTOPS_POISON_OUTPUTS", "1")
# A compile cache of this run's own: a shared /tmp/torchinductor_<user> was seen to serve a
# stale AOT-autograd graph after a custom op's schema changed, and to race on precompiled
# headers with other processes compiling at the same time.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peftops-inductor-")

import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci",
    max_examples=20,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    max_examples=200,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="gpu: no CUDA device on this machine (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    dev = torch.cuda.get_device_name() if HAS_CUDA else "none"
    return [
        f"peftops: torch {torch.__version__}, CUDA device: {dev}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}, "
        f"hypothesis profile: {os.environ.get('HYPOTHESIS_PROFILE', 'ci')}"
    ]


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)
