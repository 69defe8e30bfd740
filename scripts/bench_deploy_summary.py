#!/usr/bin/env python3
"""Prints `patch-train bench-deploy` JSON lines as one table row per layer shape,
block and model: cuBLAS time -> hybrid time (speedup), for a layer also its device
memory over a dense layer's, for each file side by side.

usage: bench_deploy_summary.py [LABEL=]FILE [[LABEL=]FILE ...]

Rows present in only some files show "-" for the others, so two builds' runs
(e.g. gpu_check.sh STAGE=deploy with BASE=...) compare line by line."""
import json
import sys


def key(row):
    bench = row["bench"]
    if bench == "deploy_layer":
        what = row["layers"]
    elif bench == "deploy_block":
        what = "block"
    elif bench == "deploy_model":
        what = "end to end"
    elif bench == "deploy_generate":
        what = f"generate, batch {row['batch']}"
    elif bench == "deploy_sparse_gemm":  # a 2:4 layer: sparsity 0.5
        return (row["shape"], 0.5, row["tokens"], f"{row['layers']} {row['kernel']}")
    elif bench in ("deploy_hybrid_gemm", "deploy_split_hybrid"):  # the latter: older runs
        what = f"{row['layers']} {row.get('kernel', 'split')} kernel"
    else:
        return None
    return (row["shape"], row["target_sparsity"], row.get("tokens", 0), what)


def cell(row):
    if row["bench"] == "deploy_model":
        return (f"decode {row['dense_decode_tokens_per_s']:.0f} -> "
                f"{row['hybrid_decode_tokens_per_s']:.0f} tok/s ({row['decode_speedup']:.2f}x), "
                f"prefill {row['prefill_tokens']} {row['dense_prefill_ms']:.1f} -> "
                f"{row['hybrid_prefill_ms']:.1f} ms ({row['prefill_speedup']:.2f}x)")
    if row["bench"] == "deploy_generate":
        return (f"decode {row['dense_decode_tokens_per_s']:.0f} -> "
                f"{row['hybrid_decode_tokens_per_s']:.0f} tok/s ({row['decode_speedup']:.2f}x), "
                f"prefill {row['prompt_tokens']} {row['dense_prefill_ms']:.1f} -> "
                f"{row['hybrid_prefill_ms']:.1f} ms ({row['prefill_speedup']:.2f}x)")
    if row["bench"] == "deploy_sparse_gemm":
        if "error" in row:
            return f"refused: {row['error'][:60]}"
        return (f"{row['dense_us']:8.1f} -> {row['sparse_us']:8.1f} us (s = {row['s']:.2f}) "
                f"mem {row['device_bytes_ratio']:.2f}")
    if row["bench"] in ("deploy_hybrid_gemm", "deploy_split_hybrid"):
        if "error" in row:
            return f"refused: {row['error'][:60]}"
        us = row.get("hybrid_us", row.get("split_us"))
        return (f"{row['dense_us']:8.1f} -> {us:8.1f} us ({row['speedup']:.2f}x) "
                f"mem {row['device_bytes_ratio']:.2f}")
    text = f"{row['dense_us']:8.1f} -> {row['hybrid_us']:8.1f} us ({row['speedup']:.2f}x)"
    if row["bench"] == "deploy_layer":  # older runs lack the memory
        mem = row.get("device_bytes_ratio")
        text += f" mem {mem:.2f}" if mem is not None else " " * 9
    return text


def main(args):
    if not args:
        sys.exit(__doc__)
    runs = []
    for arg in args:
        label, _, path = arg.rpartition("=")
        rows = {}
        try:
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if not line.startswith("{"):
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        sys.exit(f"{path}:{n}: not a JSON line ({e})")
                    k = key(row)
                    if k is not None:
                        rows[k] = row
        except OSError as e:
            sys.exit(f"{path}: {e.strerror}")
        runs.append((label or path, rows))
    # First appearance across the files keeps bench-deploy's layer order (stable sort).
    order = sorted(dict.fromkeys(k for _, rows in runs for k in rows), key=lambda k: k[:3])
    if len(runs) > 1:
        print("columns: " + " | ".join(label for label, _ in runs))
    for k in order:
        shape, sparsity, tokens, what = k
        whole = what == "end to end" or what.startswith("generate")
        head = f"{shape:13} {sparsity:<5} {'' if whole else tokens:>5} {what[:44]:44}"
        print(head + " | ".join(cell(rows[k]) if k in rows else "-" for _, rows in runs))


if __name__ == "__main__":
    main(sys.argv[1:])
