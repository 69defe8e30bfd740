#pragma once
// Text generation with a KV cache: a batch of prompts (left padded) prefilled
// in one forward, then one token per step for every sequence, greedy or
// sampled (temperature, top-k, top-p, seeded), each sequence stopping at an
// end-of-sequence token. On a GPU the decode step can replay as a CUDA graph.
// Whatever computes the decoder's linears (dense, masked weights, packed
// hybrid kernels) computes the generation.
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "model/decoder.h"

namespace patch::deploy {

struct SamplingOptions {
  double temperature = 0.0;  // 0: greedy (argmax)
  int64_t top_k = 0;         // 0: no top-k cut
  double top_p = 1.0;        // 1: no nucleus cut
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
  std::vector<int64_t> eos_ids;  // a sequence stops after emitting one of these
  int64_t pad_id = 0;            // fed for left padding and after a sequence stopped (never attended)
  bool cuda_graph = false;       // replay the decode step as a CUDA graph (CUDA devices)
};

struct Generation {
  std::vector<std::vector<int64_t>> new_ids;  // per prompt, up to and including its end-of-sequence token
  int64_t prompt_tokens = 0;                  // real (unpadded) prompt tokens in all
  int64_t padded_length = 0;                  // the batch's prompt length after left padding
  int64_t decode_steps = 0;                   // forwards after the prefill
  double prefill_ms = 0, decode_ms = 0;
};

// Throws core::Error for an empty prompt list or prompt, or prompts plus
// max_new_tokens beyond the model's context (max_position_embeddings).
Generation generate(model::Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                    const GenerateOptions& opts);

// The next token per row of logits [b, vocab] (float32): argmax, or a sample
// from softmax(logits / temperature) cut to the top_k and to the smallest set
// of probability >= top_p. Returns int64 [b] on the CPU.
at::Tensor pick_tokens(const at::Tensor& logits, const SamplingOptions& opts, at::Generator& gen);

}  // namespace patch::deploy
