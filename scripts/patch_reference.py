#!/usr/bin/env python3
"""A plain PyTorch reference of PATCH's mask-learning step (Hourri, Mozaffari,
Mehri Dehnavi, arXiv 2509.23410), the oracle of tests/train/test_golden.cpp.

Written from the paper's definitions, not from our C++ code (which it never
calls). For every masked linear W [out, in] of the model:

  2:4 choice   one logit per pattern and group of four consecutive inputs,
               l24 [out, in/4, 6] (pattern k keeps positions PATTERNS[k]);
               p = softmax((scale_24 * l24 + g) / tau_24), g ~ Gumbel(0, 1);
               M24 = sum_k p_k * pattern_k                           [out, in]
  tile choice  one logit per tile, lt [rows, cols]; a two-way Gumbel-softmax
               between "dense" (logit scale_tile * lt) and "2:4" (logit 0):
               T = softmax(([scale_tile * lt, 0] + [g_dense, g_sparse]) / tau_tile)[dense]
  mask         M = T + (1 - T) * M24 (T spread over its tile's weights)
  loss         CE(model with every W replaced by W * M)
               + lambda_sparsity * |density - target_density|,
               density = sum of M over all masked weights / their number;
               with the per-block budget, the sum over decoder blocks of
               |block density - target_density| instead
  hard         straight-through samples (torch's gumbel_softmax(hard=True)):
               the forward value is the one-hot argmax of the soft sample,
               the gradient that of the soft sample

Modes: joint (both learned), tile (M24 a fixed 0/1 pattern from a prior, only
the tile logits learn), maskllm (no tiles, M = M24, only the 2:4 logits learn).

Everything random or scheduled comes in from --in, so both sides see the same
numbers: the logits of each step (our optimizer's result for steps after the
first, so no optimizer is needed here), the Gumbel noise of each step, the
token batch and the step's scale and temperature values. The tile noise comes
in as one Logistic(0, 1) draw per tile, n = g_dense - g_sparse: a two-way
softmax depends on its two Gumbels only through their difference, so it is
used as g_dense = n, g_sparse = 0.

--in (safetensors; metadata "format" = "patch-golden-step", JSON values):
  metadata   mode, layers (names in module order), tile [rows, cols], steps,
             lambda_sparsity, target_density, model (a Hugging Face checkpoint);
             optionally hard_24, hard_tile (default false), budget ("global",
             the default, or "per_block")
  step{s}/ids                       int64 [batch, seq + 1] (next-token CE of ids[:, :-1] -> ids[:, 1:])
  step{s}/schedule                  float64 [4]: scale_24, tau_24, scale_tile, tau_tile
  step{s}/{layer}/tile_logits       [rows, cols]        (joint, tile)
  step{s}/{layer}/pattern_logits    [out, in/4, 6]      (joint, maskllm)
  step{s}/{layer}/logistic          [rows, cols]        (joint, tile)
  step{s}/{layer}/gumbel            [out, in/4, 6]      (joint, maskllm)
  {layer}/fixed_pattern             uint8 [out, in/4]   (tile)
  (other tensors, such as the caller's own results, are ignored)

--out (safetensors), for each step s:
  step{s}/loss, step{s}/ce, step{s}/density               float64 scalars
  step{s}/{layer}/tile_logits.grad, .../pattern_logits.grad   the learned logits' gradients
and under control/ the same computed with the noise of step (s + 1) % steps:
what a step keyed to the wrong noise would give (the test's negative control).
"""
import argparse
import json
import re
import sys

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# Kept positions of the six 2:4 patterns, in the order of the public PATCH and
# MaskLLM code (patch/learnable_mask.py's mask_choices).
PATTERNS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def pattern_table(dtype):
    table = torch.zeros(6, 4, dtype=dtype)
    for k, kept in enumerate(PATTERNS):
        table[k, list(kept)] = 1
    return table


def spread(tiles, tile_rows, tile_cols, out, inp):
    """Per-tile values [rows, cols] -> per-weight [out, in]; edge tiles may be smaller."""
    return tiles.repeat_interleave(tile_rows, 0)[:out].repeat_interleave(tile_cols, 1)[:, :inp]


def gumbel_softmax(noisy_logits, tau, hard):
    """softmax(noisy_logits / tau) over the last dimension; straight-through one-hot when hard."""
    soft = torch.softmax(noisy_logits / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return one_hot - soft.detach() + soft


def mask_of(mode, weight, tile, sched, hard, tile_logits, pattern_logits, fixed_pattern, logistic,
            gumbel, dtype):
    """The sampled mask M [out, in] of one layer (differentiable in the logits)."""
    out, inp = weight.shape
    scale_24, tau_24, scale_tile, tau_tile = sched
    table = pattern_table(dtype)
    if mode == "tile":
        m24 = table[fixed_pattern.long()].reshape(out, inp)
    else:
        p = gumbel_softmax(scale_24 * pattern_logits + gumbel, tau_24, hard[0])
        m24 = (p @ table).reshape(out, inp)
    if mode == "maskllm":
        return m24
    two_way = torch.stack([scale_tile * tile_logits + logistic, torch.zeros_like(tile_logits)], dim=-1)
    t = gumbel_softmax(two_way, tau_tile, hard[1])[..., 0]
    t = spread(t, tile[0], tile[1], out, inp)
    return t + (1 - t) * m24


def load_model(path, dtype):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    model.eval()  # no dropout; gradients still flow
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def block_of(name):
    """Decoder block of a Hugging Face layer name ("model.layers.7.mlp.up_proj" -> 7)."""
    found = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    return int(found.group(1)) if found else -1


def step_reference(model, meta, tensors, s, noise_step, dtype):
    """Loss terms and logit gradients of step s, with the noise of step noise_step."""
    mode, layers, tile = meta["mode"], meta["layers"], meta["tile"]
    hard = (bool(meta.get("hard_24", False)), bool(meta.get("hard_tile", False)))
    sched = [float(v) for v in tensors[f"step{s}/schedule"]]
    weights = dict(model.named_parameters())
    leaves, masked = {}, {}
    kept, total = {}, {}  # per decoder block: sum of M, weights
    for name in layers:
        w = weights[name + ".weight"].detach()
        tl = pl = fp = lg = gb = None
        if mode != "maskllm":
            tl = tensors[f"step{s}/{name}/tile_logits"].to(dtype).requires_grad_(True)
            lg = tensors[f"step{noise_step}/{name}/logistic"].to(dtype)
            leaves[f"{name}/tile_logits"] = tl
        if mode != "tile":
            pl = tensors[f"step{s}/{name}/pattern_logits"].to(dtype).requires_grad_(True)
            gb = tensors[f"step{noise_step}/{name}/gumbel"].to(dtype)
            leaves[f"{name}/pattern_logits"] = pl
        else:
            fp = tensors[f"{name}/fixed_pattern"]
        m = mask_of(mode, w, tile, sched, hard, tl, pl, fp, lg, gb, dtype)
        masked[name + ".weight"] = w * m
        b = block_of(name)
        kept[b] = kept.get(b, 0.0) + m.sum(dtype=torch.float64)  # a sum of ~10^5 values
        total[b] = total.get(b, 0) + m.numel()
    ids = tensors[f"step{s}/ids"].long()
    logits = torch.func.functional_call(model, masked, (ids[:, :-1],)).logits
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    target = meta["target_density"]
    density = sum(kept.values()) / sum(total.values())
    if meta.get("budget", "global") == "per_block":
        reg = sum((kept[b] / total[b] - target).abs() for b in kept)
    else:
        reg = (density - target).abs()
    loss = ce + meta["lambda_sparsity"] * reg
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    out = {"loss": loss.detach(), "ce": ce.detach(), "density": density.detach()}
    for n, g in zip(names, grads):
        out[n + ".grad"] = torch.zeros_like(leaves[n]) if g is None else g
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="inp", required=True, help="the step file our side wrote")
    ap.add_argument("--out", required=True, help="where the reference results go")
    ap.add_argument("--model", help="Hugging Face checkpoint (default: the input's metadata)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="arithmetic of the reference (the model's weights are upcast for float64)")
    args = ap.parse_args()

    with safe_open(args.inp, "pt") as f:
        raw = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if raw.get("format") != "patch-golden-step":
        sys.exit(f"{args.inp}: not a patch-golden-step file")
    meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    if meta["mode"] not in ("joint", "tile", "maskllm"):
        sys.exit(f"{args.inp}: unknown mode {meta['mode']!r}")
    dtype = getattr(torch, args.dtype)
    model = load_model(args.model or meta["model"], dtype)

    steps = int(meta["steps"])
    result = {}
    for s in range(steps):
        for prefix, noise_step in (("", s), ("control/", (s + 1) % steps)):
            for k, v in step_reference(model, meta, tensors, s, noise_step, dtype).items():
                t = v.detach().to(torch.float64 if v.dim() == 0 else torch.float32).contiguous()
                result[f"{prefix}step{s}/{k}"] = t
    save_file(result, args.out, metadata={"format": "patch-golden-reference", "dtype": args.dtype})


if __name__ == "__main__":
    main()
