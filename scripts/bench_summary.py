#!/usr/bin/env python3
"""Reads `patch-train bench` JSON lines on stdin and prints each without its
"profile" (the per-kernel device times of bench.profile), which is appended,
as a table per step, to the file named by the first argument."""
import json
import sys

with open(sys.argv[1], "a") as table:
    for line in sys.stdin:
        row = json.loads(line)
        prof = row.pop("profile", None)
        print(json.dumps(row), flush=True)
        if prof is None:
            continue
        graph = " graph" if row.get("cuda_graph") else ""
        table.write(f"== {row.get('shape')} {row.get('mode')} {row.get('state', '')}{graph}: "
                    f"step {row['median_ms']:.1f} ms, kernels {prof['gpu_ms']:.1f} ms, "
                    f"device idle {prof['idle_ms']:.1f} of {prof['span_ms']:.1f} ms\n")
        for g in prof["gaps"]:
            table.write(f"  gap {g['ms']:6.2f} ms at {g['at_ms']:7.2f}: {g['before'][:50]} -> {g['after'][:50]}\n")
        for k in prof["kernels"]:
            table.write(f"{k['ms']:9.2f} ms {k['calls']:6d}  {k['name'][:110]}\n")
