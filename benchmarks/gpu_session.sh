#!/usr/bin/env bash
# Everything a GPU session checks, in one command: the gpu-marked tests, then the LoRA
# benchmarks (issue shapes, same-run baselines). Results land in $OUT (the device tool's
# output folder) or benchmarks/out/. Run from the repo root: bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
nvidia-smi -L
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
status=0
python -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" || status=1
python -m benchmarks --ops lora_linear --providers 'peftops[triton]' hf-peft addmm linear \
    --json "$OUT/lora_linear.json" 2>&1 | tee "$OUT/bench.log" || status=1
exit $status
