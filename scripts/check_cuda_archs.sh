#!/usr/bin/env bash
# Lists the GPU code a binary carries (cuobjdump) and checks that every
# architecture of the build's list is there: SASS for sm_NN entries, PTX for
# NN-virtual ones. Used by CTest in a CUDA build.
#   scripts/check_cuda_archs.sh "80;86;89;90a" build/bin/patch-train
set -euo pipefail
ARCHS=$1
BIN=$2
# cuobjdump comes with the CUDA toolkit, or with torch's triton package.
OBJDUMP=$(command -v cuobjdump || true)
if [[ -z $OBJDUMP && -n ${PATCH_PYTHON:-} ]]; then
  OBJDUMP=$("$PATCH_PYTHON" -c 'import os, triton; print(os.path.dirname(triton.__file__) + "/backends/nvidia/bin/cuobjdump")' 2>/dev/null || true)
fi
[[ -n $OBJDUMP && -x $OBJDUMP ]] || { echo "SKIPPED: no cuobjdump (CUDA toolkit or triton)"; exit 0; }
elf=$("$OBJDUMP" --list-elf "$BIN" 2>/dev/null || true)
ptx=$("$OBJDUMP" --list-ptx "$BIN" 2>/dev/null || true)
status=0
IFS=';' read -ra list <<<"$ARCHS"
for a in "${list[@]}"; do
  base=${a%-real}
  base=${base%-virtual}
  if [[ $a == *-virtual ]]; then
    grep -q "sm_${base}\.ptx\|compute_${base}" <<<"$ptx" && echo "PTX  compute_$base: present" ||
      { echo "PTX  compute_$base: MISSING"; status=1; }
  else
    # cuobjdump names an sm_90a cubin sm_90.
    grep -qE "\.sm_${base%a}a?\.cubin" <<<"$elf" && echo "SASS sm_$base: present" ||
      { echo "SASS sm_$base: MISSING"; status=1; }
  fi
done
exit $status
