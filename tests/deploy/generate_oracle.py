#!/usr/bin/env python3
"""`patch-train generate` against transformers: greedy tokens of the dense
model equal `generate(do_sample=False)` (one prompt, and a left-padded batch
of prompts of different lengths) on the bundled tiny models; greedy tokens
with --packed equal those with --masks; sampling is seeded; bad input is a
one-line error.

  generate_oracle.py --bin build/bin/patch-train --data ../shared/data --work DIR
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def run(args, *cmd):
    p = subprocess.run([args.bin, *cmd], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


def ours(args, out_dir, model, prompts_file, n, *extra):
    rc, out, err = run(args, "generate", "--model", model, "--prompts", prompts_file, "--max-new-tokens", str(n),
                       "--out", out_dir, "--set", "model.device=cpu", *extra)
    if rc != 0:
        return None, err
    rows = [json.loads(l) for l in open(os.path.join(out_dir, "generations.jsonl"))]
    return rows, err


def hf_greedy(model_dir, prompts, n, batched):
    kw = {}
    if model_dir.endswith(".gguf"):  # transformers reads (and dequantizes) the GGUF itself
        kw = {"gguf_file": os.path.basename(model_dir)}
        model_dir = os.path.dirname(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, **kw).eval()
    eos = model.generation_config.eos_token_id
    results = []
    with torch.no_grad():
        if batched:
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            enc = tok(prompts, return_tensors="pt", padding=True)
            out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
            for i in range(len(prompts)):
                new = out[i, enc["input_ids"].shape[1]:].tolist()
                results.append(new)
        else:
            for p in prompts:
                enc = tok(p, return_tensors="pt")
                out = model.generate(**enc, max_new_tokens=n, do_sample=False,
                                     pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eos)
                results.append(out[0, enc["input_ids"].shape[1]:].tolist())
    # Ours stops a sequence after its end-of-sequence token; transformers pads after it.
    eos_ids = eos if isinstance(eos, list) else [eos]
    cut = []
    for r in results:
        for j, t in enumerate(r):
            if t in eos_ids:
                r = r[: j + 1]
                break
        cut.append(r)
    return cut


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--assets", default="", help="data/assets (SmolLM2-135M's GGUF), if fetched")
    args = ap.parse_args()
    w = args.work
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    toy = os.path.join(args.data, "models", "tinystories-656k")
    rnd = os.path.join(args.data, "models", "llama-2-tiny-random", "llama-2-tiny-random.gguf")
    prompts = ["Once upon a time", "The little dog wanted to play with the big red ball, but",
               "Lily and Ben went to the park. They saw a"]
    pfile = os.path.join(w, "prompts.txt")
    open(pfile, "w").write("\n".join(prompts) + "\n")
    one = os.path.join(w, "one.txt")
    open(one, "w").write(prompts[1] + "\n")

    for name, model, n in [("tinystories-656k", toy, 48), ("llama-2-tiny-random", rnd, 24)]:
        got, err = ours(args, os.path.join(w, name + "-one"), model, one, n)
        want = hf_greedy(model, [prompts[1]], n, batched=False)
        check(got is not None and got[0]["new_ids"] == want[0],
              f"{name}: greedy tokens of one prompt equal transformers' ({err.strip()[-200:]})")
        got, err = ours(args, os.path.join(w, name + "-batch"), model, pfile, n)
        want = hf_greedy(model, prompts, n, batched=True)
        check(got is not None and [g["new_ids"] for g in got] == want,
              f"{name}: a left-padded batch of 3 prompts equals transformers' batch ({err.strip()[-200:]})")
        if got is not None:
            alone = hf_greedy(model, prompts, n, batched=False)
            check([g["new_ids"] for g in got] == alone, f"{name}: each sequence of the batch equals it alone")

    # The real model from its Q4_1 GGUF, which transformers dequantizes itself.
    smol = os.path.join(args.assets, "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf")
    if args.assets and os.path.exists(smol):
        sp = os.path.join(w, "smol.txt")
        smol_prompts = ["The capital of France is", "Once upon a time, there was a"]
        open(sp, "w").write("\n".join(smol_prompts) + "\n")
        got, err = ours(args, os.path.join(w, "smollm2"), smol, sp, 24)
        want = hf_greedy(smol, smol_prompts, 24, batched=True)
        check(got is not None and [g["new_ids"] for g in got] == want,
              f"SmolLM2-135M: a left-padded batch of 2 prompts equals transformers' ({err.strip()[-200:]})")
    else:
        print(f"skipped: SmolLM2-135M ({smol} absent; scripts/setup.sh fetches it)")

    # --packed and --masks give the same greedy tokens (CPU: both compute W * M).
    train = os.path.join(args.data, "text", "tinystories", "tinystories_train_first2MiB.txt")
    rc, out, err = run(args, "prune", "--model", toy, "--data", train, "--method", "wanda", "--pattern", "hybrid",
                       "--target", "0.35", "--set", "mask.tile=[32,32]", "--set", "prune.calib_samples=16",
                       "--set", "prune.calib_seq_len=256", "--set", "data.document_separator=<|endoftext|>",
                       "--out", os.path.join(w, "prune"))
    check(rc == 0, f"prune for the masked rows ({err.strip()[-200:]})")
    masks = os.path.join(w, "prune", "masks.safetensors")
    rc, out, err = run(args, "pack", "--model", toy, "--masks", masks, "--out", os.path.join(w, "pack"))
    m, e1 = ours(args, os.path.join(w, "masked"), toy, pfile, 32, "--masks", masks)
    p, e2 = ours(args, os.path.join(w, "packed"), toy, pfile, 32, "--packed", os.path.join(w, "pack", "packed.safetensors"))
    check(m is not None and p is not None and [r["new_ids"] for r in m] == [r["new_ids"] for r in p],
          f"greedy tokens with --packed equal those with --masks ({e1[-200:]}{e2[-200:]})")
    d, _ = ours(args, os.path.join(w, "dense"), toy, pfile, 32)
    check(d is not None and m is not None and [r["new_ids"] for r in d] != [r["new_ids"] for r in m],
          "the masked model generates other tokens than the dense one (the masks are applied)")

    # Sampling: seeded and reproducible, and different from greedy.
    s1, _ = ours(args, os.path.join(w, "s1"), toy, pfile, 32, "--set", "generate.temperature=0.9",
                 "--set", "generate.top_k=40", "--set", "generate.top_p=0.95", "--set", "generate.seed=3")
    s2, _ = ours(args, os.path.join(w, "s2"), toy, pfile, 32, "--set", "generate.temperature=0.9",
                 "--set", "generate.top_k=40", "--set", "generate.top_p=0.95", "--set", "generate.seed=3")
    s3, _ = ours(args, os.path.join(w, "s3"), toy, pfile, 32, "--set", "generate.temperature=0.9",
                 "--set", "generate.top_k=40", "--set", "generate.top_p=0.95", "--set", "generate.seed=4")
    ok = s1 is not None and s2 is not None and s3 is not None
    check(ok and [r["new_ids"] for r in s1] == [r["new_ids"] for r in s2], "the same seed samples the same tokens")
    check(ok and [r["new_ids"] for r in s1] != [r["new_ids"] for r in s3], "another seed samples other tokens")

    # The stats line.
    rc, out, err = run(args, "generate", "--model", toy, "--prompt", "Once upon a time", "--max-new-tokens", "8",
                       "--set", "model.device=cpu")
    stats = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
    check(rc == 0 and stats.get("prompts") == 1 and stats.get("prompt_tokens", 0) > 0 and "prefill_ms" in stats and
          "decode_tokens_per_s" in stats and out.startswith("Once upon a time"),
          f"the text, then one JSON line of timings ({stats})")

    # Bad input: one line, non-zero exit.
    def refused(label, needle, *cmd):
        rc, out, err = run(args, "generate", *cmd)
        lines = [l for l in err.strip().splitlines() if l.strip()]
        check(rc != 0 and len(lines) == 1 and needle in lines[0], f"{label}: one-line error naming '{needle}' ({err.strip()})")

    empty = os.path.join(w, "empty.txt")
    open(empty, "w").write("\n\n")
    refused("empty prompt file", "holds no prompt", "--model", toy, "--prompts", empty)
    refused("beyond the context", "context", "--model", toy, "--prompt", "Once", "--max-new-tokens", "600")
    refused("no prompt", "generate.prompt", "--model", toy)
    other = os.path.join(w, "other")
    rc, _, _ = run(args, "prune", "--model", rnd, "--method", "magnitude", "--pattern", "hybrid", "--target", "0.35",
                   "--set", "mask.tile=[16,16]", "--out", other)
    run(args, "pack", "--model", rnd, "--masks", os.path.join(other, "masks.safetensors"), "--out", other + "-pack")
    refused("a packed file of another model", "packed.safetensors", "--model", toy, "--prompt", "Once",
            "--packed", os.path.join(other + "-pack", "packed.safetensors"))

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
