#pragma once
// Weights that fit a mask, end to end: the kept weights of every masked layer
// trained with the language-model loss while the mask stays fixed (a sparse
// fine-tune). Layer-wise reconstruction (SparseGPT's update, least squares
// towards the dense layer) fits each layer alone and loses to the untouched
// weights under learned masks; this fits the whole model's output.
#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "text/tokenizer.h"

namespace patch::train {

struct FinetuneOptions {
  int64_t steps = 0;        // optimizer steps
  int64_t micro_batch = 4;  // sequences per step
  double lr = 1e-4;         // AdamW, constant after a linear warm-up of steps / 10
  uint64_t seed = 0;        // the order of the sequences
  // Checkpoints: the whole state (weights, AdamW moments, losses, the order of
  // the sequences) goes to `checkpoint` (atomically) every `checkpoint_every`
  // steps (0: never) and when a SIGINT/SIGTERM stops the fine-tune; with
  // `resume` it continues from that file where there is one, exactly as if it
  // had not stopped. `config` (JSON text) is stored in it for the caller's
  // same-run check (check_same_run).
  std::string checkpoint;
  int64_t checkpoint_every = 0;
  bool resume = false;
  std::string config;
};

// prune.finetune_steps, prune.micro_batch, prune.finetune_lr, prune.seed and
// prune.finetune_checkpoint_every, with the configuration as `config`.
FinetuneOptions finetune_options(const config::Config& cfg);
// The keys a resumed fine-tune may change (devices, caches, the checkpoint
// cadence, the evaluation).
const std::vector<std::string>& finetune_mutable_keys();

// `count` windows of prune.calib_seq_len tokens for the fine-tune's steps,
// from the whole of data.train (every file, joined as `train` joins them; at
// most data.max_tokens), non-overlapping and in prune.seed's order, so that a
// fine-tune of fewer windows than the text holds sees none twice. With less
// text it logs how often each window will be seen (a fine-tune cycled over a
// few hundred windows learns them by heart: its training loss falls far below
// the held-out one).
at::Tensor finetune_windows(const config::Config& cfg, const text::Tokenizer& tok, int64_t count);
// Throws core::ConfigError naming data.train when it gives no text to fine-tune on.
void require_finetune_data(const config::Config& cfg);

// Every linear of `decoder` kept whole (an unstructured mask of ones): the
// dense model's fine-tune, the control beside the fine-tune of a mask.
maskfile::MaskFile all_kept(model::Decoder& decoder);

struct FinetuneResult {
  std::map<std::string, at::Tensor> weights;  // "<layer>.weight": W' ⊙ M, float32 on the CPU
  std::vector<double> losses;                 // the training loss of every step
};

// Trains, for every layer of `masks`, a float32 copy of its weight (from
// `start`["<layer>.weight"] where given, e.g. SparseGPT's update, else the
// model's) whose masked entries stay zero, on the windows of `ids` [n, seq]
// (cycled in a seeded order). The decoder's own weights are never written:
// each layer ends with the trained weight as its provider.
FinetuneResult finetune_kept_weights(model::Decoder& decoder, const maskfile::MaskFile& masks,
                                     const std::map<std::string, at::Tensor>& start, const at::Tensor& ids,
                                     const FinetuneOptions& o);

}  // namespace patch::train
