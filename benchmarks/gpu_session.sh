#!/usr/bin/env bash
# Everything a GPU session checks, in one command (device time is scarce: one call does it all).
# Stages, in this order (choose with STAGES="..."; default lora10, issue 10's run; the tuning
# stages run before the benchmarks that use their results):
#   lora10     issue 10 in at most ~8 minutes: the LoRA gpu tests; a quick GEMM tune at 8192
#              tokens, copied into peftops/kernels/configs/ on the device machine so the
#              benchmarks use it; every lora_linear case under CUDA graphs with peftops[triton],
#              peftops[torch], peftops (auto), addmm, hf-peft and linear in the same run; the
#              512-token cases again eager; host overhead per call on the GPU and on its host CPU.
#              Writes gpu_tests_lora.log, configs/, lora_linear_graphs.json,
#              lora_linear_T512_eager.json, host_overhead_cuda.json, host_overhead_cpu.json.
#   methods13  issue 13 in about 5 minutes: the gpu tests of DoRA, IA3 and the LoRA/adapter
#              kernels (the bias gradient now comes out of their token reductions); every
#              dora_linear case (peftops backends, peft's DoRA, peftops LoRA for the 1.15x target)
#              and every ia3_linear case (peftops backends, peft's IA3) under CUDA graphs.
#              Writes gpu_tests_methods.log, dora_linear.json, ia3_linear.json.
#   qlora14    issue 14 in about 5 minutes: the gpu tests of the 4-bit format, the QLoRA op,
#              kernels and modules; every lora_linear_nf4 case (training T8192 and decode T64 at
#              4096x4096 and 4096x14336, r16) under CUDA graphs with peftops[triton],
#              peftops[torch], dequant-cublas, bnb-peft (only if bitsandbytes is installed there)
#              and the 16-bit linear; the peak memory of one training step per provider.
#              Writes gpu_tests_qlora.log, lora_linear_nf4.json, qlora_memory.json.
#   multi15    issue 15's multi-LoRA decode path in about 5 minutes: the multi-LoRA gpu tests (the
#              CUDA C++ decode kernels built just in time by the first), a compute-sanitizer
#              memcheck of those kernels; every multi_lora_linear case under CUDA graphs with
#              peftops[cuda], the Triton backend's forward paths forced (segmented, gathered),
#              auto, lora-single, peft-loop and linear.
#              Writes gpu_tests_multi.log, multi_lora_linear.json.
#   banks15    issue 15's bank families and serving loop in about 4 minutes: the gpu tests of the
#              bank modules and of the serving example (its decode step captured once as a CUDA
#              graph and replayed with new adapter mixes, against eager), the example itself on the
#              GPU, every multi_bottleneck_adapter case (vs adapter-single, loop, copy) and the prefix
#              bank case (vs shared-mean, sdpa-gather) under CUDA graphs. Writes gpu_tests_banks.log,
#              serve_multi_adapter.log, multi_bottleneck_adapter.json, prefix_attention_banks.json.
#   tests      the gpu-marked tests (the CUDA extension is built just in time by the first)
#   memcheck   compute-sanitizer memcheck of the CUDA C++ multi-LoRA decode kernels
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
# gpu_tests.log, everything else in session.log. Every step has its own time limit, and a
# benchmark killed by one keeps the cases it finished in its JSON ("complete": false). From the
# repo root:
#   bash benchmarks/gpu_session.sh                        # issue 10's run (lora10)
#   STAGES="tests memcheck tune_adapter sweep lora adapter attention profile tune" bash benchmarks/gpu_session.sh
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 PEFTOPS_CACHE=${PEFTOPS_CACHE:-build/peftops-cache}
OUT=${OUT:-benchmarks/out}
STAGES=${STAGES:-lora10}
mkdir -p "$OUT"
LOG="$OUT/session.log"
status=0
has() { [[ " $STAGES " == *" $1 "* ]]; }
{
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"
# Triton compiles on the host: spread the tests over workers when pytest-xdist is there.
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${GPU_TEST_WORKERS:-12}")
if has tests; then
    timeout "${GPU_TEST_SECONDS:-300}" python3 -m pytest -m gpu ${GPU_TESTS:-tests} -q -rfE -p no:cacheprovider $par \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -40 || status=1
fi
run() {  # run SECONDS CMD...: one stage, its output appended to the session log
    local limit=$1; shift
    echo "== $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" || status=1
}
gpu_state() {  # clocks and power cap, read only: ratios come from one run, so note its state
    nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader 2>&1 | sed "s/^/[$1] /" | tee -a "$LOG"
}
if has lora10; then
    gpu_state start
    lora_tests=()
    for f in tests/ops/test_lora_linear.py tests/kernels/test_lora_linear.py tests/kernels/test_lora_linear_tma.py; do
        [[ -e $f ]] && lora_tests+=("$f")
    done
    if ((${#lora_tests[@]})); then
        echo "== pytest -m gpu ${lora_tests[*]}" | tee -a "$LOG"
        timeout 120 python3 -m pytest -m gpu "${lora_tests[@]}" -q -rfE -p no:cacheprovider $par \
            2>&1 | tee "$OUT/gpu_tests_lora.log" | tail -30 || status=1
    fi
    run 90 python3 benchmarks/tune.py --quick --tokens 8192 --ranks 16 --kernels gemm --out "$OUT/configs"
    if compgen -G "$OUT/configs/lora_linear/*.json" >/dev/null; then
        mkdir -p peftops/kernels/configs/lora_linear
        cp "$OUT"/configs/lora_linear/*.json peftops/kernels/configs/lora_linear/ || status=1
    fi
    # Names that match no provider are skipped by the harness (peftops[torch] before that
    # backend is registered); peftops is the auto choice, judged against addmm and hf-peft.
    lora_providers=('peftops[triton]' 'peftops[torch]' peftops addmm hf-peft linear)
    run 170 python3 -m benchmarks --ops lora_linear --providers "${lora_providers[@]}" --cuda-graph on \
        --json "$OUT/lora_linear_graphs.json"
    run 45 python3 -m benchmarks --ops lora_linear --cases T512 --providers "${lora_providers[@]}" \
        --cuda-graph off --json "$OUT/lora_linear_T512_eager.json"
    run 40 python3 -m benchmarks --host-overhead --device cuda --quick --json "$OUT/host_overhead_cuda.json"
    run 25 python3 -m benchmarks --host-overhead --device cpu --quick --json "$OUT/host_overhead_cpu.json"
    gpu_state end
fi
if has methods13; then
    gpu_state start
    m_tests=()
    for f in tests/ops/test_dora_linear.py tests/kernels/test_dora_linear.py tests/ops/test_ia3_linear.py tests/kernels/test_ia3_linear.py \
        tests/kernels/test_lora_linear.py tests/kernels/test_bottleneck_adapter.py tests/nn/test_dora.py; do
        [[ -e $f ]] && m_tests+=("$f")
    done
    echo "== pytest -m gpu ${m_tests[*]}" | tee -a "$LOG"
    timeout 150 python3 -m pytest -m gpu "${m_tests[@]}" -q -rfE -p no:cacheprovider $par \
        2>&1 | tee "$OUT/gpu_tests_methods.log" | tail -30 || status=1
    run 100 python3 -m benchmarks --ops dora_linear --cuda-graph on --json "$OUT/dora_linear.json"
    run 60 python3 -m benchmarks --ops ia3_linear --cuda-graph on --json "$OUT/ia3_linear.json"
    gpu_state end
fi
if has qlora14; then
    gpu_state start
    q_tests=()
    for f in tests/ops/test_lora_linear_nf4.py tests/kernels/test_lora_linear_nf4.py tests/nn/test_nf4.py; do
        [[ -e $f ]] && q_tests+=("$f")
    done
    echo "== pytest -m gpu ${q_tests[*]}" | tee -a "$LOG"
    timeout 120 python3 -m pytest -m gpu "${q_tests[@]}" -q -rfE -p no:cacheprovider $par \
        2>&1 | tee "$OUT/gpu_tests_qlora.log" | tail -30 || status=1
    run 120 python3 -m benchmarks --ops lora_linear_nf4 --cuda-graph on --json "$OUT/lora_linear_nf4.json"
    run 60 python3 benchmarks/qlora_memory.py --json "$OUT/qlora_memory.json"
    gpu_state end
fi
if has multi15; then
    gpu_state start
    echo "== pytest -m gpu multi-LoRA" | tee -a "$LOG"
    timeout 150 python3 -m pytest -m gpu tests/ops/test_multi_lora_linear.py tests/kernels/test_multi_lora_linear.py \
        tests/kernels/test_cuda_multi_lora.py -q -rfE -p no:cacheprovider $par 2>&1 | tee "$OUT/gpu_tests_multi.log" \
        | tail -30 || status=1
    run 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 -m pytest tests/kernels/test_cuda_multi_lora.py -q -p no:cacheprovider -k "memcheck"
    run 120 python3 -m benchmarks --ops multi_lora_linear --cuda-graph on --json "$OUT/multi_lora_linear.json"
    gpu_state end
fi
if has banks15; then
    gpu_state start
    echo "== pytest -m gpu banks and serving" | tee -a "$LOG"
    timeout 120 python3 -m pytest -m gpu tests/integrations/test_serve_example.py tests/nn/test_multi_bottleneck_adapter.py \
        tests/nn/test_multi_prefix.py tests/nn/test_prefix_prompt.py -q -rfE -p no:cacheprovider $par 2>&1 \
        | tee "$OUT/gpu_tests_banks.log" | tail -30 || status=1
    timeout 90 python3 examples/serve_multi_adapter.py 2>&1 | tee "$OUT/serve_multi_adapter.log" | tail -15 || status=1
    run 100 python3 -m benchmarks --ops multi_bottleneck_adapter --cuda-graph on --providers 'peftops*' adapter-single loop copy --json "$OUT/multi_bottleneck_adapter.json"
    run 80 python3 -m benchmarks --ops prefix_attention_banks --cuda-graph on --providers 'peftops*' shared-mean sdpa-gather --json "$OUT/prefix_attention_banks.json"
    gpu_state end
fi
has memcheck && run 60 compute-sanitizer --tool memcheck --error-exitcode 9 \
    python3 -m pytest tests/kernels/test_cuda_multi_lora.py -q -p no:cacheprovider -k "memcheck"
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
