#!/usr/bin/env python3
"""Oracle token ids for tests/text.

Hugging Face `tokenizers` encodes and decodes the test texts with
  - the TinyStories-656K tokenizer.json (SentencePiece-style BPE),
  - byte-level BPE tokenizers trained here (LLaMA-3 / Qwen2 Split regexes,
    GPT-2's ByteLevel regex, SmolLM's Digits + ByteLevel),
  - Metaspace variants of the TinyStories vocabulary (LLaMA-2 / Mistral style);
and an independent Python transcription of llama.cpp's SentencePiece tokenizer
(llm_tokenizer_spm), reading the vocabulary with the `gguf` package, encodes
texts with the stories260K and llama-2-tiny-random GGUF vocabularies.

Writes <out>/manifest.json listing tokenizers and cases; long texts and their
ids live in side files (ids: little-endian int32).
Usage: make_text_fixtures.py --out DIR [--data-dir /work/shared/data]
"""
import argparse
import heapq
import json
import os
import pathlib
import re
import unicodedata

import numpy as np
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                        processors, trainers)

LLAMA3_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Tokenizers that vary the pre-tokenization of a vocabulary already checked on
# the full texts, and the GGUF oracle (pure Python), see heads of the long texts.
VARIANT_CHARS = 300_000
GGUF_CHARS = 100_000

SHORT_TEXTS = [
    "Hello world",
    "Once upon a time, there was a little girl named Lily.",
    "  multiple   spaces  and trailing   ",
    "tabs\tand\nnewlines\r\n\r\nCRLF\rCR only\n\n\n",
    "digits 1234567 3.14159 2024-01-01 x2 42nd ١٢٣ ½",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷!",
    "non-ASCII: Ünïcödé façade naïve — “quotes” ß İstanbul Ελληνικά Русский 中文字符 日本語のテキスト 한국어",
    "combining: e\u0301 A\u030a n\u0303 \u1100\u1161\u11a8 Å",
    "contractions: I'm you're he'll they've she'd It's DON'T WE'LL 'tis",
    "punctuation!!! ... ??? (parens) [brackets] {braces} <angle> @user #tag $5 100% a&b",
    "",
    " ",
    "\n",
    "x",
    "ends with newline\n",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
]

SPECIAL_TEXTS = {
    "tinystories": [
        "<|start_story|>Once upon a time",
        "Hello<|end_story|>World",
        "The end. <|end_story|> <|start_story|> Next story",
        "<unk> and <|start_story|><|end_story|>",
    ],
    "bl": [
        "<|begin_of_text|>Hello<|end_of_text|> world <|end_of_text|>",
        "a<|eot_id|>b <|eot_id|> c",
        "tool: <tool> x <tool>y",
    ],
}


# Regex semantics (leftmost-first alternation, backtracking, lazy/counted
# quantifiers, lookahead, case folding) checked against Python's `re` on texts
# where its \s \d \w agree with Oniguruma's.
REGEX_CASES = [
    (r"a+?b", "aaab ab b"),
    (r"x{2,3}", "x xx xxx xxxx xxxxx"),
    (r"x{2}|y{1,}", "xxx yyy"),
    (r"(?i:'s|'t|'re)", "it's IT'S don'T we'RE 'x"),
    (r"\s+(?!\S)|\s+", "a   b \n\n c   "),
    (r"(?:ab|a)(?:c|bcd)", "abcd abc"),
    (r"\d{1,3}", "1234567 12"),
    (r"[a-c\-x]+", "abc-x dxe"),
    (r"\w+|[^\w\s]+", "hello, world!! foo_bar 42"),
    (r"colou?r", "color colour colouur"),
    (r"(?=a)\w+", "bab cad"),
    (r"[^\r\n]+", "line one\r\nline two\n"),
    (r".+", "ab\ncd"),
    (r"(?i)abc|d", "ABC aBc D"),
    (r"a*?b|a", "aaa aab"),
    (r"(a|ab)(c|bcd)(d*)", "abcd"),
    (r"[\]\[]+|\\", "x[]]y\\"),
    (r"\x41\u0042[\x43-\x45]", "ABC ABD ABF"),
]


def write_ids(path, ids):
    np.asarray(ids, dtype="<i4").tofile(path)


def train_byte_level(files, pattern, special_tokens, vocab_size):
    tok = Tokenizer(models.BPE())
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train(files, trainer)
    return tok


def with_json(tok, edit):
    """A copy of `tok` with its JSON edited by `edit(dict)`."""
    d = json.loads(tok.to_str())
    edit(d)
    return Tokenizer.from_str(json.dumps(d))


# ---- llama.cpp llm_tokenizer_spm, transcribed ---------------------------------

def read_gguf_vocab(path):
    from gguf import GGUFReader
    r = GGUFReader(path)
    f = r.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode("utf-8") for i in f.data]
    f = r.fields["tokenizer.ggml.scores"]
    scores = [float(f.parts[i][0]) for i in f.data]
    f = r.fields["tokenizer.ggml.token_type"]
    types = [int(f.parts[i][0]) for i in f.data]

    def scalar(key, default):
        return int(r.fields[key].parts[-1][0]) if key in r.fields else default

    return {"tokens": tokens, "scores": scores, "types": types,
            "bos": scalar("tokenizer.ggml.bos_token_id", 1),
            "eos": scalar("tokenizer.ggml.eos_token_id", 2)}


class SpmOracle:
    def __init__(self, vocab):
        self.tokens = vocab["tokens"]
        self.scores = vocab["scores"]
        self.types = vocab["types"]
        self.bos = vocab["bos"]
        self.index = {t.encode("utf-8"): i for i, t in enumerate(self.tokens)}
        # control (3), user-defined (4) and unknown (2) tokens are split out first
        self.special = sorted(((t, i) for i, t in enumerate(self.tokens) if self.types[i] in (2, 3, 4) and t),
                              key=lambda x: -len(x[0]))

    def byte_token(self, b):
        return self.index[("<0x%02X>" % b).encode()]

    def session(self, text):
        """llm_tokenizer_spm_session::tokenize on UTF-8 bytes."""
        lens = [1] * 12 + [2, 2, 3, 4]
        syms = []  # [start, n, prev, next]
        offs = 0
        while offs < len(text):
            n = min(lens[text[offs] >> 4], len(text) - offs)
            idx = len(syms)
            syms.append([offs, n, idx - 1, -1 if offs + n == len(text) else idx + 1])
            offs += n
        heap = []
        rev = {}

        def try_add(left, right):
            if left == -1 or right == -1:
                return
            s = text[syms[left][0]:syms[left][0] + syms[left][1] + syms[right][1]]
            tid = self.index.get(s)
            if tid is None:
                return
            # max score first, then smallest left
            heapq.heappush(heap, (-self.scores[tid], left, right, len(s)))
            rev[s] = (left, right)

        for i in range(1, len(syms)):
            try_add(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = syms[left], syms[right]
            if ls[1] == 0 or rs[1] == 0 or ls[1] + rs[1] != size:
                continue
            ls[1] += rs[1]
            rs[1] = 0
            ls[3] = rs[3]
            if rs[3] >= 0:
                syms[rs[3]][2] = left
            try_add(ls[2], left)
            try_add(left, ls[3])
        out = []

        def reseg(sym):
            s = text[sym[0]:sym[0] + sym[1]]
            tid = self.index.get(s)
            if tid is not None:
                out.append(tid)
                return
            p = rev.get(s)
            if p is None:
                out.extend(self.byte_token(b) for b in s)
                return
            reseg(syms[p[0]])
            reseg(syms[p[1]])

        i = 0 if syms else -1
        while i != -1:
            reseg(syms[i])
            i = syms[i][3]
        return out

    def encode(self, text, add_bos):
        # tokenizer_st_partition: longest special tokens first, each splitting raw fragments
        frags = [text]
        for tok, tid in self.special:
            new = []
            for f in frags:
                if not isinstance(f, str):
                    new.append(f)
                    continue
                parts = f.split(tok)
                for k, p in enumerate(parts):
                    if k:
                        new.append(tid)
                    if p:
                        new.append(p)
            frags = new
        ids = [self.bos] if add_bos else []
        prev_special = True
        for f in frags:
            if isinstance(f, int):
                ids.append(f)
                prev_special = True
                continue
            s = (" " if prev_special else "") + f
            ids += self.session(s.replace(" ", "\u2581").encode("utf-8"))
            prev_special = False
        return ids


def add_cases(manifest, name, tok, texts, long_texts, long_chars, tdir):
    """Oracle ids of `tok` for the short texts (with and without special tokens,
    and their decodings) and for the long texts (side files)."""
    for i, text in enumerate(texts):
        for add_special in (False, True):
            ids = tok.encode(text, add_special_tokens=add_special).ids
            manifest["cases"].append({
                "tokenizer": name, "name": f"short{i}", "text": text, "add_special": add_special,
                "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False),
                "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
    for tname, path in long_texts.items():
        text = path.read_text(encoding="utf-8")
        if long_chars is not None:
            text = text[:long_chars]
            path = tdir / f"{tname}.txt"
            path.write_text(text, encoding="utf-8")
        ids = tok.encode(text, add_special_tokens=False).ids
        write_ids(tdir / f"{tname}.i32", ids)
        (tdir / f"{tname}.decoded.txt").write_text(tok.decode(ids, skip_special_tokens=False),
                                                   encoding="utf-8")
        manifest["cases"].append({
            "tokenizer": name, "name": tname, "text_file": str(path), "add_special": False,
            "ids_file": str(tdir / f"{tname}.i32"),
            "decoded_file": str(tdir / f"{tname}.decoded.txt")})


def clear_strip(d):
    for a in d["added_tokens"]:
        a["lstrip"] = a["rstrip"] = False


def write_gpt2_gguf(path, tok, pre, bos_id, eos_id, add_bos):
    """A vocabulary-only GGUF as llama.cpp's converter writes a byte-level BPE
    tokenizer: tokens by id, control (3) / user-defined (4) types for the added
    tokens, merges as "a b"."""
    from gguf import GGUFWriter
    d = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [1] * len(tokens)
    for a in d["added_tokens"]:
        types[a["id"]] = 3 if a["special"] else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    w = GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos_id)
    w.add_eos_token_id(eos_id)
    w.add_add_bos_token(add_bos)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--data-dir", default=os.environ.get("PATCH_DATA_DIR", "/work/shared/data"))
    args = ap.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = pathlib.Path(args.data_dir)

    wiki = data / "text/wikitext-2-raw/wiki.test.raw"
    stories = data / "text/tinystories/tinystories_validation_head.txt"
    long_texts = {"wikitext2_test": wiki, "tinystories_valid": stories}

    toks = {}
    ts = Tokenizer.from_file(str(data / "models/tinystories-656k/tokenizer.json"))
    toks["tinystories"] = (ts, "tinystories", None)

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    llama3 = train_byte_level([str(data / "text/wikitext-2-raw/wiki.valid.raw")], LLAMA3_PAT, specials, 2000)
    llama3.add_tokens(["<tool>"])  # a non-special added token
    bos = llama3.token_to_id("<|begin_of_text|>")
    llama3.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])])

    def set_ignore_merges(d):
        d["model"]["ignore_merges"] = True

    toks["bl_llama3"] = (with_json(llama3, set_ignore_merges), "bl", None)

    def qwen2(d):
        d["normalizer"] = {"type": "NFC"}
        d["pre_tokenizer"]["pretokenizers"][0]["pattern"] = {"Regex": QWEN2_PAT}
        d["post_processor"] = None

    toks["bl_qwen2"] = (with_json(llama3, qwen2), "bl", VARIANT_CHARS)

    gpt2 = train_byte_level([str(data / "text/tinyshakespeare_input.txt")], None, specials, 1500)
    gpt2.add_tokens([AddedToken("<tool>", lstrip=True, rstrip=True)])
    gpt2.post_processor = processors.ByteLevel(trim_offsets=True)
    toks["bl_gpt2"] = (gpt2, "bl", None)

    def smollm(d):
        d["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}

    toks["bl_smollm"] = (with_json(gpt2, smollm), "bl", VARIANT_CHARS)

    def metaspace_first(d):
        d["normalizer"] = None
        d["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                              "split": False}

    toks["sp_metaspace_first"] = (with_json(ts, metaspace_first), "tinystories", VARIANT_CHARS)

    def metaspace_legacy(d):
        d["normalizer"] = None
        d["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}
        d["decoder"] = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}

    toks["sp_metaspace_legacy"] = (with_json(ts, metaspace_legacy), "tinystories", VARIANT_CHARS)

    manifest = {"tokenizers": {}, "cases": []}
    for name, (tok, family, long_chars) in toks.items():
        tdir = out / name
        tdir.mkdir(exist_ok=True)
        tok.save(str(tdir / "tokenizer.json"))
        if family == "bl":
            (tdir / "tokenizer_config.json").write_text(json.dumps(
                {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>"}}))
            bos_id, eos_id = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
        else:
            (tdir / "tokenizer_config.json").write_text(
                (data / "models/tinystories-656k/tokenizer_config.json").read_text())
            bos_id, eos_id = 1, 2
        manifest["tokenizers"][name] = {"kind": "hf", "path": str(tdir / "tokenizer.json"),
                                        "bos": bos_id, "eos": eos_id, "vocab_size": tok.get_vocab_size()}
        add_cases(manifest, name, tok, SHORT_TEXTS + SPECIAL_TEXTS[family], long_texts, long_chars, tdir)

    # GGUF `gpt2` vocabularies written from the byte-level tokenizers, with the
    # tokenizer.ggml.pre of their family: tokenized like the tokenizer they came
    # from, less what GGUF cannot say (an added token's lstrip/rstrip).
    for name, pre, add_bos in (("bl_llama3", "llama-bpe", True), ("bl_qwen2", "qwen2", False),
                               ("bl_gpt2", "gpt-2", False)):
        tok = with_json(toks[name][0], clear_strip)
        tdir = out / (name + "_gguf")
        tdir.mkdir(exist_ok=True)
        path = tdir / "vocab.gguf"
        bos_id, eos_id = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
        write_gpt2_gguf(path, tok, pre, bos_id, eos_id, add_bos)
        manifest["tokenizers"][name + "_gguf"] = {"kind": "gguf", "path": str(path), "bos": bos_id,
                                                  "eos": eos_id, "vocab_size": tok.get_vocab_size()}
        add_cases(manifest, name + "_gguf", tok, SHORT_TEXTS + SPECIAL_TEXTS["bl"], long_texts,
                  toks[name][2], tdir)

    gguf_models = {"stories260k": data / "models/stories260K/stories260K.gguf",
                   "llama2_tiny": data / "models/llama-2-tiny-random/llama-2-tiny-random.gguf"}
    for name, path in gguf_models.items():
        vocab = read_gguf_vocab(str(path))
        spm = SpmOracle(vocab)
        manifest["tokenizers"][name] = {"kind": "gguf", "path": str(path), "bos": vocab["bos"],
                                        "eos": vocab["eos"], "vocab_size": len(vocab["tokens"])}
        texts = SHORT_TEXTS + ["<s>Once upon</s> a time", "a <unk> b"]
        for i, text in enumerate(texts):
            for add_special in (False, True):
                manifest["cases"].append({"tokenizer": name, "name": f"short{i}", "text": text,
                                          "add_special": add_special, "ids": spm.encode(text, add_special)})
        # The head of each long text: the Python transcription is slow.
        for tname, tpath in long_texts.items():
            text = tpath.read_text(encoding="utf-8")[:GGUF_CHARS]
            chunk = out / f"{name}_{tname}.txt"
            chunk.write_text(text, encoding="utf-8")
            ids_path = out / f"{name}_{tname}.i32"
            write_ids(ids_path, spm.encode(text, False))
            manifest["cases"].append({"tokenizer": name, "name": tname, "text_file": str(chunk),
                                      "add_special": False, "ids_file": str(ids_path)})

    manifest["regex"] = [{"pattern": p, "text": t, "matches": [[m.start(), m.end()] for m in re.finditer(p, t)]}
                         for p, t in REGEX_CASES]
    # NFC / NFD of every code point with a canonical decomposition, and of some sequences.
    seqs = [chr(cp) for cp in range(0x110000) if unicodedata.decomposition(chr(cp))[:1] not in ("", "<")]
    seqs += ["e\u0301\u0327", "a\u0328\u0301\u0323", "\u1100\u1161\u11a8", "\uac00\u11a8", "\u0301abc",
             "\u0041\u030a\u0301", "\u00c5\u0316", "Ω\u0345\u0301"] + SHORT_TEXTS
    manifest["normalization"] = [[t, unicodedata.normalize("NFC", t), unicodedata.normalize("NFD", t)] for t in seqs]

    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    print(f"wrote {len(manifest['cases'])} cases for {len(manifest['tokenizers'])} tokenizers to {out}")


if __name__ == "__main__":
    main()
