#!/usr/bin/env python3
"""Oracles for the real SmolLM2-135M-Instruct GGUF (Q4_1), from transformers.

transformers loads the same GGUF file (its own dequantization, fp32, CPU) and
writes, for tests/real:
  - config.json: the model shape transformers read from the file;
  - token ids of WikiText-2 test (the raw file, whole), of every C4 sample
    document, and of a Unicode torture text, by transformers' GGUF tokenizer
    conversion (AutoTokenizer.from_pretrained(dir, gguf_file=...)). The file
    says tokenizer.ggml.pre = "smollm": like llama.cpp and SmolLM2's own
    tokenizer.json, each digit is split off before GPT-2's byte-level regex.
    transformers' conversion knows no split for "smollm" and leaves the digit
    step out, so the oracle puts it back; how many texts that changes is
    recorded (digits_matter);
  - logits of the first 128 WikiText-2 test tokens;
  - perplexity by the paper's protocol: the test text tokenized whole, the first
    8 non-overlapping windows of 2048 tokens.
Without the GGUF it writes {"absent": true} and the tests say they are skipped.

Usage: smollm2_oracle.py --gguf FILE --data DIR --out DIR
"""
import argparse
import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_text_fixtures import SHORT_TEXTS  # noqa: E402

WINDOWS, SEQ = 8, 2048
LOGIT_TOKENS = 128

TORTURE = SHORT_TEXTS + [
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "x² + y³ = z¹ ½ ¼ ٣٤ ⅷ 10⁶ 3½ ①②",
    "<|endoftext|><repo_name>patch<file_sep>main.cpp<|endoftext|>",
    "def f(x):\n    return x**2  # 42\n\n\tif a>=b: pass\r\n",
]


def write_ids(path, ids):
    np.asarray(ids, dtype="<i4").tofile(path)


def tokenizers(gguf_dir, gguf_name):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer
    plain = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    fixed = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    backend = fixed.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])
    return plain, fixed


def c4_documents(data):
    docs = []
    for name in ("c4_en_train_first1000.jsonl", "c4_en_validation_2k.jsonl"):
        with open(data / "text/c4" / name, encoding="utf-8") as f:
            docs += [json.loads(line)["text"] for line in f if line.strip()]
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.path.exists(args.gguf):
        (out / "manifest.json").write_text(json.dumps({"absent": True, "gguf": args.gguf}))
        print(f"{args.gguf} is absent: SmolLM2 oracles skipped")
        return
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    data = pathlib.Path(args.data)
    gguf_dir, gguf_name = os.path.split(os.path.abspath(args.gguf))
    plain, tok = tokenizers(gguf_dir, gguf_name)
    manifest = {"absent": False, "gguf": args.gguf, "cases": [], "digits_matter": []}

    def encode(name, text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if plain(text, add_special_tokens=False)["input_ids"] != ids:
            manifest["digits_matter"].append(name)
        return ids

    wiki_text = (data / "text/wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    wiki = encode("wikitext2_test", wiki_text)
    write_ids(out / "wikitext2_test.i32", wiki)
    manifest["cases"].append({"name": "wikitext2_test", "text_file": str(data / "text/wikitext-2-raw/wiki.test.raw"),
                              "ids_file": str(out / "wikitext2_test.i32")})
    # C4: each document on its own; one ids file, with each document's length.
    docs = c4_documents(data)
    ids, lengths = [], []
    for i, d in enumerate(docs):
        e = encode(f"c4[{i}]", d)
        ids += e
        lengths.append(len(e))
    (out / "c4_docs.json").write_text(json.dumps(docs, ensure_ascii=False))
    write_ids(out / "c4.i32", ids)
    manifest["c4"] = {"docs_file": str(out / "c4_docs.json"), "ids_file": str(out / "c4.i32"),
                      "lengths": lengths}
    manifest["torture"] = []
    for i, t in enumerate(TORTURE):
        manifest["torture"].append({"text": t, "ids": encode(f"torture[{i}]", t),
                                    "with_special": tok(t, add_special_tokens=True)["input_ids"],
                                    "decoded": tok.decode(tok(t, add_special_tokens=False)["input_ids"])})
    manifest["bos"], manifest["eos"] = tok.bos_token_id, tok.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    model.eval()
    c = model.config
    manifest["config"] = {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                          "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                          "num_key_value_heads": c.num_key_value_heads, "vocab_size": c.vocab_size,
                          "rope_theta": float(getattr(c, "rope_theta", None) or c.rope_parameters["rope_theta"]),
                          "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": bool(c.tie_word_embeddings),
                          "max_position_embeddings": c.max_position_embeddings}
    with torch.no_grad():
        x = torch.tensor([wiki[:LOGIT_TOKENS]])
        logits = model(x).logits[0].float().numpy()
        logits.astype("<f4").tofile(out / "logits.f32")
        manifest["logits"] = {"file": str(out / "logits.f32"), "tokens": wiki[:LOGIT_TOKENS],
                              "shape": list(logits.shape)}
        nll, count = 0.0, 0
        for w in range(WINDOWS):
            window = torch.tensor([wiki[w * SEQ:(w + 1) * SEQ]])
            lg = model(window).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(lg, window[0, 1:], reduction="sum").item()
            count += SEQ - 1
        manifest["perplexity"] = {"windows": WINDOWS, "seq_len": SEQ, "predictions": count,
                                  "mean_nll": nll / count, "perplexity": float(np.exp(nll / count))}
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"SmolLM2 oracles in {out}: perplexity {manifest['perplexity']['perplexity']:.4f} over "
          f"{WINDOWS} x {SEQ}; digit split changed {len(manifest['digits_matter'])} texts")


if __name__ == "__main__":
    main()
