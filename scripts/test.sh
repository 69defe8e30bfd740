#!/usr/bin/env bash
# Runs the whole test suite of a build made by scripts/setup.sh; extra
# arguments go to ctest (e.g. -R config, -L gpu).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${PATCH_BUILD_DIR:-build}
exec ctest --test-dir "$ROOT/$BUILD_DIR" --output-on-failure -j "${PATCH_TEST_JOBS:-2}" "$@"
