#include "sweep/sweep.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "core/tensor_utils.h"
#include "eval/perplexity.h"
#include "io/checkpoint.h"
#include "maskfile/apply.h"
#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "prune/pruner.h"
#include "text/tokenizer.h"
#include "train/trainer.h"

namespace patch::sweep {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

struct Point {
  std::string name;    // directory under points/
  std::string method;  // dense | patch-<mode> | maskllm | wanda | sparsegpt | magnitude
  double target = 0;   // requested sparsity
};

std::string target_label(double t) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", t);
  return buf;
}

std::vector<Point> plan(const config::Config& cfg) {
  std::vector<Point> points = {{"dense", "dense", 0.0}};
  const std::string mode = cfg.get_string("mask.mode");
  for (double t : cfg.get_float_list("sweep.targets"))
    points.push_back({"patch-" + mode + "-" + target_label(t), "patch-" + mode, t});
  for (const auto& b : cfg.get_string_list("sweep.baselines")) {
    if (b == "maskllm")
      points.push_back({"maskllm", "maskllm", 0.5});
    else if (b == "wanda" || b == "sparsegpt" || b == "magnitude")
      points.push_back({b + "-2-4", b + " 2:4", 0.5});
    else
      throw core::ConfigError(core::str("sweep.baselines: unknown baseline '", b,
                                        "' (expected wanda, sparsegpt, magnitude or maskllm)"));
  }
  return points;
}

model::DecoderOptions decoder_options(const config::Config& cfg) {
  model::DecoderOptions o;
  o.device = core::resolve_device(cfg.get_string("model.device"));
  o.dtype = core::resolve_dtype(cfg.get_string("model.dtype"), o.device);
  return o;
}

// Trains a learned point (PATCH or MaskLLM), resuming a stopped run; 0 when done.
int train_point(config::Config pcfg, const std::string& dir) {
  const bool resume = fs::exists(fs::path(dir) / "checkpoint.safetensors");
  pcfg.set("output.dir", dir);
  pcfg.set("output.resume", resume);
  pcfg.set("output.overwrite", !resume);
  core::prepare_output_dir(dir, /*overwrite=*/true, resume);
  core::write_file_atomic(dir + "/config.resolved.yaml", config::dump_yaml(pcfg));
  return train::run_training(pcfg, dir);
}

json run_point(const config::Config& cfg, const Point& p, const std::string& dir) {
  config::Config pcfg = cfg;
  pcfg.set("mask.target_sparsity", p.target);
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  json result = {{"name", p.name}, {"method", p.method}, {"target", p.target}};
  std::string masks_path;

  if (p.method == "maskllm" || p.method.rfind("patch-", 0) == 0) {
    if (p.method == "maskllm") pcfg.set("mask.mode", "maskllm");
    if (int rc = train_point(pcfg, dir); rc != 0) return {{"exit", rc}};
    masks_path = dir + "/masks.safetensors";
  }
  io::Checkpoint ckpt = io::load_checkpoint(model_path);
  auto tok = text::load_tokenizer_for(model_path);
  model::Decoder decoder(ckpt, decoder_options(pcfg));
  if (!masks_path.empty()) {
    auto file = maskfile::read_mask_file(masks_path);
    maskfile::apply_masks(decoder, file);
    result["sparsity"] = file.sparsity();
  } else if (p.method == "dense") {
    result["sparsity"] = 0.0;
  } else {
    // One-shot 2:4; SparseGPT evaluated with its updated weights, as published.
    pcfg.set("prune.method", p.name.substr(0, p.name.find('-')));
    pcfg.set("prune.pattern", "2:4");
    auto po = prune::prune_options(pcfg);
    po.sparsegpt.update_weights = true;
    at::Tensor calib;
    if (po.method != prune::Method::kMagnitude) calib = prune::calibration_from_config(pcfg, *tok);
    core::prepare_output_dir(dir, /*overwrite=*/true, /*resume=*/false);
    auto r = prune::prune_model(decoder, calib, po);
    maskfile::write_mask_file(dir + "/masks.safetensors", r.masks);
    result["sparsity"] = r.masks.sparsity();
  }
  result.update(eval::evaluate_config(decoder, *tok, pcfg));
  if (!result.contains("perplexity")) result["perplexity"] = result["results"][0]["perplexity"];  // the first file
  return result;
}

std::string csv_of(const std::vector<json>& results) {
  std::string csv = "name,method,target,sparsity,perplexity\n";
  char buf[256];
  for (const auto& r : results) {
    std::snprintf(buf, sizeof buf, "%s,%s,%g,%.6f,%.6f\n", r["name"].get<std::string>().c_str(),
                  r["method"].get<std::string>().c_str(), r["target"].get<double>(), r["sparsity"].get<double>(),
                  r.value("perplexity", 0.0));
    csv += buf;
  }
  return csv;
}

}  // namespace

int run_sweep(const config::Config& cfg_in, const std::string& out_dir) {
  config::Config cfg = cfg_in;
  if (cfg.get_string_list("eval.data").empty())
    throw core::ConfigError("eval.data: a sweep evaluates every point; give the evaluation text(s)");
  if (cfg.get_string_list("data.train").empty())
    throw core::ConfigError("data.train: a sweep trains and calibrates on it; give the training text (--data FILE)");
  // One token cache and one prior cache for every point.
  if (cfg.get_string("data.cache_dir").empty()) cfg.set("data.cache_dir", out_dir + "/cache/tokens");
  if (cfg.get_string("mask.prior_cache").empty()) cfg.set("mask.prior_cache", out_dir + "/cache/priors");

  const auto points = plan(cfg);
  if (cfg.get_bool("output.overwrite") && !cfg.get_bool("output.resume")) core::remove_tree(out_dir + "/points");
  std::vector<json> results;
  for (size_t i = 0; i < points.size(); ++i) {
    const auto& p = points[i];
    const std::string dir = out_dir + "/points/" + p.name;
    const std::string result_file = dir + "/result.json";
    if (fs::exists(result_file)) {
      core::log::info(core::str("sweep [", i + 1, "/", points.size(), "] ", p.name, ": done before, skipped"));
      results.push_back(json::parse(core::read_file(result_file)));
      continue;
    }
    if (int sig = train::stop_signal()) {
      core::log::warn(core::str("sweep stopped by signal ", sig, " before ", p.name, "; rerun to continue"));
      return core::kExitInterrupted;
    }
    core::log::info(core::str("sweep [", i + 1, "/", points.size(), "] ", p.name));
    fs::create_directories(dir);
    json r = run_point(cfg, p, dir);
    if (r.contains("exit")) {
      core::log::warn(core::str("sweep stopped during ", p.name, "; rerun to resume it"));
      return r["exit"].get<int>();
    }
    core::write_file_atomic(result_file, r.dump(2) + "\n");
    core::log::info(core::str("sweep ", p.name, ": sparsity ", r["sparsity"].get<double>(), ", perplexity ",
                              r.value("perplexity", 0.0)));
    results.push_back(r);
  }
  json all = {{"model", core::resolve_path(cfg.get_string("model.path"))},
              {"eval", cfg.get_string_list("eval.data")},
              {"points", results}};
  core::write_file_atomic(out_dir + "/sweep.json", all.dump(2) + "\n");
  core::write_file_atomic(out_dir + "/sweep.csv", csv_of(results));
  return 0;
}

}  // namespace patch::sweep
