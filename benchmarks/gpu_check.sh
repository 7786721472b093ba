#!/usr/bin/env bash
# Everything that needs a GPU, in one command (under 5 minutes: the parts have limits of 80 + 60 + 70 + 80 s):
#   1. the conformance suite on torch (every torch device, CUDA included) and on JAX (its GPU, if jax has one)
#   2. the CUDA tests: sync-free loops under torch.cuda.set_sync_debug_mode("error"), CUDA-graph replay of the
#      functional step, plus the functional, torch.compile and torch-backend tests on this machine
#   3. the benchmarks with the substep rows on CUDA (their targets are set for torch CPU: shown, not judged)
# Logs and JSON go to $OUT (default benchmarks/results/gpu). Exit status 0 only if every part passed.
#
#   bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
failed=()

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show the tail
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 15 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

# the backends are found through entry points: install the checkout (no network needed) if they are missing
if ! "$PY" -c "import kdpm2core, sys; sys.exit('torch' not in kdpm2core.available_backends())" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || echo "install failed: see $OUT/install.log"
fi

{ nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-')"; "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" || true; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

part conformance-torch 80 "$PY" -m pytest -q -rs -p no:cacheprovider --pyargs kdpm2core.testing --kdpm2-backend=torch
if "$PY" -c "import jax, sys; sys.exit(0 if any(d.platform == 'gpu' for d in jax.devices()) else 1)" 2>/dev/null; then
    part conformance-jax-gpu 60 "$PY" -m pytest -q -rs -p no:cacheprovider --pyargs kdpm2core.testing --kdpm2-backend=jax
else
    echo "=== conformance-jax-gpu: skipped, jax has no GPU here" | tee "$OUT/conformance-jax-gpu.log"
fi
part cuda-tests 70 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_functional.py tests/test_torch_compile.py tests/test_torch_backend.py
part benchmarks-cuda 80 "$PY" -m benchmarks --device cuda --quick --skip cold --output "$OUT/benchmarks-cuda.json"

if [ "${#failed[@]}" -eq 0 ]; then
    echo "gpu_check: all parts passed; logs in $OUT"
else
    echo "gpu_check: FAILED: ${failed[*]}; logs in $OUT"
    exit 1
fi
