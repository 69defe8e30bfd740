#!/usr/bin/env bash
# Builds the libFuzzer harnesses of tests/fuzz (clang, ASan + UBSan, CPU only)
# into build-fuzz/, seeds each corpus from the bundled files, and runs each
# harness for SECONDS (default 600). Prints per harness: executions, coverage
# (edges and features), corpus size, and the crashing inputs found (kept in
# build-fuzz/crashes/). Exit status 1 when any harness found a crash.
#   scripts/fuzz.sh [SECONDS] [HARNESS ...]      e.g. scripts/fuzz.sh 30 fuzz_gguf
# PATCH_FUZZ_JOBS=N runs N harnesses at once (default: 1).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SECS=${1:-600}
shift || true
HARNESSES=("$@")
[[ ${#HARNESSES[@]} -gt 0 ]] ||
  HARNESSES=(fuzz_safetensors fuzz_gguf fuzz_tokenizer_json fuzz_config fuzz_mask_file fuzz_packed fuzz_npz)
B=${PATCH_FUZZ_BUILD_DIR:-build-fuzz}
DATA=${PATCH_DATA_DIR:-$ROOT/../shared/data}
FIX=${PATCH_BUILD_DIR:-build}/fixtures
say() { printf '\033[1m[fuzz]\033[0m %s\n' "$*"; }
die() { printf '[fuzz] error: %s\n' "$*" >&2; exit 2; }

command -v clang++ >/dev/null || die "clang++ is missing (Debian: clang, libclang-rt-dev)"
PY=$ROOT/.venv/bin/python
[[ -x $PY ]] || PY=$(command -v python3)
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)') || die "no torch in $PY"
say "building the harnesses in $B"
cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPATCH_WITH_CUDA=OFF -DPATCH_BUILD_TESTS=OFF -DPATCH_BUILD_FUZZERS=ON \
  -DPATCH_PYTHON="$PY" -DPATCH_DATA_DIR="$DATA" >"$B.configure.log" 2>&1 || { cat "$B.configure.log"; die "configure failed"; }
cmake --build "$B" -j "${PATCH_JOBS:-$(nproc)}" --target fuzzers >"$B.build.log" 2>&1 ||
  { tail -40 "$B.build.log"; die "build failed"; }

# Seeds: the bundled files, the test fixtures where the suite made them, and
# mask / packed files made by the regular build from the bundled model.
seed() {  # seed HARNESS FILE...
  mkdir -p "$B/seeds/$1"
  local h=$1
  shift
  for f in "$@"; do [[ -f $f ]] && cp "$f" "$B/seeds/$h/$(echo "$f" | tr '/' '_')"; done
  return 0
}
rm -rf "$B/seeds"
seed fuzz_safetensors "$DATA/models/tinystories-656k/model.safetensors" "$FIX"/io/*.safetensors
seed fuzz_gguf "$DATA/models/stories260K/stories260K.gguf" "$FIX"/io/*.gguf "$FIX"/text/*/vocab.gguf
seed fuzz_tokenizer_json "$DATA/models/tinystories-656k/tokenizer.json" "$FIX"/text/*/tokenizer.json
seed fuzz_config configs/*.yaml
P=${PATCH_BUILD_DIR:-build}/bin/patch-train
if [[ -x $P ]]; then
  G=$B/generated
  rm -rf "$G"
  for pat in 2:4 hybrid unstructured; do
    "$P" prune --model "$DATA/models/tinystories-656k" --method magnitude --pattern "$pat" --target 0.35 \
      --set mask.tile=[32,32] --out "$G/${pat/:/-}" -q >/dev/null 2>&1
  done
  "$P" pack --model "$DATA/models/tinystories-656k" --masks "$G/hybrid/masks.safetensors" --out "$G/pack" -q >/dev/null 2>&1
  "$P" train --model x --dump-config >"$G/train.yaml" 2>/dev/null
  seed fuzz_mask_file "$G"/*/masks.safetensors
  seed fuzz_packed "$G/pack/packed.safetensors"
  seed fuzz_config "$G/train.yaml"
  for to in patch-npz maskllm-npz; do
    "$P" convert --masks "$G/hybrid/masks.safetensors" --to "$to" --out "$G/$to" -q >/dev/null 2>&1
  done
  seed fuzz_npz "$G"/*-npz/*.npz
fi

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
run_one() {
  local h=$1
  mkdir -p "$B/corpus/$h" "$B/crashes" "$B/seeds/$h"
  "$B/bin/$h" -max_total_time="$SECS" -timeout=60 -rss_limit_mb=8192 -print_final_stats=1 \
    -artifact_prefix="$B/crashes/$h-" "$B/corpus/$h" "$B/seeds/$h" >"$B/$h.log" 2>&1
  echo $? >"$B/$h.rc"
}
say "running ${#HARNESSES[@]} harnesses for $SECS s each"
running=0
for h in "${HARNESSES[@]}"; do
  run_one "$h" &
  running=$((running + 1))
  if ((running >= ${PATCH_FUZZ_JOBS:-1})); then
    wait -n
    running=$((running - 1))
  fi
done
wait

status=0
printf '%-22s %12s %8s %8s %8s %s\n' harness executions cov ft corpus crashes
for h in "${HARNESSES[@]}"; do
  log=$B/$h.log
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  crashes=$(find "$B/crashes" -name "$h-*" | wc -l)
  printf '%-22s %12s %8s %8s %8s %s\n' "$h" "${execs:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes"
  if [[ $(cat "$B/$h.rc") != 0 || $crashes != 0 ]]; then
    status=1
    grep -m3 -E 'ERROR|unexpected exception|runtime error|deadly signal' "$log" | sed "s/^/  $h: /"
  fi
done
exit $status
