"""peftops microbenchmarks: ``python -m benchmarks --help``.

The harness (:mod:`benchmarks.harness`) checks every provider against the op's float32
reference, times it in ``fwd``, ``bwd`` and ``fwd+bwd``, measures the device's GEMM and copy
ceilings in the same run, prints a table, writes a JSON run and compares runs. Case files in
:mod:`benchmarks.cases` register the ops, their Llama-3-8B-shaped cases and their providers.
Method and history: ``benchmarks/NOTES.md``.
"""

from .harness import main
from .registry import Case, Op, Provider, Registry, Work

__all__ = ["Case", "Op", "Provider", "Registry", "Work", "main"]
