#!/usr/bin/env bash
# Everything a GPU session checks, in one command (device time is scarce: one call does it all).
# Stages, in this order (choose with STAGES="..."; default all; the tuning stages run before the
# benchmarks that use their results):
#   tests      the gpu-marked tests (the CUDA extension is built just in time by the first)
#   memcheck   compute-sanitizer memcheck of the CUDA adapter kernel
#   lora adapter attention
#              the benchmarks of each op at its issue's shapes, with same-run baselines
#   profile    per-kernel times of one training step per op (benchmarks/profile_ops.py)
#   sweep      block-size sweep of the attention kernels (benchmarks/sweep_attention.py), the
#              winners written under $OUT/configs and copied into peftops/kernels/configs/
#   tune       LoRA GEMM configs at 8192 tokens (benchmarks/tune.py), JSON under $OUT/configs
#   tune_adapter
#              the adapter's row-kernel configs at the shapes, JSON under $OUT/configs and
#              copied into peftops/kernels/configs/ on this machine, so later stages use them
# GPU_TESTS narrows the tests stage (pytest paths/args; default: all of tests/).
# Results land in $OUT (the device tool's output folder) or benchmarks/out/; test output in
# gpu_tests.log, everything else in session.log. From the repo root:
#   bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 PEFTOPS_CACHE=${PEFTOPS_CACHE:-build/peftops-cache}
OUT=${OUT:-benchmarks/out}
STAGES=${STAGES:-tests memcheck tune_adapter sweep lora adapter attention profile tune}
mkdir -p "$OUT"
LOG="$OUT/session.log"
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
{
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"
if has tests; then
    # Triton compiles on the host: spread the tests over workers when pytest-xdist is there.
    par=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-12}")
    timeout "${GPU_TEST_SECONDS:-300}" python3 -m pytest -m gpu ${GPU_TESTS:-tests} -q -rfE -p no:cacheprovider $par \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || status=1
fi
run() {  # run SECONDS CMD...: one stage, its output appended to the session log
    local limit=$1; shift
    echo "== $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" || status=1
}
has memcheck && run 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest tests/kernels/test_cuda_adapter.py -q -p no:cacheprovider -k "smoke and gelu and 64-4096"
if has tune_adapter; then
    run 120 python3 benchmarks/tune.py --op bottleneck_adapter --quick --out "$OUT/configs"
    mkdir -p peftops/kernels/configs/bottleneck_adapter
    cp "$OUT"/configs/bottleneck_adapter/*.json peftops/kernels/configs/bottleneck_adapter/ || status=1
fi
if has sweep; then
    run 150 python3 benchmarks/sweep_attention.py --json "$OUT/sweep_attention.json" --configs-out "$OUT/configs"
    mkdir -p peftops/kernels/configs/prefix_attention
    cp "$OUT"/configs/prefix_attention/*.json peftops/kernels/configs/prefix_attention/ || status=1
fi
has lora && run 180 python3 -m benchmarks --ops lora_linear --providers 'peftops[triton]' hf-peft addmm linear \
    --json "$OUT/lora_linear.json"
has adapter && run 90 python3 -m benchmarks --ops bottleneck_adapter --providers 'peftops*' 'compile(reference)' \
    nn-eager copy --json "$OUT/bottleneck_adapter.json"
has attention && run 120 python3 -m benchmarks --ops prefix_attention --providers 'peftops[triton]' sdpa-cat \
    sdpa-noprefix --json "$OUT/prefix_attention.json"
has profile && run 60 python3 benchmarks/profile_ops.py --json "$OUT/profile.json"
has tune && run 120 python3 benchmarks/tune.py --quick --tokens 8192 --ranks 16 --kernels gemm --out "$OUT/configs"
exit $status
