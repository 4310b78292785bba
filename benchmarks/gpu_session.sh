#!/usr/bin/env bash
# Everything a GPU session checks, in one command: the gpu-marked tests (the CUDA extension is
# built just in time by the first of them), a compute-sanitizer memcheck of the CUDA kernel,
# then the LoRA and adapter benchmarks at the issues' shapes with same-run baselines. Results
# land in $OUT (the device tool's output folder) or benchmarks/out/. From the repo root:
#   bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 PEFTOPS_CACHE=${PEFTOPS_CACHE:-build/peftops-cache}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
# Triton compiles on the host: spread the tests over workers when pytest-xdist is there.
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-8}")
timeout "${GPU_TEST_SECONDS:-250}" python3 -m pytest -m gpu tests -q -rfE -p no:cacheprovider $par \
    2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest tests/kernels/test_cuda_adapter.py -q -p no:cacheprovider -k "smoke and gelu and 64-4096" \
    2>&1 | tee "$OUT/memcheck.log" || status=1
timeout 180 python3 -m benchmarks --ops lora_linear --providers 'peftops[triton]' hf-peft addmm linear \
    --json "$OUT/lora_linear.json" 2>&1 | tee "$OUT/bench_lora.log" || status=1
timeout 90 python3 -m benchmarks --ops bottleneck_adapter --providers 'peftops*' 'compile(reference)' nn-eager copy \
    --json "$OUT/bottleneck_adapter.json" 2>&1 | tee "$OUT/bench_adapter.log" || status=1
exit $status
