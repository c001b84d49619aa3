#!/usr/bin/env bash
# One prepared call for a lent GPU machine (see benchmarks/README.md, "GPU projection" and
# "Factorized"): the machine's facts, the Pallas tests that need a GPU, the projection benchmark,
# the factorized benchmark and the ensemble's fixed cost, each under its own time limit so that the
# whole stays under ~8 minutes.
# Usage (repository root, on the GPU machine): bash benchmarks/gpu_check.sh [OUTDIR]
# Shorter: PROJECTION_SECONDS, PROJECTION_BUDGET, FACTORIZED_BATCHES ("8"), RUN_CNN=0, ENSEMBLE_SECONDS.
set -u
out="${1:-${OUT:-gpu_out}}"
mkdir -p "$out"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
  python3 -c "import jax, flax, optax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
} 2>&1 | tee "$out/machine.txt"
timeout 90 python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/pip.txt" 2>&1 \
  || echo "pip install -e . failed (see pip.txt); scripts map trakjax.kernels by hand" | tee -a "$out/machine.txt"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "=== pytest (GPU Pallas checks)"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_pallas_projection.py tests/test_projection.py \
  >"$out/pytest.txt" 2>&1; echo "pytest exit $?" | tee -a "$out/pytest.txt"; tail -15 "$out/pytest.txt"
echo "=== gpu_projection"
timeout "${PROJECTION_SECONDS:-200}" python3 benchmarks/gpu_projection.py --no-install --_map-kernels \
  --budget "${PROJECTION_BUDGET:-140}" \
  >"$out/gpu_projection.txt" 2>&1; echo "exit $?" >>"$out/gpu_projection.txt"; tail -30 "$out/gpu_projection.txt"
for batch in ${FACTORIZED_BATCHES:-8 32}; do
  echo "=== factorized gpt2 --gpu --batch $batch"
  timeout 110 python3 benchmarks/factorized.py gpt2 --gpu --batch "$batch" --repeats 10 \
    >"$out/factorized_gpt2_b$batch.txt" 2>&1; echo "exit $?" >>"$out/factorized_gpt2_b$batch.txt"
  tail -12 "$out/factorized_gpt2_b$batch.txt"
done
if [ "${RUN_CNN:-1}" = 1 ]; then
  echo "=== factorized cnn"
  timeout 80 python3 benchmarks/factorized.py cnn --repeats 10 >"$out/factorized_cnn.txt" 2>&1
  echo "exit $?" >>"$out/factorized_cnn.txt"; tail -10 "$out/factorized_cnn.txt"
fi
if [ -f benchmarks/ensemble_fixed_cost.py ]; then
  echo "=== ensemble_fixed_cost (2l, factorized)"
  timeout "${ENSEMBLE_SECONDS:-150}" python3 benchmarks/ensemble_fixed_cost.py --shape 2l --families factorized \
    >"$out/ensemble_fixed_cost.txt" 2>&1; echo "exit $?" >>"$out/ensemble_fixed_cost.txt"
  tail -30 "$out/ensemble_fixed_cost.txt"
fi
