#include "eval/perplexity.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "core/tensor_utils.h"
#include "data/corpus.h"

#include "core/error.h"
#include "core/progress.h"

namespace patch::eval {

PerplexityResult perplexity(model::Decoder& model, const int32_t* tokens, int64_t num_tokens,
                            const PerplexityOptions& opts) {
  const int64_t seq = opts.seq_len;
  const int64_t stride = opts.stride <= 0 ? seq : opts.stride;
  core::check(seq >= 2, "eval", "seq_len must be at least 2");
  core::check(stride <= seq, "eval.stride", core::str("must not exceed data.seq_len (", seq, ")"));
  core::check(num_tokens >= seq, "eval",
              core::str("the text has ", num_tokens, " tokens, fewer than one window of ", seq));

  // Window starts and, per window, the first target position it scores.
  struct Window {
    int64_t start, first_scored;
  };
  std::vector<Window> windows;
  for (int64_t start = 0; start + seq <= num_tokens; start += stride) {
    int64_t first = windows.empty() || stride == seq ? 1 : seq - stride;
    windows.push_back({start, first});
    if (opts.max_windows > 0 && static_cast<int64_t>(windows.size()) >= opts.max_windows) break;
  }

  c10::NoGradGuard no_grad;
  const auto device = model.options().device;
  double nll_sum = 0.0;
  int64_t count = 0;
  core::Progress progress("eval", static_cast<long>(windows.size()));
  for (size_t b = 0; b < windows.size(); b += opts.batch_size) {
    size_t e = std::min(windows.size(), b + static_cast<size_t>(opts.batch_size));
    auto ids = at::empty({static_cast<int64_t>(e - b), seq}, at::kLong);
    auto acc = ids.accessor<int64_t, 2>();
    for (size_t w = b; w < e; ++w)
      for (int64_t t = 0; t < seq; ++t) acc[w - b][t] = tokens[windows[w].start + t];
    auto logits = model.forward(ids.to(device));  // [n, seq, vocab] fp32
    auto logp = at::log_softmax(logits.slice(1, 0, seq - 1), -1);
    auto targets = ids.slice(1, 1, seq).to(device);
    auto nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).to(at::kDouble).cpu();  // [n, seq-1]
    for (size_t w = b; w < e; ++w) {
      // Target position p (1-based in the window) is prediction index p - 1.
      auto scored = nll[static_cast<int64_t>(w - b)].slice(0, windows[w].first_scored - 1);
      nll_sum += scored.sum().item<double>();
      count += scored.numel();
    }
    progress.update(static_cast<long>(e), static_cast<long>((e - b) * seq));
  }
  progress.finish();
  PerplexityResult r;
  r.predictions = count;
  r.windows = static_cast<int64_t>(windows.size());
  r.tokens = num_tokens;
  r.mean_nll = nll_sum / static_cast<double>(count);
  r.perplexity = std::exp(r.mean_nll);
  return r;
}

nlohmann::ordered_json evaluate_files(model::Decoder& model, const text::Tokenizer& tok,
                                      const std::vector<std::string>& files, const PerplexityOptions& opts) {
  nlohmann::ordered_json out;
  out["seq_len"] = opts.seq_len;
  out["results"] = nlohmann::ordered_json::array();
  for (const auto& path : files) {
    auto tokens = data::tokenize_eval_text(path, tok);
    core::log::info(core::str("eval ", path, ": ", tokens.size(), " tokens"));
    auto r = perplexity(model, tokens.data(), static_cast<int64_t>(tokens.size()), opts);
    // The windows named the same way in every output: how many, of how many
    // tokens, and the tokens actually scored; text_tokens is the whole file.
    out["results"].push_back({{"data", path},
                              {"perplexity", r.perplexity},
                              {"mean_nll", r.mean_nll},
                              {"windows", r.windows},
                              {"seq_len", opts.seq_len},
                              {"stride", opts.stride <= 0 ? opts.seq_len : opts.stride},
                              {"tokens_scored", r.predictions},
                              {"text_tokens", r.tokens}});
  }
  if (files.size() == 1)
    for (const auto& k : {"perplexity", "mean_nll", "windows", "stride", "tokens_scored", "text_tokens"})
      out[k] = out["results"][0][k];
  return out;
}

model::DecoderOptions inference_options(const config::Config& cfg) {
  model::DecoderOptions o;
  o.device = core::resolve_device(cfg.get_string("model.device"));
  o.dtype = core::resolve_dtype(cfg.get_string("model.dtype"), o.device);
  return o;
}

PerplexityOptions perplexity_options(const config::Config& cfg) {
  PerplexityOptions po;
  po.seq_len = cfg.get_int("data.seq_len");
  po.stride = cfg.get_int("eval.stride");
  po.max_windows = cfg.get_int("eval.max_windows");
  po.batch_size = cfg.get_int("eval.batch_size");
  return po;
}

void check_sequence_lengths(const config::Config& cfg, const io::ModelConfig& model, const std::string& source,
                            bool windows, bool calibrates) {
  const int64_t context = model.max_position_embeddings;
  if (context <= 0) return;
  const bool allow = cfg.get_bool("data.beyond_context");
  std::vector<const char*> keys;
  if (windows) keys.push_back("data.seq_len");
  if (calibrates) keys.push_back("prune.calib_seq_len");
  for (const char* key : keys) {
    const int64_t seq = cfg.get_int(key);
    if (seq <= context) continue;
    const std::string what = core::str(key, ": ", seq, " tokens exceed the context of ", source, " (",
                                       context, " positions, max_position_embeddings)");
    if (!allow) throw core::ConfigError(what + "; set data.beyond_context=true to run past it anyway");
    core::log::warn(what + "; data.beyond_context is set: results past the context are not meaningful");
  }
}

nlohmann::ordered_json evaluate_config(model::Decoder& model, const text::Tokenizer& tok, const config::Config& cfg) {
  std::vector<std::string> files;
  for (const auto& f : cfg.get_string_list("eval.data")) files.push_back(core::resolve_path(f));
  return evaluate_files(model, tok, files, perplexity_options(cfg));
}

}  // namespace patch::eval
