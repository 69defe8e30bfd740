#include "deploy/generate.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <chrono>
#include <memory>

#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/signals.h"
#include "core/tensor_utils.h"

namespace patch::deploy {
namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

at::Tensor pick_tokens(const at::Tensor& logits, const SamplingOptions& opts, at::Generator& gen) {
  if (opts.temperature <= 0.0) return logits.argmax(-1).to(at::kCPU, at::kLong);
  auto l = logits.to(at::kCPU, at::kFloat) / opts.temperature;
  const int64_t vocab = l.size(-1);
  if (opts.top_k > 0 && opts.top_k < vocab) {
    const auto kth = std::get<0>(l.topk(opts.top_k, -1)).narrow(-1, opts.top_k - 1, 1);
    l = l.masked_fill(l < kth, -std::numeric_limits<float>::infinity());
  }
  if (opts.top_p < 1.0) {
    auto [sorted, order] = l.sort(-1, /*descending=*/true);
    auto cum = sorted.softmax(-1).cumsum(-1);
    // Drop a token when the ones ranked above it already reach top_p (the first always stays).
    auto drop_sorted = (cum - sorted.softmax(-1)) >= opts.top_p;
    auto drop = at::zeros_like(drop_sorted).scatter(-1, order, drop_sorted);
    l = l.masked_fill(drop, -std::numeric_limits<float>::infinity());
  }
  return at::multinomial(l.softmax(-1), 1, /*replacement=*/false, gen).squeeze(-1);
}

Generation generate(model::Decoder& decoder, const std::vector<std::vector<int64_t>>& prompts,
                    const GenerateOptions& opts) {
  if (prompts.empty()) throw core::Error("generate: no prompt");
  int64_t longest = 0;
  Generation g;
  for (size_t i = 0; i < prompts.size(); ++i) {
    if (prompts[i].empty()) throw core::Error(core::str("generate: prompt ", i + 1, " has no tokens"));
    longest = std::max<int64_t>(longest, static_cast<int64_t>(prompts[i].size()));
    g.prompt_tokens += static_cast<int64_t>(prompts[i].size());
  }
  const int64_t context = decoder.config().max_position_embeddings;
  if (opts.max_new_tokens < 1) throw core::Error("generate.max_new_tokens: expected at least 1");
  if (context > 0 && longest + opts.max_new_tokens > context)
    throw core::Error(core::str("generate: the longest prompt (", longest, " tokens) plus generate.max_new_tokens (",
                                opts.max_new_tokens, ") exceeds the model's context of ", context, " positions"));
  at::NoGradGuard no_grad;
  const auto device = decoder.options().device;
  const int64_t b = static_cast<int64_t>(prompts.size());
  g.padded_length = longest;
  g.new_ids.resize(prompts.size());

  // Left padding: real tokens end at the same slot; RoPE positions count real tokens only.
  auto ids = at::full({b, longest}, opts.pad_id, at::kLong);
  auto real = at::zeros({b, longest}, at::kBool);
  for (int64_t i = 0; i < b; ++i) {
    const auto& p = prompts[static_cast<size_t>(i)];
    const int64_t off = longest - static_cast<int64_t>(p.size());
    for (size_t j = 0; j < p.size(); ++j) ids[i][off + static_cast<int64_t>(j)] = p[j];
    real[i].narrow(0, off, static_cast<int64_t>(p.size())).fill_(true);
  }
  auto positions = (real.to(at::kLong).cumsum(1) - 1).clamp_min(0);
  auto next_pos = positions.select(1, longest - 1).unsqueeze(1) + 1;  // [b, 1]

  model::KvCache cache = decoder.make_cache(b, longest + opts.max_new_tokens);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(opts.sampling.seed);
  core::reset_peak_memory(device);
  auto t0 = std::chrono::steady_clock::now();
  at::Tensor logits = decoder.forward_cached(ids, positions, at::arange(longest, at::kLong).to(device), real, cache);
  at::Tensor token = pick_tokens(logits, opts.sampling, gen);  // [b] CPU (synchronizes)
  g.prefill_ms = ms_since(t0);

  // The decode step reads these device buffers (a CUDA graph replays it).
  const auto dev_long = at::TensorOptions().device(device).dtype(at::kLong);
  auto ids_buf = at::zeros({b, 1}, dev_long), pos_buf = at::zeros({b, 1}, dev_long), slot_buf = at::zeros({1}, dev_long);
  auto real_buf = at::ones({b, 1}, dev_long.dtype(at::kBool));
  at::Tensor step_logits;
  std::unique_ptr<core::CudaGraph> graph;
  if (opts.cuda_graph) graph = std::make_unique<core::CudaGraph>(device, /*eager_runs=*/2);
  auto step = [&] { step_logits = decoder.forward_cached(ids_buf, pos_buf, slot_buf, real_buf, cache); };

  std::vector<bool> done(static_cast<size_t>(b), false);
  t0 = std::chrono::steady_clock::now();
  for (int64_t t = 0;; ++t) {
    int64_t running = 0;
    for (int64_t i = 0; i < b; ++i) {
      if (done[static_cast<size_t>(i)]) continue;
      const int64_t tok = token[i].item<int64_t>();
      g.new_ids[static_cast<size_t>(i)].push_back(tok);
      if (std::find(opts.eos_ids.begin(), opts.eos_ids.end(), tok) != opts.eos_ids.end())
        done[static_cast<size_t>(i)] = true;
      else
        ++running;
    }
    if (running == 0 || t + 1 >= opts.max_new_tokens) break;
    core::throw_if_stopped("generation");
    for (int64_t i = 0; i < b; ++i)
      if (done[static_cast<size_t>(i)]) token[i] = opts.pad_id;
    ids_buf.copy_(token.view({b, 1}));
    pos_buf.copy_(next_pos + t);
    slot_buf.fill_(longest + t);
    if (graph) graph->run(step);
    else step();
    token = pick_tokens(step_logits, opts.sampling, gen);
    ++g.decode_steps;
  }
  g.decode_ms = ms_since(t0);
  return g;
}

}  // namespace patch::deploy
