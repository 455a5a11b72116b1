#!/usr/bin/env bash
# Everything a lent GPU session needs, in one call (the device tool's `run`):
#   bash bench/run_gpu.sh            # builds, runs the GPU tests, runs every bench, prints a table last
# Writes $OUT/bench-gpu.json (pytest-benchmark), $OUT/tests.log, $OUT/bench.log. The GPU image has torch 2.11,
# triton 3.6, pytest and pytest-benchmark but no NeMo/omegaconf/soundfile/DALI: nothing here needs them.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/nest_fast_out}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# 1. build in place (C++ and CUDA mel-frontend extensions); no network there, so no deps and no isolation
t0=$(date +%s)
TORCH_CUDA_ARCH_LIST=9.0 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED"; tail -40 "$OUT/build.log"; }
echo "build: $(( $(date +%s) - t0 )) s"

# 2. correctness on the GPU: every kernel test (GPU tests run here; NeMo-parity tests need NeMo: deselected)
python3 -m pytest tests -q -x -m "not nemo" -p no:cacheprovider \
    --deselect tests/test_nemo_parity.py --ignore=tests/test_nemo_parity.py \
    -k "cuda or gpu or compile" 2>&1 | tee "$OUT/tests.log" | tail -15

# 3. benchmarks (each checks the fast path against the reference before timing)
python3 -m pytest bench --benchmark -q -s -p no:cacheprovider --benchmark-json="$OUT/bench-gpu.json" \
    --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" | grep -vE "^\s*$" | tail -60

# 4. the short table, last
python3 bench/summarize.py "$OUT/bench-gpu.json"
