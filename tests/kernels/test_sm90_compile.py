"""No LoRA or adapter kernel may spill registers on sm_90a (issue 10): every shipped config
(the compute-capability-9 defaults and the tuned files) compiled ahead of time, no GPU needed.

The compiles run in one subprocess (``tests/kernels/sm90_compile_probe.py``) without
``TRITON_INTERPRET``, which this suite sets and under which kernels cannot be compiled; the
Triton cache goes to a temporary directory. ptxas is the one triton ships. Run alone with::

    python -m pytest -q tests/kernels/test_sm90_compile.py

About a minute on two idle cores (bf16 and fp16, with and without dropout, in two workers).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_shipped_config_compiles_for_sm90a_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(ROOT))
    env.pop("PEFTOPS_PROBE_KERNELS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels.sm90_compile_probe"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    # Every kernel compiled, in both 16-bit dtypes, and the dropout variants among them.
    kernels = {r["kernel"] for r in results}
    assert kernels == {
        "_gemm_kernel",
        "_down_kernel",
        "_tn_kernel",
        "_forward_kernel",
        "_expand_kernel",
        "_nf4_gemm_kernel",
        "_gather_down_kernel",
        "_gather_up_kernel",
    }, kernels
    for dtype in ("*bf16", "*fp16"):
        assert {r["kernel"] for r in results if dtype in r["types"]} == kernels, dtype
    assert any(r["constexprs"].get("EPI_DROPOUT") for r in results)
    assert any(r["constexprs"].get("HAS_DROPOUT") for r in results if r["kernel"] == "_down_kernel")
    assert any(r["constexprs"].get("WRITE_MASK") for r in results)
    assert any(r["constexprs"].get("HAS_DROPOUT") for r in results if r["kernel"] == "_tn_kernel")
    # The bias gradient's column sums ride in the dB/dW and g B reductions: those variants too.
    for kernel in ("_down_kernel", "_tn_kernel"):
        assert any(r["constexprs"].get("COL_SUMS") for r in results if r["kernel"] == kernel), kernel
    # DoRA's epilogue (magnitude, saved unscaled output) and its dm reduction.
    assert any(r["constexprs"].get("COL_SCALE") and r["constexprs"].get("SAVE_PRE") for r in results)
    assert any(r["constexprs"].get("DOT_SUMS") for r in results if r["kernel"] == "_tn_kernel")
    spilling = [r for r in results if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "register spills on sm_90a:\n" + "\n".join(json.dumps(r) for r in spilling)
