#!/usr/bin/env python3
"""Logits of a Hugging Face checkpoint directory for given token ids, with transformers
(float32, CPU): the oracle for checkpoints that patch-train exports.

  hf_logits.py --model DIR --ids 1,5,9 --out logits.json   -> {"logits": [[...], ...]}
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[int(x) for x in args.ids.split(",")]])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    with open(args.out, "w") as f:
        json.dump({"logits": logits.tolist()}, f)


if __name__ == "__main__":
    main()
