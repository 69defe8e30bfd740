#!/usr/bin/env python3
"""A plain PyTorch reference of the sparse fine-tune (`prune --masks F --set
prune.finetune_steps=N`), the oracle of tests/train/test_finetune.cpp.

Written from the definition, not from our C++ code (which it never calls):
the model is loaded by transformers; every masked linear's weight becomes
W' * keep through torch's parametrization, W' starting at W * keep; only the
W' train, with torch.optim.AdamW (betas 0.9/0.999, eps 1e-8, no weight
decay) on the language-model loss of transformers (mean next-token
cross-entropy over the batch), at lr * min(1, (step + 1) / warmup).

--in (safetensors; metadata "format" = "patch-finetune-input", JSON values):
  metadata   model (checkpoint directory), steps, lr, warmup
  ids        int64 [n, seq]: every step's batch (all n windows)
  <layer>.keep  float32 [out, in]: 1 kept, 0 removed
--out (safetensors): losses float64 [steps] and <layer>.weight, W' * keep
after the last step (float32)."""
import argparse
import json

import torch
import torch.nn.utils.parametrize as parametrize
from safetensors import safe_open
from safetensors.torch import save_file


class Keep(torch.nn.Module):
    def __init__(self, keep):
        super().__init__()
        self.register_buffer("keep", keep)

    def forward(self, w):
        return w * self.keep


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="inp", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with safe_open(args.inp, "pt") as f:
        meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items() if k != "format"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(meta["model"], torch_dtype=torch.float32)
    model.eval()  # no dropout
    for p in model.parameters():
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    params, layers = [], []
    for key, keep in tensors.items():
        if not key.endswith(".keep"):
            continue
        name = key[:-len(".keep")]
        lin = modules[name]
        with torch.no_grad():
            lin.weight.mul_(keep)
        parametrize.register_parametrization(lin, "weight", Keep(keep))
        original = lin.parametrizations.weight.original
        original.requires_grad_(True)
        params.append(original)
        layers.append((name, lin))
    opt = torch.optim.AdamW(params, lr=meta["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = tensors["ids"].long()
    losses = []
    for step in range(meta["steps"]):
        for g in opt.param_groups:
            g["lr"] = meta["lr"] * min(1.0, (step + 1) / meta["warmup"])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    out = {"losses": torch.tensor(losses, dtype=torch.float64)}
    with torch.no_grad():
        for name, lin in layers:
            out[name + ".weight"] = lin.weight.detach().contiguous()  # W' * keep
    save_file(out, args.out, metadata={"format": "patch-finetune-reference"})


if __name__ == "__main__":
    main()
