#include "commands.h"

#include <ATen/ATen.h>

#include <iomanip>
#include <iostream>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "core/tensor_utils.h"
#include "data/dataset.h"
#include "eval/perplexity.h"
#include "io/checkpoint.h"
#include "model/decoder.h"
#include "text/tokenizer.h"

namespace patch::app {
namespace {

using nlohmann::ordered_json;

model::DecoderOptions decoder_options(const config::Config& cfg) {
  model::DecoderOptions o;
  o.device = core::resolve_device(cfg.get_string("model.device"));
  std::string dtype = cfg.get_string("model.dtype");
  // On the CPU, "auto" keeps float32 (bf16 matmuls there are slow and inexact).
  o.dtype = dtype == "auto" && !o.device.is_cuda() ? at::kFloat : core::resolve_dtype(dtype, o.device);
  return o;
}

data::DataOptions data_options(const config::Config& cfg) {
  data::DataOptions o;
  o.format = cfg.get_string("data.format");
  o.jsonl_field = cfg.get_string("data.jsonl_field");
  o.document_separator = cfg.get_string("data.document_separator");
  o.cache_dir = cfg.get_string("data.cache_dir");
  return o;
}

int run_eval(RunContext& ctx) {
  const auto& cfg = ctx.config;
  auto files = cfg.get_string_list("eval.data");
  if (files.empty())
    throw core::ConfigError("eval.data: no evaluation file given (use --data FILE or eval.data in the config)");
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  io::Checkpoint ckpt = io::load_checkpoint(model_path);
  auto tok = text::load_tokenizer_for(model_path);
  model::Decoder decoder(ckpt, decoder_options(cfg));
  if (!cfg.get_string("model.masks").empty())
    throw core::ConfigError("model.masks: masked evaluation arrives with mask training (issue 4)");

  eval::PerplexityOptions po;
  po.seq_len = cfg.get_int("data.seq_len");
  po.stride = cfg.get_int("eval.stride");
  po.max_windows = cfg.get_int("eval.max_windows");
  po.batch_size = cfg.get_int("eval.batch_size");
  ordered_json out;
  out["model"] = model_path;
  out["seq_len"] = po.seq_len;
  out["results"] = ordered_json::array();
  for (const auto& f : files) {
    const std::string path = core::resolve_path(f);
    auto tokens = data::tokenize_eval_text(path, *tok, data_options(cfg));
    core::log::info(core::str("eval ", path, ": ", tokens.size(), " tokens"));
    auto r = eval::perplexity(decoder, tokens.data(), static_cast<int64_t>(tokens.size()), po);
    out["results"].push_back({{"data", path},
                              {"perplexity", r.perplexity},
                              {"mean_nll", r.mean_nll},
                              {"predictions", r.predictions},
                              {"windows", r.windows},
                              {"tokens", r.tokens}});
  }
  // A single file's numbers also sit at the top level, where scripts look first.
  if (files.size() == 1)
    for (const auto& k : {"perplexity", "mean_nll", "predictions", "windows", "tokens"})
      out[k] = out["results"][0][k];
  std::string text = out.dump(2);
  std::cout << text << std::endl;
  core::write_file_atomic(ctx.out_dir + "/eval.json", text + "\n");
  return 0;
}

int run_inspect(RunContext& ctx) {
  const std::string model_path = core::resolve_path(ctx.config.get_string("model.path"));
  io::Checkpoint ckpt = io::load_checkpoint(model_path);
  const auto& mc = ckpt.config;
  std::cout << model_path << " (" << ckpt.format << ", " << mc.model_type << "): " << mc.num_layers
            << " layers, hidden " << mc.hidden_size << ", " << mc.num_heads << " heads / "
            << mc.num_kv_heads << " kv, vocab " << mc.vocab_size << "\n";
  model::DecoderOptions opts;
  opts.dtype = ckpt.tensors.begin()->second.scalar_type();
  model::Decoder decoder(ckpt, opts);
  int64_t total = 0;
  std::cout << std::left << std::setw(44) << "layer" << std::setw(16) << "shape" << std::setw(10)
            << "dtype" << "params\n";
  for (auto* lin : decoder.linears()) {
    const auto& w = ckpt.tensors.at(lin->name() + ".weight");
    std::string shape = core::str("[", w.size(0), ", ", w.size(1), "]");
    std::cout << std::setw(44) << lin->name() << std::setw(16) << shape << std::setw(10)
              << core::dtype_name(w.scalar_type()) << w.numel() << "\n";
    total += w.numel();
  }
  std::cout << decoder.linears().size() << " linear layers, " << total << " parameters\n";
  return 0;
}

}  // namespace

const std::vector<Command>& commands() {
  static const std::vector<Command> cmds = {
      {"eval", "Perplexity of the model on text files (JSON to stdout and <out>/eval.json)",
       "eval.data", /*writes_outputs=*/true, run_eval},
      {"inspect", "List the model's linear layers with shapes, dtypes and parameter counts", "",
       /*writes_outputs=*/false, run_inspect},
  };
  return cmds;
}

}  // namespace patch::app
