#include "commands.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
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
#include "maskfile/npz_masks.h"
#include "deploy/bench.h"
#include "deploy/export.h"
#include "deploy/generate.h"
#include "deploy/hybrid_linear.h"
#include "deploy/packed.h"
#include "deploy/verify.h"
#include "dist/dist.h"
#include "model/bench.h"
#include "model/decoder.h"
#include "prune/pruner.h"
#include "sweep/sweep.h"
#include "text/tokenizer.h"
#include "sparsity/linear_mask.h"
#include "train/bench.h"
#include "train/finetune.h"
#include "train/train_options.h"
#include "train/trainer.h"

namespace patch::app {
namespace {

using nlohmann::ordered_json;

// Runs scripts/plot.py with the build's Python; throws core::Error when it fails.
void plot(const std::string& what, const std::string& input, const std::string& png) {
  const char* py = std::getenv("PATCH_PYTHON");
  const char* dir = std::getenv("PATCH_SCRIPTS_DIR");
  const std::string cmd = core::str("'", py && *py ? py : PATCH_DEFAULT_PYTHON, "' '",
                                    dir && *dir ? dir : PATCH_DEFAULT_SCRIPTS_DIR, "/plot.py' ", what, " '", input,
                                    "' --out '", png, "'");
  if (std::system(cmd.c_str()) != 0)
    throw core::Error(core::str("plot: '", cmd, "' failed (the figure needs matplotlib in that Python)"));
  core::log::info("wrote " + png);
}

// The packed layers' options, for every command that installs them.
deploy::HybridOptions hybrid_options(const config::Config& cfg) {
  deploy::HybridOptions o;
  o.prefill_dense_copy = cfg.get_bool("deploy.prefill_dense_copy");
  o.overlap_expansion = cfg.get_bool("deploy.prefill_overlap");
  o.prefill_split = cfg.get_bool("deploy.prefill_split");
  o.prefill_mixed = cfg.get_string("deploy.split_kernel") == "mixed";
  return o;
}

// model.masks (W * M through the providers) or model.packed (the hybrid
// kernels) on the decoder, recorded in `out` (path and sparsity); neither: dense.
void install_sparsity(model::Decoder& decoder, const config::Config& cfg, ordered_json& out) {
  const std::string masks = cfg.get_string("model.masks"), packed_path = cfg.get_string("model.packed");
  if (!masks.empty() && !packed_path.empty())
    throw core::ConfigError("model.packed: give either a mask file or a packed file, not both");
  if (!masks.empty()) {
    auto file = maskfile::read_mask_file(core::resolve_path(masks));
    maskfile::apply_masks(decoder, file);
    out["masks"] = file.path;
    out["sparsity"] = file.sparsity();
    core::log::info(core::str("masks ", file.path, ": ", file.layers.size() + file.bitmasks.size(),
                              " layers, sparsity ", file.sparsity()));
  } else if (!packed_path.empty()) {
    const auto packed = deploy::read_packed(core::resolve_path(packed_path));
    deploy::install_packed(decoder, packed, hybrid_options(cfg));
    out["packed"] = packed.path;
    out["sparsity"] = packed.sparsity();
    core::log::info(core::str("packed ", packed.path, ": ", packed.layers.size(), " layers, sparsity ",
                              packed.sparsity()));
  }
}

int run_eval(RunContext& ctx) {
  const auto& cfg = ctx.config;
  if (cfg.get_string_list("eval.data").empty())
    throw core::ConfigError("eval.data: no evaluation file given (use --data FILE or eval.data in the config)");
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  const model::DecoderOptions dopts = eval::inference_options(cfg);
  io::Checkpoint ckpt = io::load_checkpoint(model_path, dopts.dtype);
  auto tok = text::load_tokenizer_for(model_path);
  eval::check_sequence_lengths(cfg, ckpt.config, model_path, /*windows=*/true, /*calibrates=*/false);
  model::Decoder decoder(ckpt, dopts);
  ordered_json out;
  out["model"] = model_path;
  install_sparsity(decoder, cfg, out);
  open_outputs(ctx);
  out.update(eval::evaluate_config(decoder, *tok, cfg));
  std::string text = out.dump(2);
  std::cout << text << std::endl;
  if (!ctx.out_dir.empty()) core::write_file_atomic(ctx.out_dir + "/eval.json", text + "\n");
  return 0;
}

// One-shot pruning: masks.safetensors (and SparseGPT's updated weights as a
// pruned checkpoint), prune.json, and the pruned model's perplexity on eval.data.
int run_prune(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  const model::DecoderOptions dopts = eval::inference_options(cfg);
  io::Checkpoint ckpt = io::load_checkpoint(model_path, dopts.dtype);
  auto tok = text::load_tokenizer_for(model_path);
  model::Decoder decoder(ckpt, dopts);
  auto po = prune::prune_options(cfg);
  const int64_t finetune_steps = cfg.get_int("prune.finetune_steps");
  if (const std::string masks = cfg.get_string("model.masks"); !masks.empty()) {
    if ((po.method != prune::Method::kSparseGPT || !po.sparsegpt.update_weights) && finetune_steps == 0)
      throw core::ConfigError("model.masks: prune --masks fits the weights to those masks: it needs "
                              "--method sparsegpt and --set prune.update_weights=true (SparseGPT's update), or "
                              "--set prune.finetune_steps=N (an end-to-end fine-tune), or both");
    auto file = std::make_shared<maskfile::MaskFile>(maskfile::read_mask_file(core::resolve_path(masks)));
    for (const auto& l : file->layers) {
      const auto it = ckpt.tensors.find(l.name + ".weight");
      if (it == ckpt.tensors.end())
        throw core::Error(core::str(file->path, ": layer '", l.name, "' is not in the model '", model_path, "'"));
      maskfile::check_layer_shape(*file, l, it->second.size(0), it->second.size(1));
    }
    po.fixed_masks = file;
  }
  // Windows of eval.data only when files are given; calibration unless magnitude.
  if (po.method != prune::Method::kMagnitude) prune::require_calibration_data(cfg);
  eval::check_sequence_lengths(cfg, ckpt.config, model_path, !cfg.get_string_list("eval.data").empty(),
                               po.method != prune::Method::kMagnitude);
  const bool update = po.method == prune::Method::kSparseGPT && po.sparsegpt.update_weights;
  if (po.sparsegpt.update_weights && !update)
    core::log::warn("prune.update_weights: only sparsegpt updates weights; writing masks only");
  const bool finetune = finetune_steps > 0;
  if (finetune) train::require_finetune_data(cfg);
  // A stopped fine-tune continues with --resume from its state in the run folder.
  const std::string finetune_state = ctx.out_dir.empty() ? "" : ctx.out_dir + "/finetune_state.safetensors";
  if (finetune && cfg.get_bool("output.resume") && !finetune_state.empty())
    train::check_same_run(cfg, finetune_state, train::finetune_mutable_keys());
  // A GGUF input's model/ is what `export` writes for it: one model.safetensors
  // and a generated config.json; its tokenizer stays in the GGUF file.
  if ((update || finetune) && ckpt.format == "gguf")
    core::log::info(core::str("prune: model/ gets the weights and config.json; the tokenizer stays in ", model_path));
  open_outputs(ctx);

  at::Tensor calib;
  const bool calibrates = po.method != prune::Method::kMagnitude && (!po.fixed_masks || update);
  if (calibrates) calib = prune::calibration_from_config(cfg, *tok);
  core::reset_peak_memory(decoder.options().device);
  const auto t0 = std::chrono::steady_clock::now();
  prune::PruneResult result;
  if (calibrates || !po.fixed_masks) {
    result = prune::prune_model(decoder, calib, po);
  } else {
    result.masks = *po.fixed_masks;  // the fine-tune starts from the model's own weights
  }
  std::vector<double> finetune_losses;
  if (finetune) {
    const auto ids = train::finetune_windows(cfg, *tok, finetune_steps * po.micro_batch);
    auto fo = train::finetune_options(cfg);
    fo.checkpoint = finetune_state;
    fo.resume = cfg.get_bool("output.resume");
    auto ft = train::finetune_kept_weights(decoder, result.masks, result.weights, ids, fo);
    result.weights = std::move(ft.weights);
    finetune_losses = std::move(ft.losses);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  auto& file = result.masks;
  file.meta.model_source = model_path;
  file.meta.model_config_hash = io::config_hash(ckpt.config);
  // Given masks keep the record of how they were made.
  if (!po.fixed_masks) file.meta.training_config = cfg.tree().dump();
  // masks.safetensors, model/ and prune.json appear together, prune.json last.
  core::OutputSet outputs(ctx.out_dir);
  maskfile::write_mask_file(outputs.path("masks.safetensors"), file);
  if (update || finetune) deploy::export_checkpoint(ckpt, file, result.weights, outputs.path("model"));

  ordered_json out;
  out["model"] = model_path;
  out["method"] = prune::method_name(po.method);
  out["pattern"] = po.fixed_masks ? "given masks (" + po.fixed_masks->path + ")" : prune::structure_name(po.structure);
  out["target_sparsity"] = file.meta.target_sparsity;
  if (po.sparsegpt.refine_iters > 0) out["refine_iters"] = po.sparsegpt.refine_iters;
  out["sparsity"] = file.sparsity();
  out["layers"] = file.layers.size() + file.bitmasks.size();
  out["calibration_sequences"] = calib.defined() ? calib.size(0) : 0;
  out["calibration_passes"] = result.calibration_passes;
  out["prune_seconds"] = seconds;
  out["peak_memory_gib"] = core::peak_memory_gib(decoder.options().device);
  if (!result.percdamp.empty()) {
    double max_damp = 0;
    for (const auto& [name, d] : result.percdamp) max_damp = std::max(max_damp, d);
    out["max_percdamp"] = max_damp;
  }
  out["masks"] = ctx.out_dir + "/masks.safetensors";
  if (finetune) {
    out["finetune_steps"] = finetune_steps;
    out["finetune_loss_first"] = finetune_losses.front();
    out["finetune_loss_last"] = finetune_losses.back();
  }
  if (update || finetune) out["pruned_model"] = ctx.out_dir + "/model";
  if (!cfg.get_string_list("eval.data").empty()) out.update(eval::evaluate_config(decoder, *tok, cfg));
  std::string text = out.dump(2);
  outputs.publish("prune.json", text + "\n");
  if (finetune && !finetune_state.empty()) std::filesystem::remove(finetune_state);  // done: the outputs say it all
  std::cout << text << std::endl;
  return 0;
}

maskfile::MaskFile required_masks(const config::Config& cfg, const std::string& command) {
  const std::string masks = cfg.get_string("model.masks");
  if (masks.empty())
    throw core::ConfigError(core::str("model.masks: ", command, " needs a mask file (use --masks FILE)"));
  return maskfile::read_mask_file(core::resolve_path(masks));
}

// A pruned Hugging Face checkpoint: the input's layout with masked weights zeroed.
int run_export(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  auto file = required_masks(cfg, "export");
  io::Checkpoint ckpt = io::load_checkpoint(model_path);
  open_outputs(ctx);
  // The checkpoint's files appear together, export.json last.
  core::OutputSet outputs(ctx.out_dir);
  deploy::export_checkpoint(ckpt, file, {}, outputs.path(""));
  ordered_json out{{"model", model_path},       {"masks", file.path},
                   {"sparsity", file.sparsity()}, {"layers", file.layers.size() + file.bitmasks.size()},
                   {"out", ctx.out_dir}};
  outputs.publish("export.json", out.dump(2) + "\n");
  std::cout << out.dump(2) << std::endl;
  return 0;
}

// The packed hybrid format of the masked layers: <out>/packed.safetensors.
int run_pack(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  auto file = required_masks(cfg, "pack");
  io::Checkpoint ckpt = io::load_checkpoint(model_path);
  auto packed = deploy::pack_model(ckpt, file);
  open_outputs(ctx);
  const std::string out_file = ctx.out_dir + "/packed.safetensors";
  deploy::write_packed(out_file, packed);
  int64_t dense_bytes = 0;
  for (const auto& l : packed.layers) dense_bytes += 2 * l.grid.numel();
  ordered_json out{{"model", model_path},
                   {"masks", file.path},
                   {"layers", packed.layers.size()},
                   {"sparsity", packed.sparsity()},
                   {"packed_bytes", packed.bytes()},
                   {"dense_bf16_bytes", dense_bytes},
                   {"bytes_ratio", static_cast<double>(packed.bytes()) / static_cast<double>(dense_bytes)},
                   {"packed", out_file}};
  const std::string text = out.dump(2);
  std::cout << text << std::endl;
  core::write_file_atomic(ctx.out_dir + "/pack.json", text + "\n");
  return 0;
}

// The decoder linears' weights by name, for checks against a model.
std::map<std::string, at::Tensor> linear_weights(model::Decoder& decoder) {
  std::map<std::string, at::Tensor> weights;
  for (auto* lin : decoder.linears()) weights[lin->name()] = lin->weight();
  return weights;
}

// The prompts of generate.prompt or generate.prompts (one per line; .jsonl:
// "prompt" or "text" of each object), none empty.
std::vector<std::string> read_prompts(const config::Config& cfg) {
  const std::string one = cfg.get_string("generate.prompt"), file = cfg.get_string("generate.prompts");
  if (one.empty() == file.empty())
    throw core::ConfigError("generate.prompt: give a prompt (--prompt TEXT) or a file of prompts (--prompts FILE)");
  if (!one.empty()) return {one};
  const std::string path = core::resolve_path(file);
  const bool jsonl = path.size() > 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0;
  std::vector<std::string> prompts;
  std::istringstream lines(core::read_file(path));
  int64_t n = 0;
  for (std::string line; std::getline(lines, line);) {
    ++n;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    if (!jsonl) {
      prompts.push_back(line);
      continue;
    }
    const auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    const char* key = j.is_object() && j.contains("prompt") ? "prompt" : "text";
    if (!j.is_object() || !j.contains(key) || !j[key].is_string())
      throw core::Error(core::str(path, ":", n, ": expected a JSON object with a \"prompt\" or \"text\" string"));
    prompts.push_back(j[key].get<std::string>());
  }
  if (prompts.empty()) throw core::Error(core::str("generate.prompts: '", path, "' holds no prompt"));
  return prompts;
}

// Text from a prompt with a KV cache: the text on stdout, then one JSON line.
int run_generate(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const auto prompts = read_prompts(cfg);
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  const model::DecoderOptions dopts = eval::inference_options(cfg);
  io::Checkpoint ckpt = io::load_checkpoint(model_path, dopts.dtype);
  auto tok = text::load_tokenizer_for(model_path);
  model::Decoder decoder(ckpt, dopts);
  ordered_json out{{"model", model_path}};
  install_sparsity(decoder, cfg, out);
  maskfile::bake_masks(decoder);  // W * M once, not at every step (and capturable by a CUDA graph)
  std::vector<std::vector<int64_t>> ids;
  for (const auto& text : prompts) {
    const auto enc = tok->encode(text, cfg.get_bool("generate.add_special"));
    ids.emplace_back(enc.begin(), enc.end());
  }
  deploy::GenerateOptions go;
  go.max_new_tokens = cfg.get_int("generate.max_new_tokens");
  go.sampling = {cfg.get_float("generate.temperature"), cfg.get_int("generate.top_k"), cfg.get_float("generate.top_p"),
                 static_cast<uint64_t>(cfg.get_int("generate.seed"))};
  for (int64_t id : {static_cast<int64_t>(ckpt.config.eos_token_id), static_cast<int64_t>(tok->eos_id())})
    if (id >= 0 && std::find(go.eos_ids.begin(), go.eos_ids.end(), id) == go.eos_ids.end()) go.eos_ids.push_back(id);
  go.pad_id = go.eos_ids.empty() ? 0 : go.eos_ids.front();
  go.cuda_graph = cfg.get_bool("generate.cuda_graph") && dopts.device.is_cuda();
  open_outputs(ctx);
  train::install_stop_handlers();
  const auto g = deploy::generate(decoder, ids, go);
  std::string jsonl;
  int64_t new_tokens = 0;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const std::vector<int32_t> gen(g.new_ids[i].begin(), g.new_ids[i].end());
    const std::string text = tok->decode(gen, /*skip_special=*/true);
    std::cout << prompts[i] << text << "\n" << (i + 1 < prompts.size() ? "\n" : "");
    new_tokens += static_cast<int64_t>(gen.size());
    jsonl += ordered_json{{"prompt", prompts[i]}, {"prompt_ids", ids[i]}, {"new_ids", g.new_ids[i]}, {"text", text}}
                 .dump() +
             "\n";
  }
  out["prompts"] = prompts.size();
  out["prompt_tokens"] = g.prompt_tokens;
  out["new_tokens"] = new_tokens;
  out["prefill_ms"] = g.prefill_ms;
  out["decode_steps"] = g.decode_steps;
  out["decode_ms"] = g.decode_ms;
  // Every sequence of the batch advances one token per step.
  out["decode_tokens_per_s"] =
      g.decode_ms > 0 ? static_cast<double>(g.decode_steps * static_cast<int64_t>(prompts.size())) / (g.decode_ms / 1e3)
                      : 0.0;
  out["cuda_graph"] = go.cuda_graph;
  out["device"] = dopts.device.str();
  out["dtype"] = core::dtype_name(dopts.dtype);
  out["peak_memory_gib"] = core::peak_memory_gib(dopts.device);
  std::cout << out.dump() << std::endl;
  if (!ctx.out_dir.empty()) {
    core::OutputSet outputs(ctx.out_dir);
    core::write_file_atomic(outputs.path("generations.jsonl"), jsonl);
    outputs.publish("generate.json", out.dump(2) + "\n");
  }
  return 0;
}

// Masks between masks.safetensors and the PATCH / MaskLLM .npz layouts.
int run_convert(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const std::string masks = cfg.get_string("model.masks");
  if (masks.empty()) throw core::ConfigError("model.masks: convert needs a mask file (use --masks FILE)");
  const std::string in_path = core::resolve_path(masks);
  const bool npz_in = in_path.size() > 4 && in_path.compare(in_path.size() - 4, 4, ".npz") == 0;
  std::string to = cfg.get_string("convert.to");
  if (to.empty()) {
    if (!npz_in)
      throw core::ConfigError("convert.to: give the output format (--to patch-npz or maskllm-npz) for a "
                              "masks.safetensors input");
    to = "masks";
  }
  if (to != "masks") maskfile::parse_npz_layout(to, "convert.to");
  if ((to == "masks") != npz_in)
    throw core::ConfigError(core::str("convert.to: '", to, "' from '", in_path, "': convert goes from an .npz file to "
                                      "masks, or from a mask file to patch-npz or maskllm-npz"));
  const std::string model_path = cfg.has("model.path") ? cfg.get_string("model.path") : "";
  maskfile::NpzImportOptions opts;
  std::unique_ptr<model::Decoder> decoder;
  if (!model_path.empty()) {
    const std::string path = core::resolve_path(model_path);
    io::Checkpoint ckpt = io::load_checkpoint(path);
    decoder = std::make_unique<model::Decoder>(ckpt, model::DecoderOptions{});
    opts.weights = linear_weights(*decoder);
    opts.model_source = path;
    opts.model_config_hash = io::config_hash(ckpt.config);
  }
  ordered_json out{{"masks", in_path}, {"to", to}};
  maskfile::MaskFile file;
  maskfile::NpzImportReport report;
  if (npz_in) {
    // A tile other than the default is the user's: it must then divide the file's own.
    if (cfg.at("mask.tile") != config::find_key("mask.tile")->default_value) {
      const auto tile = cfg.get_int_list("mask.tile");
      opts.tile_rows = tile.at(0);
      opts.tile_cols = tile.at(1);
      opts.tile_given = true;
    }
    opts.repair = cfg.get_bool("convert.repair");
    file = maskfile::import_npz(in_path, opts, &report);
    for (const auto& name : report.absent)
      core::log::warn(core::str(name, ": no mask in ", in_path, "; the layer stays dense"));
    out["from"] = maskfile::npz_layout_name(report.layout);
    out["dense_tiles"] = report.dense_tiles;
    out["sparse_tiles"] = report.sparse_tiles;
    if (opts.repair) {
      out["repaired_tiles"] = report.repaired_tiles;
      out["changed_weights"] = report.changed_weights;
    }
  } else {
    file = maskfile::read_mask_file(in_path);
    if (decoder)
      for (const auto& l : file.layers) {
        auto* lin = decoder->linear(l.name);
        if (!lin) throw core::Error(core::str(in_path, ": layer '", l.name, "' is not in the model '", model_path, "'"));
        maskfile::check_layer_shape(file, l, lin->weight().size(0), lin->weight().size(1));
      }
    out["from"] = "masks";
  }
  open_outputs(ctx);
  const std::string name = to == "masks" ? "masks.safetensors" : to == "patch-npz" ? "mask.npz" : "mask_compressed.npz";
  core::OutputSet outputs(ctx.out_dir);
  if (to == "masks") maskfile::write_mask_file(outputs.path(name), file);
  else maskfile::export_npz(file, outputs.path(name), maskfile::parse_npz_layout(to, "convert.to"));
  out["layers"] = file.layers.size() + file.bitmasks.size();
  out["sparsity"] = file.sparsity();
  out["tile"] = core::str(file.meta.tile_rows, "x", file.meta.tile_cols);
  out["out"] = ctx.out_dir + "/" + name;
  outputs.publish("convert.json", out.dump(2) + "\n");
  std::cout << out.dump(2) << std::endl;
  return 0;
}

int run_bench_deploy(RunContext& ctx) {
  const auto& cfg = ctx.config;
  deploy::DeployBenchOptions o;
  o.shapes = cfg.get_string_list("deploy.shapes");
  o.layers = cfg.get_string_list("deploy.layers");
  o.sparsities = cfg.get_float_list("deploy.sparsities");
  o.tokens = cfg.get_int_list("deploy.tokens");
  o.gemm_tokens = cfg.get_int_list("deploy.gemm_tokens");
  o.hybrid = hybrid_options(cfg);
  o.repeats = static_cast<int>(cfg.get_int("deploy.repeats"));
  o.end_to_end = cfg.get_bool("deploy.end_to_end");
  o.e2e_sparsity = cfg.get_float("deploy.e2e_sparsity");
  o.e2e_prefill = cfg.get_int("deploy.e2e_prefill");
  o.gen_prompt = cfg.get_int("deploy.gen_prompt");
  o.gen_new_tokens = cfg.get_int("deploy.gen_new_tokens");
  o.gen_batches = cfg.get_int_list("deploy.gen_batches");
  const auto tile = cfg.get_int_list("mask.tile");
  o.tile_rows = tile[0];
  o.tile_cols = tile[1];
  o.device = core::resolve_device(cfg.get_string("model.device"));
  const auto emit = [](const nlohmann::json& j) { std::cout << j.dump() << std::endl; };
  if (const std::string packed = cfg.get_string("model.packed"); !packed.empty())
    deploy::bench_packed(deploy::read_packed(core::resolve_path(packed)), o, emit);
  else
    deploy::bench_deploy(o, emit);
  return 0;
}

int run_verify(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const std::string masks = cfg.get_string("model.masks");
  if (masks.empty()) throw core::ConfigError("model.masks: verify needs a mask file (use --masks FILE)");
  const std::string model = cfg.has("model.path") ? core::resolve_path(cfg.get_string("model.path")) : "";
  auto report = deploy::verify(core::resolve_path(masks), model, cfg.get_string("verify.pruned"));
  std::cout << report.format() << std::flush;
  return report.ok() ? 0 : 1;
}

int run_sweep(RunContext& ctx) {
  sweep::check_sweep(ctx.config);
  open_outputs(ctx);
  train::install_stop_handlers();
  const int rc = sweep::run_sweep(ctx.config, ctx.out_dir);
  if (rc != 0) return rc;
  std::cout << core::read_file(ctx.out_dir + "/sweep.csv");
  try {
    plot("sweep", ctx.out_dir + "/sweep.json", ctx.out_dir + "/sweep.png");
  } catch (const core::Error& e) {
    core::log::warn(std::string(e.what()) + "; sweep.json and sweep.csv are complete");
  }
  return 0;
}

// The launcher (is_launcher) starts this command once per rank, after
// checking that each rank has its GPU.
int launch_ranks(const RunContext& ctx) {
  const int nproc = static_cast<int>(ctx.config.get_int("dist.nproc"));
  dist::rank_device(core::resolve_device(ctx.config.get_string("model.device")), nproc - 1, nproc);
  return dist::launch(nproc, ctx.argv);
}

int run_train(RunContext& ctx) {
  if (is_launcher(ctx)) {
    const int nproc = static_cast<int>(ctx.config.get_int("dist.nproc"));
    train::check_run_setup(ctx.config, nproc);
    open_outputs(ctx);
    core::log::info(core::str("data-parallel run: ", nproc, " ranks, rank 0 logs to ", ctx.out_dir, "/run.log"));
    return launch_ranks(ctx);
  }
  train::install_stop_handlers();
  return train::run_training(ctx.config, ctx.out_dir, [&] { open_outputs(ctx); });
}

// One-shot 2:4 pruning (mask only) of a random model of `shape` with random
// calibration ids [prune.calib_samples, prune.calib_seq_len]: time and peak
// memory of the block-by-block calibration.
nlohmann::json bench_prune(const config::Config& cfg, const io::ModelConfig& shape, at::Device device,
                           at::ScalarType dtype, const std::string& method) {
  model::DecoderOptions mo;
  mo.device = device;
  mo.dtype = dtype;
  at::manual_seed(0);
  auto decoder = model::Decoder::random(shape, mo);
  auto co = prune::calibration_options(cfg);
  auto calib = at::randint(shape.vocab_size, {co.samples, co.seq_len}, at::kLong);
  auto po = prune::prune_options(cfg);
  po.method = prune::parse_method(method);
  po.structure = prune::Structure::k24;
  po.sparsegpt.update_weights = false;
  double weights_gib = 0;
  for (auto* lin : decoder.linears()) weights_gib += lin->weight().numel() * lin->weight().element_size();
  weights_gib /= 1024.0 * 1024.0 * 1024.0;
  core::reset_peak_memory(device);
  const auto t0 = std::chrono::steady_clock::now();
  auto r = prune::prune_model(decoder, calib, po);
  if (device.is_cuda()) at::empty({1}, at::TensorOptions().device(device)).cpu();  // synchronize
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return {{"mode", "prune_" + method},
          {"calib_samples", calib.size(0)},
          {"calib_seq_len", calib.size(1)},
          {"seconds", seconds},
          {"peak_gib", core::peak_memory_gib(device)},
          {"block_linear_weights_gib", weights_gib},
          {"sparsity", r.masks.sparsity()},
          {"dtype", core::dtype_name(dtype)},
          {"device", device.str()}};
}

// Timings as JSON lines, one per mode, all measured in this process.
int run_bench(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const auto shape = model::model_shape(cfg.get_string("bench.shape"));
  const auto env = dist::env_from_environment();
  const at::Device device =
      dist::rank_device(core::resolve_device(cfg.get_string("model.device")), env.local_rank, env.world);
  const int64_t batch = cfg.get_int("bench.batch"), seq = cfg.get_int("bench.seq");
  const auto step = train::train_options(cfg, device).step;
  train::bench_step_options(step, batch, static_cast<int>(std::max<int64_t>(cfg.get_int("dist.nproc"), env.world)));
  if (is_launcher(ctx)) return launch_ranks(ctx);
  dist::Group group(env, device, cfg.get_string("dist.backend"));
  const at::ScalarType dtype = core::resolve_dtype(cfg.get_string("model.dtype"), device);
  const int warmup = static_cast<int>(cfg.get_int("bench.warmup"));
  const int iters = static_cast<int>(cfg.get_int("bench.iters"));
  const bool ckpt = cfg.get_bool("model.checkpointing");
  const bool profile = cfg.get_bool("bench.profile");
  const bool graph = cfg.get_bool("train.cuda_graph");
  // A mask mode is always reported beside the dense step of the same model, measured first.
  auto modes = cfg.get_string_list("bench.modes");
  bool any_mask = false;
  for (const auto& m : modes) any_mask = any_mask || (m != "dense" && m.rfind("prune_", 0) != 0);
  if (any_mask && std::find(modes.begin(), modes.end(), "dense") == modes.end()) modes.insert(modes.begin(), "dense");
  for (const auto& mode : modes) {
    // Several ranks time the data-parallel mask step only; its one-rank
    // counterpart is the same command without --nproc.
    const bool mask_mode = mode != "dense" && mode.rfind("prune_", 0) != 0;
    if (group.world() > 1 && !mask_mode) continue;
    nlohmann::json j;
    if (mode == "dense") {
      j = model::bench_forward_backward(shape, device, dtype, batch, seq, ckpt, warmup, iters, profile,
                                        graph);
      j["mode"] = "dense_fwd_bwd";
    } else if (mode == "prune_wanda" || mode == "prune_sparsegpt") {
      j = bench_prune(cfg, shape, device, dtype, mode.substr(6));
    } else {
      train::MaskBenchOptions o;
      // The step as `train` runs it with this configuration, in this mode.
      o.step = step;
      o.step.masks.mask.mode = sparsity::parse_mask_mode(mode);
      o.dtype = dtype;
      o.batch = batch;
      o.seq = seq;
      o.checkpointing = ckpt;
      o.warmup = warmup;
      o.iters = iters;
      o.profile = profile;
      o.group = &group;
      j = train::bench_mask_step(shape, o);
    }
    j["shape"] = cfg.get_string("bench.shape");
    if (group.is_root()) std::cout << j.dump() << std::endl;
  }
  return 0;
}

void inspect_model(const std::string& model_path) {
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
}

// A run's metrics.jsonl in a few lines: its first and last training lines and
// every validation point.
void inspect_metrics(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw core::Error(core::str(path, ": cannot read the metrics file"));
  std::string line;
  int64_t n = 0;
  nlohmann::json first, last;
  std::cout << path << ":\n" << std::left << std::setw(8) << "step" << std::setw(14) << "valid_ppl" << "hard_sparsity\n";
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    ++n;
    auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object()) throw core::Error(core::str(path, ":", n, ": not a JSON object"));
    if (j.contains("ce")) (first.is_null() ? first : last) = j;
    if (j.contains("valid_ppl"))
      std::cout << std::setw(8) << j.value("step", int64_t{0}) << std::setw(14) << j["valid_ppl"].get<double>()
                << j.value("hard_sparsity", std::nan("")) << "\n";
  }
  if (last.is_null()) last = first;
  if (!last.is_null())
    std::cout << "last training line: step " << last.value("step", int64_t{0}) << ", loss " << last.value("ce", 0.0)
              << ", soft density " << last.value("soft_density", 0.0) << ", " << last.value("tokens_per_s", 0.0)
              << " tokens/s\n";
}

int run_inspect(RunContext& ctx) {
  const auto& cfg = ctx.config;
  const std::string masks = cfg.get_string("model.masks");
  const std::string metrics = cfg.get_string("inspect.metrics").empty() ? "" : core::resolve_path(cfg.get_string("inspect.metrics"));
  if (!cfg.has("model.path") && masks.empty() && metrics.empty())
    throw core::ConfigError(
        "model.path: inspect needs a model (--model PATH), a mask file (--masks FILE) or a metrics file (--metrics FILE)");
  const std::string png = cfg.get_string("inspect.plot");
  if (!png.empty() && !masks.empty() && !metrics.empty())
    throw core::ConfigError("inspect.plot: --plot draws one figure; give --masks or --metrics, not both");
  if (cfg.has("model.path")) inspect_model(core::resolve_path(cfg.get_string("model.path")));
  if (!masks.empty()) {
    auto file = maskfile::read_mask_file(core::resolve_path(masks));
    std::cout << file.path << ": " << file.meta.structure << ", mode " << file.meta.mode
              << (file.meta.method.empty() ? "" : " (" + file.meta.method + ")") << ", tile " << file.meta.tile_rows
              << "x" << file.meta.tile_cols << ", sparsity " << file.sparsity() << "\n"
              << maskfile::density_table(file);
    if (!png.empty()) plot("masks", file.path, png);
  }
  if (!metrics.empty()) {
    inspect_metrics(metrics);
    if (!png.empty()) plot("curves", metrics, png);
  }
  if (!png.empty() && masks.empty() && metrics.empty())
    throw core::ConfigError("inspect.plot: --plot draws a mask file (--masks FILE) or training curves (--metrics FILE)");
  return 0;
}

}  // namespace

std::vector<Shortcut> key_options(const Command& cmd) {
  std::vector<Shortcut> options;
  if (cmd.inputs & kModel)
    options.push_back({"--model", "model.path",
                       "Checkpoint: a folder, a .gguf file or a cached hub name org/name[@rev]", "PATH"});
  if (!cmd.data_key.empty()) options.push_back({"--data", cmd.data_key, "Data file(s)", "FILE", false});
  if (cmd.inputs & kMasks) options.push_back({"--masks", "model.masks", "Mask file", "FILE"});
  if (cmd.output == Output::kOnRequest)
    options.push_back(
        {"--out", "output.dir", "Also write the result into this folder (nothing is written without it)", "DIR"});
  if (cmd.output == Output::kRunFolder || cmd.output == Output::kResumable)
    options.push_back({"--out", "output.dir", "Output directory", "DIR"});
  if (cmd.output != Output::kNone)
    options.push_back(
        {"--overwrite", "output.overwrite", "Allow a non-empty output directory (one a run of this tool made)"});
  if (cmd.output == Output::kResumable)
    options.push_back({"--resume", "output.resume", "Continue from the last checkpoint in the output directory"});
  options.insert(options.end(), cmd.shortcuts.begin(), cmd.shortcuts.end());
  return options;
}

const std::vector<Command>& commands() {
  static const std::vector<Command> cmds = {
      {"train", "Learn hybrid dense/2:4 masks (PATCH-Joint, PATCH-Tile or MaskLLM) and write masks.safetensors",
       "data.train", Output::kResumable, run_train,
       {{"--nproc", "dist.nproc", "Data-parallel processes (Gloo on CPU, NCCL on GPUs)"}}},
      {"prune",
       "One-shot pruning (magnitude, Wanda, SparseGPT) to 2:4, unstructured or hybrid masks; "
       "writes masks.safetensors and prune.json (--masks FILE: SparseGPT's weight update or a fine-tune under "
       "given masks; --resume continues a stopped fine-tune)",
       "data.train", Output::kResumable, run_prune,
       {{"--method", "prune.method", "magnitude, wanda or sparsegpt"},
        {"--pattern", "prune.pattern", "2:4, unstructured or hybrid"},
        {"--target", "mask.target_sparsity", "Target sparsity"}},
       kModel | kMasks},
      {"export",
       "Write a pruned Hugging Face checkpoint (input layout and dtypes, masked weights zeroed, mask file "
       "referenced from config.json) into --out",
       "", Output::kRunFolder, run_export, {}, kModel | kMasks},
      {"pack",
       "Write the packed hybrid format of the masked layers (dense tiles whole, 2:4 tiles as kept values and "
       "2-bit positions) to <out>/packed.safetensors",
       "", Output::kRunFolder, run_pack, {}, kModel | kMasks},
      {"generate",
       "Generate text with a KV cache from a prompt (--prompt) or a file of prompts (--prompts), dense, masked "
       "(--masks) or packed (--packed); the text, then one JSON line of timings",
       "", Output::kOnRequest, run_generate,
       {{"--prompt", "generate.prompt", "The prompt text"},
        {"--prompts", "generate.prompts", "A file of prompts, one per line (or .jsonl with \"prompt\")"},
        {"--max-new-tokens", "generate.max_new_tokens", "Tokens to generate per prompt at most"},
        {"--packed", "model.packed", "Packed hybrid file (patch-train pack): run its layers through the kernels"}},
       kModel | kMasks},
      {"convert",
       "Convert masks between masks.safetensors and the .npz files the PATCH and MaskLLM authors release "
       "(<out>/masks.safetensors, mask.npz or mask_compressed.npz)",
       "", Output::kRunFolder, run_convert,
       {{"--to", "convert.to", "masks, patch-npz or maskllm-npz"}}, kModel | kMasks},
      {"verify",
       "Check a mask file (shapes, 2:4 in every sparse tile, declared sparsity), optionally against a model "
       "and a pruned checkpoint; exit status 0 or 1",
       "", Output::kNone, run_verify,
       {{"--pruned", "verify.pruned", "Pruned checkpoint directory to check against the masks"}}, kModel | kMasks},
      {"sweep",
       "PATCH at several targets beside dense and baselines, each evaluated: sweep.csv, sweep.json, sweep.png "
       "(--resume continues a stopped sweep)",
       "data.train", Output::kResumable, run_sweep,
       {{"--targets", "sweep.targets", "Target sparsities, comma separated"},
        {"--baselines", "sweep.baselines", "Baselines, comma separated: wanda, sparsegpt, magnitude, maskllm"}}},
      {"eval", "Perplexity of the model on text files (JSON to stdout and <out>/eval.json)",
       "eval.data", Output::kOnRequest, run_eval,
       {{"--packed", "model.packed", "Packed hybrid file (patch-train pack): run its layers through the kernels"}},
       kModel | kMasks},
      {"bench", "Time forward+backward and mask-learning steps on a random model of a real shape (JSON lines)",
       "", Output::kNone, run_bench,
       {{"--shape", "bench.shape", "qwen2.5-0.5b, llama-3.2-1b, llama-2-7b or llama-3.1-8b"},
        {"--mode", "bench.modes", "dense, joint, tile, maskllm, prune_wanda, prune_sparsegpt (comma separated)"},
        {"--nproc", "dist.nproc", "Data-parallel ranks of the mask step (one GPU each)"}},
       kNoInputs},
      {"bench-deploy",
       "Time the hybrid kernels against cuBLAS per layer shape and end to end on random models (JSON lines)",
       "", Output::kNone, run_bench_deploy,
       {{"--shapes", "deploy.shapes", "Model shapes or OUTxIN linears, comma separated"},
        {"--sparsities", "deploy.sparsities", "Sparsities, comma separated"},
        {"--tokens", "deploy.tokens", "Tokens per matmul, comma separated"},
        {"--layers", "deploy.layers", "Only these linears (q_proj ... down_proj), comma separated"},
        {"--packed", "model.packed",
         "Time the layers of this packed file (patch-train pack) instead of random masks of model shapes"}},
       kNoInputs},
      {"inspect",
       "List the model's linear layers (--model), a mask file's density per layer and block (--masks), or a "
       "run's training curves (--metrics)",
       "", Output::kNone, run_inspect,
       {{"--plot", "inspect.plot",
         "With --masks: a PNG of the tile maps and density per block; with --metrics: the training curves"},
        {"--metrics", "inspect.metrics", "A run's metrics.jsonl: validation points and the last training line"}},
       kModel | kMasks},
  };
  return cmds;
}

}  // namespace patch::app
