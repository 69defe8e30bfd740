#!/usr/bin/env bash
# Fills .gpu_carry/ (git-ignored) with what device call N of 2 carries to the
# GPU machine for the SmolLM2-135M study (scripts/gpu_check.sh STAGE=carry):
#   1: C4, WikiText-2 test, TinyStories-656K with some of its text (tar.xz), the
#      CUTLASS headers, the PyTorch peer and the first 58.6 MB of the GGUF
#   2: the rest of the GGUF and the 21 MB of extra training text (.xz files)
# A call carries at most 64 MiB with the working tree (~1.3 MB), so the 98 MB
# GGUF and 24 MB of text fit two calls made back to back while the machine is
# warm: gpu_check.sh keeps each call's part in /tmp and joins them. The folder
# is git-ignored, so the device call must name it in its carry list
# (carry: [".gpu_carry"]); the first call (BUILD=1) starts the build with the
# headers it brings.
#   bin: the executables TARGETS names (default: patch-train test_hybrid) of this
#      machine's CUDA build, and the libraries of this Debian the GPU machine has
#      in other versions (yaml-cpp, spdlog, fmt), for STAGE=prebuilt: no build
#      there, so a call spends its device time on the run
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
N=${1:?usage: gpu_carry.sh 1|2|bin}
if [[ $N == bin ]]; then
  BIN=${PATCH_BUILD_DIR:-build}/bin
  grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >>.git/info/exclude
  rm -rf .gpu_carry && mkdir -p .gpu_carry/bin .gpu_carry/lib
  for t in ${TARGETS:-patch-train test_hybrid}; do
    [[ -x $BIN/$t ]] || { echo "gpu_carry: $BIN/$t is missing (build it with CUDA first)" >&2; exit 1; }
    cp "$BIN/$t" .gpu_carry/bin/
    ldd "$BIN/$t" | awk '/lib(yaml-cpp|spdlog|fmt)\.so/ {print $3}' | xargs -r cp -L -t .gpu_carry/lib/
  done
  du -cb .gpu_carry/* | tail -1
  exit 0
fi
DATA=${PATCH_DATA_DIR:-$ROOT/../shared/data}
ASSETS=${PATCH_ASSETS_DIR:-$ROOT/data/assets}
GGUF=$ASSETS/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf
[[ -f $GGUF ]] || { echo "gpu_carry: $GGUF is missing (scripts/setup.sh fetches it)" >&2; exit 1; }
grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null || echo '/.gpu_carry/' >>.git/info/exclude
rm -rf .gpu_carry && mkdir -p .gpu_carry
FIRST=58600000
case $N in
  1)
    tar -cJf .gpu_carry/data1.tar.xz -C "$DATA" text/c4 text/wikitext-2-raw/wiki.test.raw \
      models/tinystories-656k models/stories260K text/tinystories/tinystories_validation_head.txt
    # liblzma's and zlib's headers, for a GPU machine without them (their libraries are there).
    mkdir -p .gpu_carry/lzma-include .gpu_carry/zlib-include
    cp -r /usr/include/lzma.h /usr/include/lzma .gpu_carry/lzma-include/
    cp /usr/include/zlib.h /usr/include/zconf.h .gpu_carry/zlib-include/
    # The CUTLASS headers (setup.sh fetches them), for the sparse GEMMs of bench-deploy.
    [[ -d $ASSETS/cutlass-4.2.0/include ]] && tar -cJf .gpu_carry/cutlass.assets.tar.xz -C "$ASSETS" cutlass-4.2.0
    # The PyTorch peer of the dense-step comparison (STAGE=profile-dense, STAGE=bench).
    cp "$ROOT/../shared/bench/py_patch_ref.py" .gpu_carry/
    head -c $FIRST "$GGUF" >.gpu_carry/smollm2.part.1
    ;;
  2)
    tar -cf .gpu_carry/data2.tar -C "$DATA" text/extra
    tail -c +$((FIRST + 1)) "$GGUF" >.gpu_carry/smollm2.part.2
    ;;
  *) echo "gpu_carry: N must be 1, 2 or bin" >&2; exit 1 ;;
esac
du -cb .gpu_carry/* | tail -1
