#!/usr/bin/env bash
# The SmolLM2-135M study of docs/benchmarks.md ("Real model: SmolLM2-135M") on
# one GPU, the most important runs first, so that a study cut short still has
# the main table: every method at WikiText-2 test perplexity over all windows
# of 2048 tokens (configs/smollm2-135m.yaml), through `sweep`, plus the
# distillation ablation, the data question (C4 alone against C4 + 19.5M more
# tokens), the curve against training steps and the public code's recipe.
#   scripts/smollm2_study.sh                 # build/bin/patch-train, runs/smollm2-study
#   P=BIN RUNS=DIR STEPS=1000 ONLY="1 2" scripts/smollm2_study.sh
# (P4_TARGETS / P4_BASELINES, P12_TARGETS / P12_BASELINES, P21_TARGETS / P21_BASELINES
# narrow parts 4, 12 and 21 to the points a stopped study lacks; FT_STEPS, FT_LR, FT_LR2
# set the fine-tunes of parts 21 and 22; parts run in the order ONLY names them)
# Each part appends to DIR/progress.txt; each run leaves its folder; the last
# part writes DIR/summary.json (every result.json / eval.json gathered).
set -uo pipefail
P=${P:-build/bin/patch-train}
C=${C:-configs/smollm2-135m.yaml}
R=${RUNS:-runs/smollm2-study}
STEPS=${STEPS:-1000}
ONLY=${ONLY:-1 2 3 4 5 6 7 8 9 10}
S=$R/sweep
mkdir -p "$R"
log() { echo "[$(date +%T)] $*" | tee -a "$R/progress.txt"; }
caches=(--set "data.cache_dir=$S/cache/tokens" --set "mask.prior_cache=$S/cache/priors")
BASELINES=maskllm,magnitude,wanda,sparsegpt,sparsegpt-mask,wanda-hybrid,sparsegpt-hybrid
sweep() {  # sweep TARGETS BASELINES [--set ...]
  local targets=$1 baselines=$2
  shift 2
  "$P" sweep --config "$C" --set "train.steps=$STEPS" --targets "$targets" ${baselines:+--baselines "$baselines"} \
    --out "$S" --resume "${caches[@]}" "$@" >>"$R/sweep.log" 2>&1
}
learn() {  # learn NAME [--set ...]: train at 45% then evaluate its masks on the sweep's text
  local name=$1
  shift
  "$P" train --config "$C" --set "train.steps=$STEPS" "${caches[@]}" --out "$R/$name" --overwrite "$@" \
    >"$R/$name.log" 2>&1 &&
    "$P" eval --config "$C" --masks "$R/$name/masks.safetensors" --out "$R/$name-eval" --overwrite \
      >>"$R/$name.log" 2>&1
}
SOFT=(--set 'mask.scale_24=[2,10]' --set 'mask.scale_tile=[0.5,7]')
run_part() {
  case $1 in
  1) log "1 dense and PATCH-Joint 45% (ce)"; sweep 0.45 "" ;;
  2) log "2 PATCH-Joint 45% with distillation (train.loss=kd)"; learn kd-45 --set train.loss=kd ;;
  3) log "3 MaskLLM, the 2:4 baselines and the one-shot hybrids at 45%"; sweep 0.45 "$BASELINES" ;;
  4) log "4 PATCH-Joint 25/35%, PATCH-Tile 45%, hybrids at 25/35%"
    sweep "${P4_TARGETS:-0.25,0.35,0.45}" "${P4_BASELINES:-$BASELINES,tile@0.45}" ;;
  5) log "5 PATCH-Joint 45% on C4 alone (1.46M tokens, ~11 epochs)"
    learn c4only-45 --set 'data.train=["@data/text/c4/c4_en_train_first1000.jsonl","@data/text/c4/c4_en_validation_2k.jsonl"]' ;;
  6) log "6 PATCH-Joint 45% for $((STEPS * 3 / 10)) steps"; learn steps-$((STEPS * 3 / 10)) --set "train.steps=$((STEPS * 3 / 10))" ;;
  7) log "7 PATCH-Joint 45% for $((STEPS * 3)) steps"; learn steps-$((STEPS * 3)) --set "train.steps=$((STEPS * 3))" ;;
  # The public PATCH code's joint recipe against our defaults (Wanda prior, λ_s 10,
  # λ_w 0, β2 0.999, lr 0.05): SparseGPT prior at strength 3, λ_s 7, a weight term
  # λ_w 10 decaying to 0 (no CUDA graph then), β2 0.95, lr 1e-3, tile scale 25→350.
  8) log "8 PATCH-Joint 45% with the public code's recipe"
    learn recipe-public-45 --set mask.prior=sparsegpt --set mask.prior_strength_24=3 --set mask.prior_strength_tile=3 \
      --set train.lambda_sparsity=7 --set train.lambda_weight=10 --set 'train.betas=[0.9,0.95]' --set train.lr=1e-3 \
      --set 'mask.scale_tile=[25,350]' --set train.cuda_graph=false ;;
  # Gumbel logit scales 50x (the defaults now) and 10x below the paper's; parts
  # 1-8 ran with the paper's scales (100 -> 500, 25 -> 350) as the defaults then.
  9) log "9 PATCH-Joint 45% with scales 2->10 / 0.5->7"; learn soft50-45 "${SOFT[@]}" ;;
  10) log "10 PATCH-Joint 45% with scales 10->50 / 2.5->35"
    learn soft10-45 --set 'mask.scale_24=[10,50]' --set 'mask.scale_tile=[2.5,35]' ;;
  # The comparison again with the scales 50x lower, in its own sweep folder
  # (the one-shot rows do not depend on the scales): 11 is part 9 as a sweep point.
  11) log "11 soft scales: dense and PATCH-Joint 45%"; S=$R/sweep-soft sweep 0.45 "" "${SOFT[@]}" ;;
  12) log "12 soft scales: PATCH-Joint 25/35% and its reconstruction, MaskLLM, SparseGPT hybrid with updates, PATCH-Tile 45%"
    S=$R/sweep-soft sweep "${P12_TARGETS:-0.25,0.35,0.45}" \
      "${P12_BASELINES:-reconstruct,maskllm,sparsegpt-hybrid-update,tile@0.45}" "${SOFT[@]}" ;;
  13) log "13 soft scales, PATCH-Joint 45% for $((STEPS * 3)) steps"
    learn soft50-steps-$((STEPS * 3)) "${SOFT[@]}" --set "train.steps=$((STEPS * 3))" ;;
  14) log "14 soft scales, PATCH-Joint 45% for $((STEPS * 3 / 10)) steps"
    learn soft50-steps-$((STEPS * 3 / 10)) "${SOFT[@]}" --set "train.steps=$((STEPS * 3 / 10))" ;;
  # SparseGPT's weight update under PATCH's learned masks (issue: PATCH + reconstruction).
  15) log "15 soft scales: SparseGPT's reconstruction under the PATCH-Joint 45% masks"
    S=$R/sweep-soft sweep 0.45 "reconstruct@0.45" "${SOFT[@]}" ;;
  # The masks through the other formats and back, packed and timed as deployed.
  16) log "16 the soft-scale 45% masks through patch-npz and back, packed, bench-deploy --packed"
    local m=$R/sweep-soft/points/patch-joint-0.45/masks.safetensors
    { "$P" convert --masks "$m" --to patch-npz --out "$R/npz" --overwrite &&
      "$P" convert --config "$C" --masks "$R/npz/mask.npz" --out "$R/npz-back" --overwrite &&
      "$P" pack --config "$C" --masks "$R/npz-back/masks.safetensors" --out "$R/npz-pack" --overwrite &&
      "$P" bench-deploy --config "$C" --packed "$R/npz-pack/packed.safetensors" --tokens 1,16,2048 |
        grep '^{' >"$R/npz-bench.jsonl"; } >"$R/npz.log" 2>&1 ;;
  # Generation with a KV cache, dense, masked and packed (CUDA-graph decode steps), greedy.
  17) log "17 generate: dense, --masks and --packed (the part 16 files), 4 prompts x 128 tokens"
    local m=$R/npz-back/masks.safetensors pk=$R/npz-pack/packed.safetensors f=$R/prompts.txt t
    if [[ ! -f $pk ]]; then  # without part 16: the first learned masks of the sweep, packed here
      for t in 0.45 0.35 0.25; do
        m=$R/sweep-soft/points/patch-joint-$t/masks.safetensors
        [[ -f $m ]] && break
      done
      pk=$R/pack/packed.safetensors
      "$P" pack --config "$C" --masks "$m" --out "$R/pack" --overwrite >>"$R/gen.log" 2>&1 || return 1
    fi
    printf '%s\n' "The capital of France is" "Once upon a time, there was a" "The three laws of thermodynamics are" \
      "def fibonacci(n):" >"$f"
    for how in dense masks packed; do
      local extra=()
      [[ $how == masks ]] && extra=(--masks "$m")
      [[ $how == packed ]] && extra=(--packed "$pk")
      "$P" generate --config "$C" --prompts "$f" --max-new-tokens 128 "${extra[@]}" --out "$R/gen-$how" \
        --overwrite >"$R/gen-$how.txt" 2>>"$R/gen.log" || return 1
    done ;;
  # Ideas of the issue at 45%, each beside part 11's point (same tokens, same evaluation).
  18) log "18 PATCH-Joint 45% with the per-block budget"; learn perblock-45 --set mask.budget=per_block ;;
  19) log "19 PATCH-Joint 45% with global_batch 16 (2 micro-batches) for $((STEPS / 2)) steps (same tokens)"
    learn gb16-45 --set train.global_batch=16 --set "train.steps=$((STEPS / 2))" ;;
  20) log "20 PATCH-Joint 45% with distillation (train.loss=kd), default scales"; learn kd-soft-45 --set train.loss=kd ;;
  # Weights that fit the learned masks, end to end: the kept weights of each target's masks
  # fine-tuned with the LM loss on prune.micro_batch (4) windows of 2048 per step from all of
  # data.train at lr FT_LR, beside the dense model fine-tuned the same way and SparseGPT's hybrid
  # with its updated weights (sweep rows).
  21) log "21 sparse fine-tune (${FT_STEPS:-500} steps, lr ${FT_LR:-1e-4}) of the 25/35/45% masks, the dense control, SparseGPT hybrid with updates"
    S=$R/sweep-soft sweep "${P21_TARGETS:-0.25,0.35,0.45}" "${P21_BASELINES:-finetune,dense-finetune,sparsegpt-hybrid-update}" \
      "${SOFT[@]}" --set "prune.finetune_steps=${FT_STEPS:-500}" --set "prune.finetune_lr=${FT_LR:-1e-4}" ;;
  # The same fine-tune at 45% with lr FT_LR2, in a sweep folder of its own beside part 11's points.
  22) log "22 sparse fine-tune of the 45% masks and the dense control at lr ${FT_LR2:-3e-4}"
    local d=$R/sweep-ft-${FT_LR2:-3e-4}
    mkdir -p "$d/points" && cp -r "$R/sweep-soft/points/dense" "$R/sweep-soft/points/patch-joint-0.45" "$d/points/" &&
      S=$d sweep 0.45 "finetune,dense-finetune" "${SOFT[@]}" --set "prune.finetune_steps=${FT_STEPS:-500}" \
        --set "prune.finetune_lr=${FT_LR2:-3e-4}" ;;
  *) log "no part $1"; return 1 ;;
  esac
}
# Parts run in the order ONLY names them.
for n in $ONLY; do run_part "$n" && log "$n done"; done
# Everything measured so far, in one file (the sweep's points and the extra runs).
python3 - "$R" <<'EOF'
import glob, json, os, sys
r = sys.argv[1]
out = {"points": [], "runs": {}}
for f in sorted(glob.glob(os.path.join(r, "sweep*/points/*/result.json"))):
    point = json.load(open(f))
    point["sweep"] = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(f))))
    out["points"].append(point)
for f in sorted(glob.glob(os.path.join(r, "*-eval/eval.json"))):
    name = os.path.basename(os.path.dirname(f))[:-5]
    e = json.load(open(f))
    run = {"perplexity": e.get("perplexity"), "windows": e.get("windows"), "sparsity": e.get("sparsity")}
    metrics = os.path.join(r, name, "metrics.jsonl")
    if os.path.exists(metrics):
        lines = [json.loads(l) for l in open(metrics) if l.strip()]
        rates = sorted(l["tokens_per_s"] for l in lines if "tokens_per_s" in l)
        run["steps"] = max((l["step"] for l in lines), default=0)
        run["tokens_per_s"] = rates[len(rates) // 2] if rates else None
        run["peak_mem_gib"] = max((l.get("peak_mem_gib", 0) for l in lines), default=0)
        run["train_seconds"] = next((l["elapsed_s"] for l in lines if l.get("final")), None)
        run["curve"] = [(l["step"], l["valid_ppl"]) for l in lines if "valid_ppl" in l]
    out["runs"][name] = run
json.dump(out, open(os.path.join(r, "summary.json"), "w"), indent=1)
print(f"summary: {len(out['points'])} sweep points, {len(out['runs'])} runs")
EOF
log "study finished"
