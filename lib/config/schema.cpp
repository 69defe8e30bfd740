// The configuration schema: every key the tool reads, in one place.
#include <algorithm>

#include "config/config.h"

namespace patch::config {
namespace {

using T = Type;
const std::vector<std::string> kModelCommands = {"train", "eval", "prune", "export", "sweep", "generate"};

KeyDef key(std::string k, Type t, Json def, std::string help) {
  KeyDef d;
  d.key = std::move(k);
  d.type = t;
  d.default_value = std::move(def);
  d.help = std::move(help);
  return d;
}
KeyDef range(KeyDef d, std::optional<double> lo, std::optional<double> hi) {
  d.min = lo;
  d.max = hi;
  return d;
}
KeyDef choices(KeyDef d, std::vector<std::string> c) {
  d.choices = std::move(c);
  return d;
}
KeyDef required(KeyDef d, std::vector<std::string> by) {
  d.required_by = std::move(by);
  return d;
}
KeyDef sized(KeyDef d, size_t n) {
  d.list_size = n;
  return d;
}

std::vector<KeyDef> build() {
  const double inf = 1e300;
  std::vector<KeyDef> s = {
      // model
      required(key("model.path", T::kString, nullptr,
                   "Checkpoint: a Hugging Face directory (config.json + safetensors), a .gguf file, or a hub name "
                   "org/name[@revision] found in the local Hugging Face cache"),
               kModelCommands),
      choices(key("model.dtype", T::kString, "auto",
                  "Weight/compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16"),
              {"auto", "float32", "bfloat16", "float16"}),
      key("model.device", T::kString, "auto", "Device: auto, cpu, cuda or cuda:N"),
      key("model.masks", T::kString, "",
          "Mask file (masks.safetensors) applied to the model by eval, export and verify"),
      key("model.packed", T::kString, "",
          "eval, generate: a packed hybrid file (patch-train pack) whose layers run through the deployment kernels; "
          "bench-deploy: time its layers"),
      key("model.checkpointing", T::kBool, true,
          "Recompute each decoder block in the backward pass (activation checkpointing)"),
      // data
      key("data.train", T::kStringList, Json::array(),
          "Training text files (.txt, .jsonl, .bin); relative paths may use the data dir"),
      key("data.valid", T::kStringList, Json::array(),
          "Validation files; empty: hold out data.valid_blocks blocks of the training data"),
      choices(key("data.format", T::kString, "auto", "File format: auto (by extension), text, jsonl, bin"),
              {"auto", "text", "jsonl", "bin"}),
      key("data.jsonl_field", T::kString, "text", "JSONL field holding the document text"),
      key("data.document_separator", T::kString, "",
          "Line separating documents in text files (e.g. <|endoftext|>); empty: one document per file"),
      range(key("data.seq_len", T::kInt, 256, "Tokens per training/evaluation block"), 8, 1 << 20),
      range(key("data.valid_blocks", T::kInt, 16,
                "Blocks held out for validation when data.valid is empty"),
            0, inf),
      range(key("data.max_tokens", T::kInt, 0, "Use at most this many training tokens (0: all)"), 0, inf),
      key("data.beyond_context", T::kBool, false,
          "Allow data.seq_len and prune.calib_seq_len beyond the model's context (max_position_embeddings), "
          "with a warning; otherwise that is an error"),
      key("data.cache_dir", T::kString, "", "Token cache directory (empty: <cache>/tokens, <cache> = $PATCH_CACHE_DIR or ~/.cache/patch)"),
      // eval
      key("eval.data", T::kStringList, Json::array(), "Files to compute perplexity on"),
      range(key("eval.max_windows", T::kInt, 0, "Evaluate at most this many windows per file (0: all)"), 0,
            inf),
      range(key("eval.stride", T::kInt, 0, "Window stride in tokens (0: data.seq_len, non-overlapping)"), 0,
            inf),
      range(key("eval.batch_size", T::kInt, 4, "Windows per forward pass"), 1, 4096),
      // mask
      choices(key("mask.mode", T::kString, "joint",
                  "joint (tile and 2:4 learned), tile (2:4 fixed from the prior), maskllm (2:4 only)"),
              {"joint", "tile", "maskllm"}),
      sized(range(key("mask.tile", T::kIntList, Json::array({128, 128}),
                      "Tile size [rows, cols]; cols a multiple of 4"),
                  1, inf),
            2),
      range(key("mask.target_sparsity", T::kFloat, 0.45,
                "Target sparsity over all masked weights, in [0, 0.5] (0.45 = 90% of weights in 2:4 tiles)"),
            0.0, 0.5),
      choices(key("mask.budget", T::kString, "global", "Density budget: global or per_block"),
              {"global", "per_block"}),
      key("mask.include", T::kStringList, Json::array({"*"}),
          "Glob patterns of linear layer names to mask (Hugging Face module names)"),
      key("mask.exclude", T::kStringList, Json::array(), "Glob patterns of layer names never masked"),
      range(key("mask.init_std", T::kFloat, 1.0, "Std of the N(0, sigma) logit initialisation"), 0.0, inf),
      choices(key("mask.prior", T::kString, "wanda",
                  "Prior: none, magnitude, wanda or sparsegpt (calibrated with the prune.* keys), file"),
              {"none", "magnitude", "wanda", "sparsegpt", "file"}),
      key("mask.prior_file", T::kString, "", "Mask file used as prior when mask.prior is 'file'"),
      key("mask.prior_cache", T::kString, "",
          "Directory caching wanda/sparsegpt priors across runs (empty: <cache>/priors, <cache> = $PATCH_CACHE_DIR or ~/.cache/patch)"),
      range(key("mask.prior_strength_24", T::kFloat, 3.0, "Prior strength s for the 2:4 logits"), 0.0, inf),
      range(key("mask.prior_strength_tile", T::kFloat, 3.0, "Prior strength s for the tile logits"), 0.0,
            inf),
      key("mask.hard_24", T::kBool, false, "Straight-through hard sampling of the 2:4 choice"),
      key("mask.hard_tile", T::kBool, false, "Straight-through hard sampling of the tile gates"),
      sized(range(key("mask.tau_24", T::kFloatList, Json::array({4.0, 0.05}),
                      "2:4 Gumbel temperature [start, end]"),
                  1e-6, inf),
            2),
      // 50x below the paper's 100 -> 500 and 25 -> 350, which saturate the samples
      // within a few hundred steps (no gradient reaches the logits after that):
      // SmolLM2-135M at 45% 31.87 against 57.19 (docs/benchmarks.md, "The Gumbel scale").
      sized(range(key("mask.scale_24", T::kFloatList, Json::array({2.0, 10.0}),
                      "2:4 logit scale [start, end] (the paper: [100, 500])"),
                  0.0, inf),
            2),
      sized(range(key("mask.tau_tile", T::kFloatList, Json::array({4.0, 0.05}),
                      "Tile Gumbel temperature [start, end]"),
                  1e-6, inf),
            2),
      sized(range(key("mask.scale_tile", T::kFloatList, Json::array({0.5, 7.0}),
                      "Tile logit scale [start, end] (the paper: [25, 350])"),
                  0.0, inf),
            2),
      choices(key("mask.anneal", T::kString, "linear", "Annealing of tau and scale: linear, cosine, exp"),
              {"linear", "cosine", "exp"}),
      choices(key("mask.kernel", T::kString, "fused",
                  "Mask computation: fused (kernels that never store the mask) or reference (ATen ops)"),
              {"fused", "reference"}),
      // train
      range(key("train.steps", T::kInt, 200, "Optimizer steps"), 1, inf),
      range(key("train.lr", T::kFloat, 0.05, "Peak learning rate of the mask logits (AdamW)"), 0.0, inf),
      range(key("train.min_lr_ratio", T::kFloat, 0.1, "Final learning rate as a fraction of train.lr"), 0.0,
            1.0),
      range(key("train.warmup_steps", T::kInt, 10, "Linear warm-up steps"), 0, inf),
      range(key("train.weight_decay", T::kFloat, 0.0, "AdamW weight decay on the logits"), 0.0, inf),
      sized(range(key("train.betas", T::kFloatList, Json::array({0.9, 0.999}), "AdamW betas"), 0.0, 1.0), 2),
      choices(key("train.state", T::kString, "full",
                  "Optimizer state: full (fp32 logits, gradients and moments) or compact (bf16 2:4 logits and "
                  "moments, updated inside the backward; needs one micro-batch per step and lambda_weight 0)"),
              {"full", "compact"}),
      key("train.cuda_graph", T::kBool, false,
          "Replay each step as one CUDA graph, so that the host issuing kernels does not set the pace "
          "(small models); needs model.device=cuda, mask.kernel=fused, one process and lambda_weight 0"),
      range(key("train.micro_batch", T::kInt, 4, "Sequences per forward/backward"), 1, inf),
      range(key("train.global_batch", T::kInt, 8,
                "Sequences per optimizer step (a multiple of train.micro_batch)"),
            1, inf),
      range(key("train.grad_clip", T::kFloat, 1.0, "Gradient norm clip (0: off)"), 0.0, inf),
      choices(key("train.loss", T::kString, "ce",
                  "Language-model term of the loss: ce (next-token cross-entropy on the data) or kd "
                  "(distillation: KL divergence from the same model without masks, whose next-token "
                  "distribution is the target; one extra forward per micro-batch)"),
              {"ce", "kd"}),
      range(key("train.lambda_sparsity", T::kFloat, 10.0, "Weight of the density regularizer"), 0.0, inf),
      range(key("train.lambda_weight", T::kFloat, 0.0, "Weight of the kept-weight-norm term"), 0.0, inf),
      range(key("train.eval_every", T::kInt, 50, "Held-out evaluation every N steps (0: only at the end)"),
            0, inf),
      range(key("train.eval_blocks", T::kInt, 16, "Validation blocks per evaluation"), 1, inf),
      range(key("train.checkpoint_every", T::kInt, 50, "Checkpoint every N steps (0: only at the end)"), 0,
            inf),
      range(key("train.log_every", T::kInt, 1, "Metrics line every N steps"), 1, inf),
      range(key("train.seed", T::kInt, 0, "Seed of logits init, Gumbel noise and data order"), 0, inf),
      // output
      key("output.dir", T::kString, "runs/latest", "Run directory (config, log, metrics, checkpoints, masks)"),
      key("output.overwrite", T::kBool, false, "Allow writing into a non-empty output directory"),
      key("output.resume", T::kBool, false, "Continue the run in output.dir from its last checkpoint"),
      // prune
      choices(key("prune.method", T::kString, "wanda", "One-shot method: magnitude, wanda, sparsegpt"),
              {"magnitude", "wanda", "sparsegpt"}),
      choices(key("prune.pattern", T::kString, "2:4",
                  "2:4 (every tile sparse), unstructured (bitmask at mask.target_sparsity), hybrid "
                  "(dense tiles under the budget, 2:4 elsewhere)"),
              {"2:4", "unstructured", "hybrid"}),
      range(key("prune.calib_samples", T::kInt, 128, "Calibration sequences (from data.train)"), 1, inf),
      range(key("prune.calib_seq_len", T::kInt, 2048, "Tokens per calibration sequence"), 2, 1 << 20),
      range(key("prune.seed", T::kInt, 0, "Seed of the calibration sample"), 0, inf),
      range(key("prune.micro_batch", T::kInt, 4, "Calibration sequences per block forward"), 1, inf),
      range(key("prune.finetune_steps", T::kInt, 0,
                "prune --masks: then train the kept weights end to end (language-model loss, the mask fixed) for "
                "this many steps of prune.micro_batch windows of prune.calib_seq_len tokens from all of "
                "data.train (0: none)"),
            0, inf),
      range(key("prune.finetune_lr", T::kFloat, 1e-4, "prune.finetune_steps: AdamW learning rate"), 0.0, 1.0),
      range(key("prune.finetune_checkpoint_every", T::kInt, 100,
                "prune.finetune_steps: write the fine-tune's state to the run folder every this many steps (and "
                "when stopped by a signal), for --resume (0: only when stopped)"),
            0, inf),
      range(key("prune.percdamp", T::kFloat, 0.01,
                "SparseGPT dampening (fraction of the mean Hessian diagonal); raised 10x on a failed Cholesky"),
            0.0, inf),
      range(key("prune.blocksize", T::kInt, 128, "SparseGPT columns per lazy-update block (multiple of 4)"), 4,
            inf),
      key("prune.update_weights", T::kBool, false,
          "SparseGPT: also write its OBS-updated weights as a pruned checkpoint (<out>/model); with --masks FILE, "
          "the update under that file's masks (reconstruction: no re-selection)"),
      range(key("prune.refine_iters", T::kInt, 0,
                "SparseGPT with updated weights: after its column sweep, at most this many conjugate-gradient steps "
                "take every row's kept weights to the least-squares optimum under the mask (0: SparseGPT as "
                "published)"),
            0, 100000),
      // inspect
      key("inspect.plot", T::kString, "",
          "inspect --masks: write a PNG of every layer's tile map and the density per block; inspect --metrics: "
          "a PNG of the training curves"),
      key("inspect.metrics", T::kString, "",
          "inspect: a run's metrics.jsonl, summarized (and plotted with inspect.plot)"),
      // generate
      key("generate.prompt", T::kString, "", "generate: the prompt text"),
      key("generate.prompts", T::kString, "",
          "generate: a file of prompts, one per line (.jsonl: one object per line with \"prompt\" or \"text\"), "
          "generated as one left-padded batch"),
      range(key("generate.max_new_tokens", T::kInt, 64, "generate: tokens to generate per prompt at most"), 1,
            1 << 20),
      range(key("generate.temperature", T::kFloat, 0.0,
                "generate: 0 = greedy; else sample from softmax(logits / temperature)"),
            0.0, 100.0),
      range(key("generate.top_k", T::kInt, 0, "generate: sample among the k most likely tokens only (0: all)"), 0,
            1 << 30),
      range(key("generate.top_p", T::kFloat, 1.0,
                "generate: sample among the most likely tokens whose probability reaches top_p (1: all)"),
            1e-6, 1.0),
      range(key("generate.seed", T::kInt, 0, "generate: seed of the sampling"), 0, inf),
      key("generate.add_special", T::kBool, true,
          "generate: encode prompts with the tokenizer's special tokens (e.g. BOS), as transformers does"),
      key("generate.cuda_graph", T::kBool, true, "generate: replay each decode step as a CUDA graph (GPU)"),
      // convert
      key("convert.to", T::kString, "",
          "convert: the output format: masks (masks.safetensors), patch-npz (the PATCH release's mask.npz) or "
          "maskllm-npz (MaskLLM's mask_compressed.npz); default: masks for an .npz input"),
      key("convert.repair", T::kBool, false,
          "convert: an .npz tile that is neither dense nor 2:4 becomes whichever changes fewer bits, 2:4 groups "
          "by weight magnitude (needs --model); without it such a tile is an error"),
      // verify
      key("verify.pruned", T::kString, "", "verify: a pruned checkpoint directory to check against the masks"),
      // sweep
      range(key("sweep.targets", T::kFloatList, Json::array({0.25, 0.35, 0.45}),
                "Target sparsities of a sweep"),
            0.0, 0.5),
      key("sweep.baselines", T::kStringList, Json::array(),
          "Baselines run beside PATCH in a sweep: maskllm; magnitude, wanda, sparsegpt (2:4; sparsegpt with its "
          "updated weights), sparsegpt-mask (2:4, mask only); magnitude-hybrid, wanda-hybrid, sparsegpt-hybrid "
          "(one-shot hybrid at each target, mask only), sparsegpt-hybrid-update; reconstruct (SparseGPT's weight "
          "update under the masks PATCH learned at each target, prune.refine_iters steps of refinement); finetune "
          "(the kept weights under those masks fine-tuned end to end for prune.finetune_steps); dense-finetune "
          "(the dense model fine-tuned the same way, the control); joint, tile (another learned mode at each target). A per-target baseline may end in @T (e.g. tile@0.45) to "
          "run at T only"),
      // bench
      choices(key("bench.shape", T::kString, "qwen2.5-0.5b",
                  "Model shape benchmarked with random weights"),
              {"qwen2.5-0.5b", "llama-3.2-1b", "llama-2-7b", "llama-3.1-8b"}),
      key("bench.modes", T::kStringList, Json::array({"dense", "joint", "tile", "maskllm"}),
          "What to time: dense (forward+backward), joint, tile, maskllm (mask-learning steps), "
          "prune_wanda, prune_sparsegpt (one-shot 2:4 with prune.calib_* calibration)"),
      range(key("bench.batch", T::kInt, 1, "Sequences per step"), 1, 4096),
      range(key("bench.seq", T::kInt, 4096, "Tokens per sequence"), 2, 1 << 20),
      range(key("bench.warmup", T::kInt, 2, "Untimed steps"), 0, 1000),
      range(key("bench.iters", T::kInt, 5, "Timed steps (the median is reported)"), 1, 100000),
      key("bench.profile", T::kBool, false,
          "Profile one more step (CUDA): device time per kernel name, in the JSON's \"profile\""),
      // dist
      range(key("dist.nproc", T::kInt, 1,
                "train: data-parallel processes started on this machine (ranks of torchrun's RANK/WORLD_SIZE "
                "variables when those are set)"),
            1, 1024),
      choices(key("dist.backend", T::kString, "auto", "Process group: auto (nccl on CUDA, gloo on CPU), gloo, nccl"),
              {"auto", "gloo", "nccl"}),
      // bench-deploy
      key("deploy.shapes", T::kStringList, Json::array({"llama-2-7b", "llama-3.1-8b"}),
          "bench-deploy: model shapes whose linear layers are timed (qwen2.5-0.5b, llama-3.2-1b, "
          "llama-2-7b, llama-3.1-8b), or OUTxIN for one linear of that shape alone (e.g. "
          "11008x4096)"),
      choices(key("deploy.layers", T::kStringList, Json::array(),
                  "bench-deploy: only the shapes of these linears, without the block rows (empty: all seven)"),
              {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
      range(key("deploy.sparsities", T::kFloatList, Json::array({0.0, 0.25, 0.35, 0.45, 0.5}),
                "bench-deploy: sparsities of the random hybrid masks (2:4 tile share 2s)"),
            0.0, 0.5),
      range(key("deploy.tokens", T::kIntList, Json::array({1, 4, 16, 32, 256, 2048}),
                "bench-deploy: tokens per matmul (up to 16: decode kernel; more: prefill)"),
            1, 1 << 20),
      key("deploy.prefill_dense_copy", T::kBool, false,
          "Packed layers (eval/generate --packed, bench-deploy): keep W*M dense on the GPU as well and run more "
          "than 16 tokens (past the decode kernel) through cuBLAS on it (never slower than dense prefill; a dense "
          "layer's memory more)"),
      key("deploy.prefill_overlap", T::kBool, false,
          "Packed layers without a dense copy: expand the next layer's W*M for prefill on a second stream while "
          "the current layer's GEMM runs (two layers' scratch memory, shared; slower on an H100, so off)"),
      key("deploy.prefill_split", T::kBool, false,
          "Packed layers of 128x128 tiles on an sm_90 GPU: keep a pool of 2:4 tiles beside the decode blocks (a "
          "dense tile as two 2:4 halves) and run more than 32 tokens on the 2:4 tensor cores through CUTLASS "
          "instead of expansion + cuBLAS"),
      choices(key("deploy.split_kernel", T::kString, "split",
                  "deploy.prefill_split's kernel: split (a dense tile as two 2:4 halves, the 2:4 tensor cores "
                  "alone) or mixed (2:4 tiles on wgmma.sp, dense tiles on the dense wgmma; not yet run on a GPU)"),
              {"mixed", "split"}),
      range(key("deploy.gemm_tokens", T::kIntList, Json::array({256, 2048, 8192}),
                "bench-deploy: tokens of the sparse GEMM rows (a layer of 2:4 tiles only: cuBLAS on the masked "
                "weight against cuSPARSELt and the CUTLASS SM90 kernels; empty: no such rows)"),
            1, 1 << 20),
      range(key("deploy.repeats", T::kInt, 15, "bench-deploy: timed CUDA-graph replays (the median is reported)"),
            1, 100000),
      key("deploy.end_to_end", T::kBool, true,
          "bench-deploy: also time a whole random model of each shape (prefill and decode steps)"),
      range(key("deploy.e2e_sparsity", T::kFloat, 0.45, "bench-deploy: sparsity of the end-to-end model"), 0.0,
            0.5),
      range(key("deploy.e2e_prefill", T::kInt, 2048, "bench-deploy: prompt tokens of the end-to-end prefill"), 17,
            1 << 20),
      range(key("deploy.gen_prompt", T::kInt, 1024,
                "bench-deploy: prompt tokens of the end-to-end generation rows (0: no generation rows)"),
            0, 1 << 20),
      range(key("deploy.gen_new_tokens", T::kInt, 256, "bench-deploy: tokens generated per sequence in those rows"),
            1, 1 << 20),
      range(key("deploy.gen_batches", T::kIntList, Json::array({1, 16}),
                "bench-deploy: batch sizes of the generation rows"),
            1, 4096),
  };
  return s;
}

}  // namespace

const std::vector<KeyDef>& schema() {
  static const std::vector<KeyDef> s = build();
  return s;
}

const KeyDef* find_key(const std::string& k) {
  const auto& s = schema();
  auto it = std::find_if(s.begin(), s.end(), [&](const KeyDef& d) { return d.key == k; });
  return it == s.end() ? nullptr : &*it;
}

}  // namespace patch::config
