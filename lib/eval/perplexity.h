#pragma once
// Perplexity by the usual protocol of WikiText-2 evaluations: the text's token
// stream cut into windows of seq_len tokens, the loss averaged over every
// next-token prediction inside the windows.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config/config.h"
#include "io/model_config.h"
#include "model/decoder.h"
#include "text/tokenizer.h"

namespace patch::eval {

struct PerplexityOptions {
  int64_t seq_len = 256;
  // 0 or seq_len: consecutive non-overlapping windows (the remainder that does
  // not fill a window is dropped). Smaller: sliding windows that score only the
  // tokens not scored by the previous window (the transformers recipe).
  int64_t stride = 0;
  int64_t max_windows = 0;  // 0: all windows; else the first ones
  int64_t batch_size = 4;
};

struct PerplexityResult {
  double mean_nll = 0.0;    // nats per predicted token
  double perplexity = 0.0;  // exp(mean_nll)
  int64_t predictions = 0;  // next-token predictions scored
  int64_t windows = 0;
  int64_t tokens = 0;       // tokens in the stream
};

PerplexityResult perplexity(model::Decoder& model, const int32_t* tokens, int64_t num_tokens,
                            const PerplexityOptions& opts);

// Perplexity on each text file (tokenized whole, data::tokenize_eval_text):
// {"seq_len", "results": [{data, perplexity, mean_nll, predictions, windows,
// tokens}]}, and with a single file its numbers at the top level too.
nlohmann::ordered_json evaluate_files(model::Decoder& model, const text::Tokenizer& tok,
                                      const std::vector<std::string>& files, const PerplexityOptions& opts);

// The decoder an inference command builds (eval, prune, a sweep's
// evaluations): model.device and model.dtype resolved.
model::DecoderOptions inference_options(const config::Config& cfg);

// The eval.* / data.seq_len keys, and evaluate_files on eval.data (paths
// resolved, "@data/" allowed).
PerplexityOptions perplexity_options(const config::Config& cfg);
// data.seq_len (when `windows`) and prune.calib_seq_len (when `calibrates`)
// against the model's context, max_position_embeddings of `source`: a longer
// window is a core::ConfigError naming the key, or a warning with
// data.beyond_context.
void check_sequence_lengths(const config::Config& cfg, const io::ModelConfig& model, const std::string& source,
                            bool windows, bool calibrates);
nlohmann::ordered_json evaluate_config(model::Decoder& model, const text::Tokenizer& tok, const config::Config& cfg);

}  // namespace patch::eval
