#!/usr/bin/env bash
# One call on the GPU machine: build with CUDA, run the test suite, then the
# benchmarks beside the PyTorch peer baseline (../shared/bench/py_patch_ref.py).
# Results go to $OUT (or ./gpu-out): build/test logs and bench JSON lines.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PATCH_JOBS=${PATCH_JOBS:-16}
# Python packages missing on that machine travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
scripts/setup.sh > "$OUT/setup.log" 2>&1 || { tail -50 "$OUT/setup.log"; exit 1; }
tail -3 "$OUT/setup.log"
PATCH_TEST_JOBS=4 scripts/test.sh > "$OUT/test.log" 2>&1
grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/test.log" | tail -30
SHAPE=${SHAPE:-qwen2.5-0.5b}
build/bin/patch-train bench --set bench.shape=$SHAPE --set bench.modes=[dense,joint,tile,maskllm] \
  --set bench.iters=${ITERS:-5} 2>&1 | tee "$OUT/bench_patch.jsonl"
REF=${PATCH_BENCH_REF:-../shared/bench/py_patch_ref.py}
python3 "$REF" --arch $SHAPE --ckpt --seq 4096 2>&1 | tee "$OUT/bench_pyref.jsonl"
# One-shot calibration memory on a 1B-shaped model (128 x 2048 calibration tokens).
build/bin/patch-train bench --set bench.shape=llama-3.2-1b --set bench.modes=[prune_wanda,prune_sparsegpt] \
  --set prune.calib_samples=128 --set prune.calib_seq_len=2048 2>&1 | grep '^{' | tee "$OUT/bench_prune.jsonl"
