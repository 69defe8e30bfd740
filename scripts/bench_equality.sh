#!/usr/bin/env bash
# Does `bench` time the step `train` runs? A random checkpoint of Qwen2.5-0.5B's
# shape (transformers, bf16) trained by `train` for STEPS steps of 1 x 4096
# tokens, eager and with train.cuda_graph, against `bench --shape
# qwen2.5-0.5b` with the same settings in the same call: the median tokens/s of
# metrics.jsonl (the first WARM steps left out) beside bench's. One JSON line
# per setting; the two must agree within 5% (exit 1 otherwise).
#   P=build/bin/patch-train OUT=dir scripts/bench_equality.sh   (on a GPU machine)
# The tokenizer (any; the ids stay below the vocabulary) and the text come from
# PATCH_DATA_DIR (models/tinystories-656k, text/c4).
set -euo pipefail
P=${P:-build/bin/patch-train}
OUT=${OUT:-gpu-out}
STEPS=${STEPS:-30}
WARM=${WARM:-5}
DATA=${PATCH_DATA_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/../shared/data}
W=${WORK:-/tmp/patch-equality}
mkdir -p "$W" "$OUT"
ckpt=$W/qwen2.5-0.5b-random
if [[ ! -f $ckpt/config.json ]]; then
  python3 - "$ckpt" <<'PY'
import sys, torch
from transformers import Qwen2Config, Qwen2ForCausalLM
torch.manual_seed(0)
cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(sys.argv[1])
PY
  cp "$DATA"/models/tinystories-656k/{tokenizer.json,tokenizer_config.json,special_tokens_map.json} "$ckpt/"
fi
common=(--set model.device=cuda --set mask.mode=joint --set train.micro_batch=1 --set train.global_batch=1
  --set data.seq_len=4096 --set mask.prior=magnitude)
status=0
for G in false true; do
  run=$W/train-graph-$G
  "$P" train --model "$ckpt" --data "$DATA/text/c4/c4_en_validation_2k.jsonl" --out "$run" --overwrite \
    "${common[@]}" --set train.cuda_graph=$G --set train.steps="$STEPS" --set train.log_every=1 \
    --set train.eval_every=0 --set train.checkpoint_every=0 --set data.valid_blocks=2 --set train.eval_blocks=2 \
    --set data.cache_dir="$W/cache" >"$OUT/equality-train-$G.log" 2>&1
  "$P" bench --shape qwen2.5-0.5b --mode joint "${common[@]}" --set train.cuda_graph=$G --set bench.batch=1 \
    --set bench.seq=4096 --set bench.iters=$((STEPS - WARM)) --set bench.warmup="$WARM" 2>"$OUT/equality-bench-$G.log" |
    grep '^{' | grep '"joint"' >"$W/bench-$G.json"
  python3 - "$run/metrics.jsonl" "$W/bench-$G.json" "$G" "$WARM" <<'PY' | tee -a "$OUT/bench_equality.jsonl" || status=1
import json, statistics, sys
metrics, bench, graph, warm = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
lines = [json.loads(l) for l in open(metrics) if l.strip()]
rates = [l["tokens_per_s"] for l in lines if "tokens_per_s" in l and l["step"] > warm]
b = json.loads(open(bench).read().splitlines()[0])
train = statistics.median(rates)
ratio = b["tokens_per_s"] / train
print(json.dumps({"cuda_graph": graph == "true", "train_tokens_per_s": round(train), "train_steps_timed": len(rates),
                  "bench_tokens_per_s": round(b["tokens_per_s"]), "bench_over_train": round(ratio, 4),
                  "within_5pct": abs(ratio - 1) <= 0.05, "peak_gib_bench": b["peak_gib"],
                  "peak_gib_train": max(l.get("peak_mem_gib", 0) for l in lines)}))
sys.exit(0 if abs(ratio - 1) <= 0.05 else 1)
PY
done
exit $status
