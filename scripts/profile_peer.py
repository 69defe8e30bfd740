#!/usr/bin/env python3
"""Where the PyTorch peer's dense step spends its device time, in the shape of
`patch-train bench --set bench.profile=true` (one JSON line with "profile":
gpu_ms, span_ms, idle_ms and the kernels by total time), so that
scripts/profile_compare.py can put the two steps side by side.

  python3 scripts/profile_peer.py --ref ../shared/bench/py_patch_ref.py --arch llama-3.2-1b --ckpt

The step is the peer's own dense_fwd_bwd step (its model, its loss, weight
gradients of every linear), profiled once after --warmup steps; it is timed
first over --steps steps as the peer times it. Not a test: a benchmark."""
import argparse
import importlib.util
import json
import time

import torch


def load_peer(path):
    spec = importlib.util.spec_from_file_location("py_patch_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def kernel_profile(step, top):
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    spans = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda s: s[0])
    if not spans:
        raise SystemExit("profile_peer: the profiler saw no kernel")
    by_name, idle, busy_end = {}, 0.0, spans[0][1]
    for start, end, name in spans:
        calls, ms = by_name.get(name, (0, 0.0))
        by_name[name] = (calls + 1, ms + (end - start) / 1e3)  # time_range is in microseconds
        if start > busy_end:
            idle += start - busy_end
        busy_end = max(busy_end, end)
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])
    return {"gpu_ms": sum(ms for _, (_, ms) in rows), "span_ms": (busy_end - spans[0][0]) / 1e3,
            "idle_ms": idle / 1e3, "gaps": [],
            "kernels": [{"name": n[:160], "calls": c, "ms": ms} for n, (c, ms) in rows[:top]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="the peer, py_patch_ref.py")
    ap.add_argument("--arch", default="llama-3.2-1b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args()
    peer = load_peer(a.ref)
    torch.manual_seed(0)
    model = peer.build(a.arch, 0)
    if a.ckpt:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    lins = peer.linears(model)
    for lin in lins:
        lin.weight.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device="cuda")

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        for lin in lins:
            lin.weight.grad = None

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    row = {"impl": "pytorch-peer", "mode": "dense_fwd_bwd", "shape": a.arch, "batch": a.batch, "seq": a.seq,
           "checkpointing": a.ckpt, "median_ms": times[len(times) // 2], "min_ms": times[0],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu": torch.cuda.get_device_name(),
           "profile": kernel_profile(step, a.top)}
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
