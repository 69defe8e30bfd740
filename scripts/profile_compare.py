#!/usr/bin/env python3
"""Two dense steps' device time side by side, by kind of kernel: ours
(`patch-train bench --mode dense --set bench.profile=true`, a JSON line) and
the PyTorch peer's (scripts/profile_peer.py). Kernel names are grouped by
what they do (matrix products, attention, the loss, reductions, element-wise
work, copies); "unlisted" is the device time of the kernels past each
profile's top rows.

  python3 scripts/profile_compare.py ours.jsonl peer.jsonl [--shape llama-3.2-1b]"""
import argparse
import json
import re

KINDS = [
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|wgmma|sm90_|sm80_"),
    ("attention", r"flash|fmha|attention|sdpa|efficient_attention"),
    ("loss (softmax, nll)", r"softmax|nll|cross_entropy|logsumexp"),
    ("reduction", r"reduce|norm"),
    ("copy / cat / index", r"copy|cat|index|gather|scatter|embedding|fill"),
    ("element-wise", r"elementwise|vectorized|unrolled|pointwise|launch_kernel"),
]


def kind_of(name):
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def load(path, shape):
    for line in open(path):
        line = line.strip()
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        if "profile" in row and row.get("mode") == "dense_fwd_bwd" and (shape is None or row.get("shape") == shape):
            return row
    raise SystemExit(f"profile_compare: {path}: no dense_fwd_bwd line with a profile" +
                     (f" for {shape}" if shape else ""))


def by_kind(prof):
    out = {}
    for k in prof["kernels"]:
        kind = kind_of(k["name"])
        out[kind] = out.get(kind, 0.0) + k["ms"]
    out["unlisted"] = prof["gpu_ms"] - sum(out.values())
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ours")
    ap.add_argument("peer")
    ap.add_argument("--shape")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    ours, peer = load(a.ours, a.shape), load(a.peer, a.shape)
    ko, kp = by_kind(ours["profile"]), by_kind(peer["profile"])
    print(f"step: ours {ours['median_ms']:.1f} ms, peer {peer['median_ms']:.1f} ms "
          f"(ratio {ours['median_ms'] / peer['median_ms']:.3f}); peak ours {ours.get('peak_gib', 0):.1f} GiB, "
          f"peer {peer.get('peak_gib', 0):.1f} GiB")
    for name, row in (("ours", ours), ("peer", peer)):
        p = row["profile"]
        print(f"{name}: kernels {p['gpu_ms']:.1f} ms, device idle {p['idle_ms']:.1f} of {p['span_ms']:.1f} ms")
    print(f"{'kind':24s} {'ours ms':>9s} {'peer ms':>9s} {'ours - peer':>12s}")
    for kind in [k for k, _ in KINDS] + ["other", "unlisted"]:
        o, p = ko.get(kind, 0.0), kp.get(kind, 0.0)
        if o or p:
            print(f"{kind:24s} {o:9.2f} {p:9.2f} {o - p:12.2f}")
    for name, row in (("ours", ours), ("peer", peer)):
        print(f"-- {name}: top kernels")
        for k in row["profile"]["kernels"][:a.top]:
            print(f"{k['ms']:9.2f} ms {k['calls']:6d}  [{kind_of(k['name'])}] {k['name'][:100]}")


if __name__ == "__main__":
    main()
