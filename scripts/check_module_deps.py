#!/usr/bin/env python3
"""Each lib/ module's CMake dependencies are exactly the modules its sources
include, and they point one way (DESIGN order: core < dist < config < io <
text < data < model < sparsity < maskfile < prune < deploy < eval < train <
sweep). Prints every mismatch; exit 1 when there is one.
  scripts/check_module_deps.py [ROOT]"""
import pathlib
import re
import sys

ORDER = ["core", "dist", "config", "io", "text", "data", "model", "sparsity", "maskfile", "prune", "deploy",
         "eval", "train", "sweep"]
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent)
problems = []
for m in ORDER:
    d = root / "lib" / m
    cmake = (d / "CMakeLists.txt").read_text()
    block = cmake[cmake.index("patch_add_module"):]
    block = block[:block.index(")\n") + 1] if ")\n" in block else block
    declared = set(re.findall(r"patch::([a-z]+)", block))
    included = set()
    for f in list(d.glob("*.h")) + list(d.glob("*.cpp")) + list(d.glob("*.cu")):
        for inc in re.findall(r'#include "([a-z_]+)/', f.read_text()):
            if inc in ORDER and inc != m:
                included.add(inc)
    if declared != included:
        if included - declared:
            problems.append(f"lib/{m}: includes {sorted(included - declared)} without declaring them")
        if declared - included:
            problems.append(f"lib/{m}: declares {sorted(declared - included)} but includes none of their headers")
    later = [x for x in included | declared if ORDER.index(x) > ORDER.index(m)]
    if later:
        problems.append(f"lib/{m}: depends on later modules {sorted(later)}")
for p in problems:
    print(p)
print(f"{len(problems)} problem(s)")
sys.exit(1 if problems else 0)
