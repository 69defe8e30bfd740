#!/usr/bin/env python3
"""Reference perplexity with Hugging Face transformers, by patch-train eval's protocol:
the whole text tokenized as one string without special tokens, cut into consecutive
non-overlapping windows of --seq-len tokens (the first --max-windows kept), the loss
averaged over every next-token prediction inside the windows. --tokenizer-gguf FILE takes
the tokenizer from a GGUF file (transformers' GGUF reader) for a --model folder that has
none, as patch-train writes for a GGUF input."""
import argparse
import json
import math
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-windows", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-gguf", default="")
    args = ap.parse_args()

    if args.tokenizer_gguf:
        g = os.path.abspath(args.tokenizer_gguf)
        tok = AutoTokenizer.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g))
    else:
        tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    model.eval()
    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // args.seq_len
    if args.max_windows:
        n = min(n, args.max_windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            x = torch.tensor(ids[w * args.seq_len:(w + 1) * args.seq_len]).unsqueeze(0)
            logits = model(x).logits.float()
            logp = torch.log_softmax(logits[0, :-1], dim=-1)
            nll -= logp.gather(-1, x[0, 1:].unsqueeze(-1)).sum().item()
            count += args.seq_len - 1
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"perplexity": math.exp(nll / count), "predictions": count, "windows": n,
                   "tokens": len(ids)}, f)


if __name__ == "__main__":
    main()
