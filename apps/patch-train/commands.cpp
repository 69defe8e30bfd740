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
#include "maskfile/apply.h"
#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "text/tokenizer.h"
#include "model/bench.h"
#include "train/bench.h"
#include "train/trainer.h"

namespace patch::app {
namespace {

using nlohmann::ordered_json;

model::DecoderOptions decoder_options(const config::Config& cfg) {
  model::DecoderOptions o;
  o.device = core::resolve_device(cfg.get_string("model.device"));
  o.dtype = core::resolve_dtype(cfg.get_string("model.dtype"), o.device);
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
  ordered_json out;
  if (const std::string masks = cfg.get_string("model.masks"); !masks.empty()) {
    auto file = maskfile::read_mask_file(core::resolve_path(masks));
    maskfile::apply_masks(decoder, file);
    out["masks"] = file.path;
    out["sparsity"] = file.sparsity();
    core::log::info(core::str("masks ", file.path, ": ", file.layers.size(), " layers, sparsity ", file.sparsity()));
  }

  eval::PerplexityOptions po;
  po.seq_len = cfg.get_int("data.seq_len");
  po.stride = cfg.get_int("eval.stride");
  po.max_windows = cfg.get_int("eval.max_windows");
  po.batch_size = cfg.get_int("eval.batch_size");
  out["model"] = model_path;
  out["seq_len"] = po.seq_len;
  out["results"] = ordered_json::array();
  for (const auto& f : files) {
    const std::string path = core::resolve_path(f);
    auto tokens = data::tokenize_eval_text(path, *tok);
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

int run_train(RunContext& ctx) {
  train::install_stop_handlers();
  return train::run_training(ctx.config, ctx.out_dir);
}

// Timings as JSON lines, one per mode, all measured in this process.
int run_bench(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const auto shape = model::model_shape(cfg.get_string("bench.shape"));
  const at::Device device = core::resolve_device(cfg.get_string("model.device"));
  const at::ScalarType dtype = core::resolve_dtype(cfg.get_string("model.dtype"), device);
  const int64_t batch = cfg.get_int("bench.batch"), seq = cfg.get_int("bench.seq");
  const int warmup = static_cast<int>(cfg.get_int("bench.warmup"));
  const int iters = static_cast<int>(cfg.get_int("bench.iters"));
  const bool ckpt = cfg.get_bool("model.checkpointing");
  for (const auto& mode : cfg.get_string_list("bench.modes")) {
    nlohmann::json j;
    if (mode == "dense") {
      j = model::bench_forward_backward(shape, device, dtype, batch, seq, ckpt, warmup, iters);
      j["mode"] = "dense_fwd_bwd";
    } else {
      train::MaskBenchOptions o;
      o.mode = mode;
      o.device = device;
      o.dtype = dtype;
      o.batch = batch;
      o.seq = seq;
      auto tile = cfg.get_int_list("mask.tile");
      o.tile_rows = tile[0];
      o.tile_cols = tile[1];
      o.target_sparsity = cfg.get_float("mask.target_sparsity");
      o.checkpointing = ckpt;
      o.warmup = warmup;
      o.iters = iters;
      j = train::bench_mask_step(shape, o);
    }
    j["shape"] = cfg.get_string("bench.shape");
    std::cout << j.dump() << std::endl;
  }
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
      {"train", "Learn hybrid dense/2:4 masks (PATCH-Joint, PATCH-Tile or MaskLLM) and write masks.safetensors",
       "data.train", /*writes_outputs=*/true, run_train},
      {"eval", "Perplexity of the model on text files (JSON to stdout and <out>/eval.json)",
       "eval.data", /*writes_outputs=*/true, run_eval},
      {"bench", "Time forward+backward and mask-learning steps on a random model of a real shape (JSON lines)",
       "", /*writes_outputs=*/false, run_bench},
      {"inspect", "List the model's linear layers with shapes, dtypes and parameter counts", "",
       /*writes_outputs=*/false, run_inspect},
  };
  return cmds;
}

}  // namespace patch::app
