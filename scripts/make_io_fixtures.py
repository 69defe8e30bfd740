#!/usr/bin/env python3
"""Oracle files for tests/io: written by the Python reference libraries
(safetensors, transformers, gguf), never by our own C++ code.

Usage: make_io_fixtures.py --out DIR --data SHARED_DATA_DIR
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as QT
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file as save_torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config,
                          Qwen3Config)


def values(t):
    """Exact values as JSON numbers (float64 holds every f32/f16/bf16 value)."""
    return torch.as_tensor(t).to(torch.float64).flatten().tolist()


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def safetensors_files(out):
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a.f32": torch.randn(3, 5, generator=g),
        "b.f16": torch.randn(4, 4, generator=g).half(),
        "c.bf16": torch.randn(2, 8, generator=g).bfloat16(),
        "d.u8": torch.arange(7, dtype=torch.uint8) * 31,
        "e.i64": torch.tensor([-5, 0, 1 << 40]),
        "f.empty": torch.zeros(0, 3),
    }
    meta = {"format": "pt", "note": "io fixture"}
    save_torch(tensors, os.path.join(out, "mixed.safetensors"), metadata=meta)
    expected = {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
                       "values": values(t)} for name, t in tensors.items()}
    write_json(os.path.join(out, "mixed.json"), {"metadata": meta, "tensors": expected})

    # numpy writer, no metadata (a second, torch-free producer)
    rng = np.random.default_rng(2)
    arr = rng.standard_normal((6, 10)).astype(np.float16)
    save_numpy({"w": arr}, os.path.join(out, "numpy_f16.safetensors"))
    write_json(os.path.join(out, "numpy_f16.json"),
               {"w": {"shape": list(arr.shape), "values": arr.astype(np.float64).ravel().tolist()}})


def sharded_llama(out):
    """A tied tiny llama saved by transformers in two shards (lm_head not stored)."""
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    d = os.path.join(out, "tiny_llama_sharded")
    model.save_pretrained(d, max_shard_size="12KB")
    shards = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    assert len(shards) >= 2 and os.path.exists(os.path.join(d, "model.safetensors.index.json")), shards
    sd = {k: values(v) for k, v in model.state_dict().items()}
    write_json(os.path.join(out, "tiny_llama_sharded.json"), {"shards": len(shards), "tensors": sd})


def hf_configs(out):
    d = os.path.join(out, "configs")
    os.makedirs(d, exist_ok=True)
    llama3 = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    configs = {
        # transformers-5 style (rope_parameters)
        "llama3": LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                              max_position_embeddings=131072, rms_norm_eps=1e-5,
                              rope_theta=500000.0, rope_scaling=llama3, tie_word_embeddings=True,
                              bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
        "mistral": MistralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1000,
                                 sliding_window=None, rope_theta=1000000.0),
        "qwen2": Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                             tie_word_embeddings=True, rope_theta=1000000.0,
                             bos_token_id=151643, eos_token_id=151645),
        "qwen3": Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                             num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                             vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0),
    }
    for name, c in configs.items():
        c.to_json_file(os.path.join(d, name + ".json"))
    # transformers-4 style files as published (top-level rope_theta, rope_scaling with "type")
    smollm = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
              "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
              "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
              "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 0,
              "hidden_act": "silu", "torch_dtype": "bfloat16", "attention_bias": False}
    llama3_v4 = dict(smollm, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
                     max_position_embeddings=131072,
                     rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192})
    for name, raw in [("smollm", smollm), ("llama3_v4", llama3_v4)]:
        write_json(os.path.join(d, name + ".json"), raw)
        configs[name] = LlamaConfig.from_dict(raw)

    expected = {}
    for name, c in configs.items():
        rope = c.rope_parameters
        eos = c.eos_token_id
        e = {
            "model_type": c.model_type, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_layers": c.num_hidden_layers,
            "num_heads": c.num_attention_heads, "num_kv_heads": c.num_key_value_heads,
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": c.rms_norm_eps, "rope_theta": rope["rope_theta"],
            "tie_word_embeddings": c.tie_word_embeddings,
            # Qwen2Attention always builds q/k/v with bias=True
            "attention_bias": True if c.model_type == "qwen2" else bool(getattr(c, "attention_bias", False)),
            "qk_norm": c.model_type == "qwen3",
            "bos_token_id": -1 if c.bos_token_id is None else c.bos_token_id,
            "eos_token_id": -1 if eos is None else (eos[0] if isinstance(eos, list) else eos),
        }
        if rope.get("rope_type", "default") != "default":
            e["rope_scaling"] = {k: rope[k] for k in ["rope_type", "factor", "low_freq_factor",
                                                      "high_freq_factor",
                                                      "original_max_position_embeddings"]}
        expected[name] = e
    write_json(os.path.join(d, "expected.json"), expected)

    # Unsupported features, each written by transformers itself.
    LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0}).to_json_file(
        os.path.join(d, "bad_rope_linear.json"))
    MistralConfig(sliding_window=4096, max_position_embeddings=32768).to_json_file(
        os.path.join(d, "bad_mistral_window.json"))
    Qwen2Config(use_sliding_window=True, sliding_window=4096).to_json_file(
        os.path.join(d, "bad_qwen2_window.json"))
    LlamaConfig(mlp_bias=True).to_json_file(os.path.join(d, "bad_mlp_bias.json"))


def permute_like_llama_cpp(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half rows -> ggml NORM rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def gguf_files(out):
    rng = np.random.default_rng(4)
    # 1. every metadata value type, F32/F16/BF16/Q8_0 tensors, custom alignment
    w = gguf.GGUFWriter(os.path.join(out, "small.gguf"), "testarch")
    w.add_custom_alignment(64)
    kv = [("t.u8", w.add_uint8, 200), ("t.i8", w.add_int8, -100), ("t.u16", w.add_uint16, 60000),
          ("t.i16", w.add_int16, -30000), ("t.u32", w.add_uint32, 4000000000),
          ("t.i32", w.add_int32, -2000000000), ("t.f32", w.add_float32, 0.5),
          ("t.u64", w.add_uint64, 1 << 60), ("t.i64", w.add_int64, -(1 << 60)),
          ("t.f64", w.add_float64, 0.1), ("t.bool", w.add_bool, True),
          ("t.str", w.add_string, "héllo"), ("t.arr_i", w.add_array, [1, -2, 3]),
          ("t.arr_s", w.add_array, ["a", "bc", ""]), ("t.arr_f", w.add_array, [0.25, -1.5]),
          ("t.nested", w.add_array, [[1, 2], [3]])]
    for key, fn, v in kv:
        fn(key, v)
    f32 = rng.standard_normal((3, 64)).astype(np.float32)
    f16 = rng.standard_normal((2, 32)).astype(np.float16)
    bf16_src = rng.standard_normal((2, 16)).astype(np.float32)
    bf16 = gguf.quants.quantize(bf16_src, QT.BF16)
    q8_src = rng.standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(q8_src, QT.Q8_0)
    vec = rng.standard_normal(5).astype(np.float32)
    w.add_tensor("m.f32", f32)
    w.add_tensor("m.f16", f16)
    w.add_tensor("m.bf16", bf16, raw_dtype=QT.BF16)
    w.add_tensor("m.q8", q8, raw_dtype=QT.Q8_0)
    w.add_tensor("v.f32", vec)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    expected_tensors = {
        "m.f32": (f32, 0), "m.f16": (f16, 1),
        "m.bf16": (gguf.quants.dequantize(bf16, QT.BF16), 30),
        "m.q8": (gguf.quants.dequantize(q8, QT.Q8_0), 8), "v.f32": (vec, 0)}
    meta = {k: v for k, _, v in kv}
    meta["t.f32"] = float(np.float32(0.5))
    meta["t.arr_f"] = [float(np.float32(x)) for x in meta["t.arr_f"]]
    write_json(os.path.join(out, "small.json"), {
        "metadata": meta,
        "tensors": {n: {"shape": list(a.shape), "ggml_type": t,
                        "values": np.asarray(a, dtype=np.float64).ravel().tolist()}
                    for n, (a, t) in expected_tensors.items()}})

    # 2. a tied llama with q/k biases; q/k rows permuted the way llama.cpp converts
    hidden, inter, heads, kv_heads, vocab, layers = 32, 48, 4, 2, 40, 2
    head_dim = hidden // heads
    hf = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)),
          "model.norm.weight": rng.standard_normal(hidden)}
    g = {"token_embd.weight": hf["model.embed_tokens.weight"],
         "output_norm.weight": hf["model.norm.weight"]}
    for i in range(layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        parts = {"self_attn.q_proj.weight": ("attn_q.weight", (heads * head_dim, hidden), heads),
                 "self_attn.q_proj.bias": ("attn_q.bias", (heads * head_dim,), heads),
                 "self_attn.k_proj.weight": ("attn_k.weight", (kv_heads * head_dim, hidden), kv_heads),
                 "self_attn.k_proj.bias": ("attn_k.bias", (kv_heads * head_dim,), kv_heads),
                 "self_attn.v_proj.weight": ("attn_v.weight", (kv_heads * head_dim, hidden), None),
                 "self_attn.o_proj.weight": ("attn_output.weight", (hidden, hidden), None),
                 "mlp.gate_proj.weight": ("ffn_gate.weight", (inter, hidden), None),
                 "mlp.up_proj.weight": ("ffn_up.weight", (inter, hidden), None),
                 "mlp.down_proj.weight": ("ffn_down.weight", (hidden, inter), None),
                 "input_layernorm.weight": ("attn_norm.weight", (hidden,), None),
                 "post_attention_layernorm.weight": ("ffn_norm.weight", (hidden,), None)}
        for hf_name, (g_name, shape, n_head) in parts.items():
            t = rng.standard_normal(shape)
            hf[p + hf_name] = t
            g[b + g_name] = permute_like_llama_cpp(t, n_head) if n_head else t
    hf = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in hf.items()}
    save_numpy(hf, os.path.join(out, "tiny_llama_expected.safetensors"))
    w = gguf.GGUFWriter(os.path.join(out, "tiny_llama.gguf"), "llama")
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_block_count(layers)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}" for i in range(vocab)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for name, t in g.items():
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


QUANT_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]

# Where each block format keeps its float16 scales (byte offsets in a block):
# random bytes there could be Inf/NaN, which no quantizer writes.
HALF_OFFSETS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
                "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_blocks(rng, qtype, n_blocks):
    """Raw blocks of `qtype`: random quants and scales, finite float16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for off in HALF_OFFSETS[qtype.name]:
        halves = (rng.standard_normal(n_blocks) * 0.05).astype(np.float16)
        halves[0] = np.float16(3e-6)  # a subnormal float16
        raw[:, off:off + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw


def quant_files(out):
    """Every quantized type the loader supports, dequantized by gguf-py.

    Legacy types are quantized by gguf-py from random floats and also written as
    random raw blocks; K-quants (gguf-py has no quantizer for them) as random raw
    blocks. Shapes have several rows so row order is checked too.
    """
    rng = np.random.default_rng(25)
    w = gguf.GGUFWriter(os.path.join(out, "quants.gguf"), "testarch")
    expected = {}
    for name in QUANT_TYPES:
        qt = QT[name]
        block_size, type_size = gguf.GGML_QUANT_SIZES[qt]
        rows, cols = 3, 2 * block_size
        raw = random_blocks(rng, qt, rows * cols // block_size).reshape(rows, cols // block_size * type_size)
        w.add_tensor(f"raw.{name}", raw, raw_dtype=qt)
        expected[f"raw.{name}"] = gguf.quants.dequantize(raw, qt)
        if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
            src = rng.standard_normal((rows, cols)).astype(np.float32)
            q = gguf.quants.quantize(src, qt)
            w.add_tensor(f"quantized.{name}", q, raw_dtype=qt)
            expected[f"quantized.{name}"] = gguf.quants.dequantize(q, qt)
    # A type the loader does not dequantize.
    iq4 = rng.integers(0, 256, size=(2, 18), dtype=np.uint8)
    iq4[:, 0:2] = np.float16(0.01).reshape(1, 1).view(np.uint8)
    w.add_tensor("unsupported.IQ4_NL", iq4, raw_dtype=QT.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    save_numpy({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in expected.items()},
               os.path.join(out, "quants_expected.safetensors"))


def shared_gguf_reference(out, data_dir):
    """gguf-py's reading of the shared GGUF models: per tensor shape, type, sum, head."""
    ref = {}
    for rel in ["models/stories260K/stories260K.gguf",
                "models/llama-2-tiny-random/llama-2-tiny-random.gguf"]:
        r = gguf.GGUFReader(os.path.join(data_dir, rel))
        kv = [k for k in r.fields if not k.startswith("GGUF.")]
        ref[rel] = {"kv_count": len(kv), "data_offset": int(r.data_offset), "tensors": {
            t.name: {"shape": [int(x) for x in t.data.shape], "ggml_type": int(t.tensor_type),
                     "sum": float(np.asarray(t.data, dtype=np.float64).sum()),
                     "head": np.asarray(t.data, dtype=np.float64).ravel()[:8].tolist()}
            for t in r.tensors}}
    write_json(os.path.join(out, "shared_gguf.json"), ref)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", required=True, help="the shared data directory")
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    safetensors_files(args.out)
    sharded_llama(args.out)
    hf_configs(args.out)
    gguf_files(args.out)
    quant_files(args.out)
    shared_gguf_reference(args.out, args.data)


if __name__ == "__main__":
    main()
