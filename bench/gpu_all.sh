#!/usr/bin/env bash
# The GPU check in one call: the CUDA tests (kernels compiled, not interpreted), then the kernels, sampler and
# train benchmarks at their GPU shapes, results as JSON + Markdown under OUTDIR (default $OUT or
# bench/results/gpu-<date>), a summary last.
#
#   bash bench/gpu_all.sh [OUTDIR]          (GPU_BENCH="kernels" runs a subset of the benchmarks)
#
# GPU_TEST_PATHS picks the tests (default tests/test_gpu.py; "tests" runs the whole suite: tests that need the CPU
# interpreter skip themselves on a CUDA machine).
# Every stage runs under `timeout` (GPU_STAGE_S seconds each, default 280; GPU_TESTS_S for the tests, default 240)
# so one slow stage cannot eat a device call's 600 s: the stages after it still run and the summary still prints.
# The 2026-11-26 H200 call took 268 s for the tests + the kernels benchmark alone; split a full run over two calls
# (GPU_BENCH="kernels", then GPU_BENCH="sampler train" with GPU_TESTS_S=0 to skip the tests). Since then the fused
# NF4 matmul autotunes its tile once per (row bucket, shape, direction): expect ~30-60 s more in the kernels stage.
#
# Optional wheels (bitsandbytes, liger-kernel) placed in ./wheels are installed into /tmp/site first, so every
# side-by-side column of the benchmarks is filled (see ../shared/docs/gpu.md for the recipe).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/results/gpu-$(date +%Y-%m-%d)}}"
mkdir -p "$out"
if ls wheels/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-deps --target /tmp/site wheels/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>/dev/null || echo "no bitsandbytes"
    python3 -c "import liger_kernel; print('liger-kernel present')" 2>/dev/null || echo "no liger-kernel"
} | tee "$out/env.txt"

status=()
# the per-op files check the kernels under the CPU interpreter; on a GPU machine test_gpu.py runs them compiled
if [ "${GPU_TESTS_S:-240}" != 0 ]; then
    timeout -k 10 "${GPU_TESTS_S:-240}" python3 -m pytest -q -p no:cacheprovider ${GPU_TEST_PATHS:-tests/test_gpu.py} 2>&1 \
        | tee "$out/pytest.txt" | tail -25
    status+=("tests: $(tail -1 "$out/pytest.txt")")
fi
for what in ${GPU_BENCH:-kernels sampler train}; do
    start=$(date +%s)
    if timeout -k 10 "${GPU_STAGE_S:-280}" python3 -m reflectevo bench "$what" --device cuda --out "$out/$what.json" \
            > "$out/$what.log" 2>&1; then
        status+=("bench $what: ok in $(( $(date +%s) - start )) s -> $out/$what.md")
    else
        status+=("bench $what: FAILED ($(tail -1 "$out/$what.log"))")
    fi
done
echo
for f in "$out"/*.md; do [ -f "$f" ] && { echo "== $f"; cat "$f"; echo; }; done
echo "== summary"
printf '%s\n' "${status[@]}"
