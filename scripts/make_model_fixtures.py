#!/usr/bin/env python3
"""Oracle fixtures for tests/model: tiny random Hugging Face checkpoints of each
supported architecture plus transformers' fp32 CPU logits and loss on fixed ids.

Writes into --out:
  <name>/                      a save_pretrained checkpoint (safetensors)
  oracles/<name>.safetensors   ids [2, 24] int64, logits [2, 24, vocab] fp32,
                               loss (transformers' causal-LM loss, fp32 scalar)
  oracles/tinystories-656k.safetensors   the same for the shared real model

config.json is rewritten in the Hugging Face Hub format (rope_theta and
rope_scaling at top level) that released checkpoints use, since transformers 5
writes a nested rope_parameters instead; the oracle model is reloaded from the
written directory so it reflects exactly what is on disk.
"""
import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

SEQ = 24
BATCH = 2
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def specs():
    """name -> (config class, config kwargs, rope_theta, rope_scaling, save kwargs, save dtype)."""
    return {
        # theta 10000 with head_dim 16 puts llama3's rotary frequencies in all three
        # bands (kept, smoothed, divided by factor) for original_max_position 64.
        "llama3": ("LlamaConfig", dict(TINY, tie_word_embeddings=False), 10000.0, LLAMA3_SCALING, {}, None),
        # LLaMA-2 style: multi-head attention (kv heads == heads), tied head.
        "llama_tied": ("LlamaConfig", dict(TINY, num_key_value_heads=4, tie_word_embeddings=True,
                                           rms_norm_eps=1e-5), 10000.0, None, {}, None),
        "mistral": ("MistralConfig", dict(TINY, sliding_window=4096, tie_word_embeddings=False,
                                          head_dim=16), 1000000.0, None, {}, None),
        "qwen2": ("Qwen2Config", dict(TINY, tie_word_embeddings=True), 1000000.0, None, {}, None),
        # head_dim * heads (128) != hidden (64), as in the real Qwen3 models.
        "qwen3": ("Qwen3Config", dict(TINY, head_dim=32, tie_word_embeddings=True), 1000000.0, None, {}, None),
        # SmolLM: LLaMA with a tied head; one kv head shared by all four query heads.
        "smollm": ("LlamaConfig", dict(TINY, num_key_value_heads=1, tie_word_embeddings=True,
                                       rms_norm_eps=1e-5), 100000.0, None, {}, None),
        "llama_sharded": ("LlamaConfig", dict(TINY, tie_word_embeddings=False), 10000.0, None,
                          {"max_shard_size": "100KB"}, None),
        "llama_bf16": ("LlamaConfig", dict(TINY, tie_word_embeddings=False), 10000.0, LLAMA3_SCALING,
                       {}, torch.bfloat16),
    }


def randomize(model, gen):
    """Replaces transformers' std-0.02 init by larger values so that every
    term (biases, norm weights, q/k norms) visibly affects the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def hub_format(path, rope_theta, rope_scaling):
    with open(path) as f:
        cfg = json.load(f)
    cfg.pop("rope_parameters", None)
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = dict(rope_scaling) if rope_scaling else None
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def oracle(model_dir, ids, out_file):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    save_file({"ids": ids.contiguous(), "logits": out.logits.float().contiguous(),
               "loss": out.loss.float().reshape(()).contiguous()}, out_file)
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=os.environ.get("PATCH_DATA_DIR", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")))
    args = ap.parse_args()
    torch.set_num_threads(2)
    transformers.utils.logging.disable_progress_bar()
    os.makedirs(os.path.join(args.out, "oracles"), exist_ok=True)

    for i, (name, (cls, kw, theta, scaling, save_kw, save_dtype)) in enumerate(specs().items()):
        gen = torch.Generator().manual_seed(1000 + i)
        # transformers adds keys to the rope dict it is given: pass a copy.
        config = getattr(transformers, cls)(**kw, rope_theta=theta,
                                            rope_scaling=dict(scaling) if scaling else None)
        model = transformers.AutoModelForCausalLM.from_config(config)
        randomize(model, gen)
        if save_dtype is not None:
            model = model.to(save_dtype)
        model_dir = os.path.join(args.out, name)
        model.save_pretrained(model_dir, safe_serialization=True, **save_kw)
        hub_format(os.path.join(model_dir, "config.json"), theta, scaling)
        ids = torch.randint(0, kw["vocab_size"], (BATCH, SEQ), generator=gen)
        reloaded = oracle(model_dir, ids, os.path.join(args.out, "oracles", name + ".safetensors"))
        rp = reloaded.config.rope_parameters
        assert rp["rope_theta"] == theta, (name, rp)
        assert rp["rope_type"] == (scaling["rope_type"] if scaling else "default"), (name, rp)
        assert all(rp[k] == v for k, v in (scaling or {}).items()), (name, rp)
        if save_kw.get("max_shard_size"):
            assert os.path.exists(os.path.join(model_dir, "model.safetensors.index.json")), name

    ts = os.path.join(args.data, "models", "tinystories-656k")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 2048, (BATCH, SEQ), generator=gen)
    ids[:, 0] = 1  # <|start_story|>
    oracle(ts, ids, os.path.join(args.out, "oracles", "tinystories-656k.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
