#!/usr/bin/env bash
# The GPU check, in two parts that each fit one device call (under 10 minutes):
#   OUT=dir bash benchmarks/device_check.sh tests   # GPU test subset + the main job (~4 min)
#   OUT=dir bash benchmarks/device_check.sh bench   # ODE-Net step + gradients vs peers (~6 min)
# Run from the repository root where jax (with CUDA), equinox, optax, diffrax and
# torchdiffeq are installed. Each step has its own time limit, so that one slow step
# does not lose the others; logs and tables go to $OUT (at most 8 files come back).
set -u
PART=${1:-}
case "$PART" in tests | bench) ;; *) echo "usage: device_check.sh tests|bench" >&2; exit 2 ;; esac
OUT=${OUT:-bench_results/device}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# XLA_PYTHON_CLIENT_PREALLOCATE: benchmarks.gradients runs a JAX child process beside
# its own, and two processes cannot both take 75% of the GPU memory up front.
export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax, equinox, diffrax, torch, torchdiffeq; print('jax', jax.__version__, \
jax.devices(), '| equinox', equinox.__version__, '| diffrax', diffrax.__version__, \
'| torch', torch.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

if [ "$PART" = tests ]; then
  echo "== tests (GPU subset)"
  timeout 270 $PY -m pytest -q -m "not slow" -p no:cacheprovider tests/test_solvers.py \
    tests/test_adjoint.py tests/test_api.py tests/test_nn.py >"$OUT/tests.log" 2>&1
  echo "exit $?"; tail -n 15 "$OUT/tests.log"
  echo "== jaxode run configs/odenet_digits_quick.yaml"
  timeout 70 $PY -m jaxode.cli run configs/odenet_digits_quick.yaml --out /tmp/digits_quick \
    2>&1 | tail -n 25
  cp /tmp/digits_quick/summary.md "$OUT/digits_quick_summary.md" 2>/dev/null
else
  echo "== benchmarks.odenet_step"
  timeout 250 $PY -m benchmarks.odenet_step --repeats 10 --out "$OUT/odenet_step.json" \
    --systems "jaxode backsolve" "jaxode backsolve 1e-6" "jaxode, XLA conv" \
    "jaxode, shifted conv" "diffrax backsolve" "torchdiffeq odeint_adjoint" \
    "torchdiffeq odeint" 2>&1 | tee "$OUT/odenet_step.log"
  echo "== benchmarks.gradients (time, vmap)"
  timeout 120 $PY -m benchmarks.gradients --quick --skip-slow --section time vmap \
    --out "$OUT/gradients.json" >"$OUT/gradients.log" 2>&1
  echo "exit $?"; grep -v "^E\|^=== Source\|^external/\|^$" "$OUT/gradients.log" | tail -n 60
fi
