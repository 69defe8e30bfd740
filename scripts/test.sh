#!/usr/bin/env bash
# Runs the test suite of a build made by scripts/setup.sh; extra arguments go
# to ctest (e.g. -R config, -L gpu).
#   scripts/test.sh            the whole suite (what CI runs): about 20 minutes
#                              on 2 cores (211 tests)
#   scripts/test.sh --quick    for development: the same minus the slowest
#                              tests (real-model oracles, interrupt/resume,
#                              sweeps, multi-rank), about 2 minutes on 2 cores
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${PATCH_BUILD_DIR:-build}
args=()
if [[ ${1:-} == --quick ]]; then
  shift
  # Each of these takes 20 s to 150 s on 2 cores; the rest take seconds.
  SLOW='smollm2|test_train:a run stopped|test_train:two |test_train:compact state|test_train:training lowers'
  SLOW+='|test_sweep:|test_prune:prune_model|test_hybrid:patch-train pack|test_golden:'
  args=(-E "$SLOW")
fi
exec ctest --test-dir "$ROOT/$BUILD_DIR" --output-on-failure -j "${PATCH_TEST_JOBS:-2}" "${args[@]}" "$@"
