#include "sweep/sweep.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <sstream>
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
#include "train/finetune.h"
#include "train/trainer.h"

namespace patch::sweep {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

struct Point {
  std::string name;    // directory under points/
  std::string method;  // dense | patch-<mode> | maskllm | <one-shot method> 2:4 | ... hybrid
  double target = 0;   // requested sparsity
  // One-shot points: the pruning method and pattern, and whether the model is
  // evaluated with SparseGPT's updated weights rather than the mask alone.
  std::string prune_method, pattern;
  bool update_weights = false;
  // Reconstruction and fine-tune points: the learned point (under points/)
  // whose masks SparseGPT's update or the fine-tune keeps as they are.
  std::string masks_from = "";
  // Fine-tune points: the kept weights trained end to end under the masks of
  // masks_from (the dense model itself, all weights kept, where it is empty).
  bool finetune = false;
};

std::string target_label(double t) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", t);
  return buf;
}

const char* const kBaselineHelp =
    "expected maskllm, magnitude, wanda, sparsegpt (2:4 with SparseGPT's updated weights), "
    "sparsegpt-mask (2:4, mask only), magnitude-hybrid, wanda-hybrid, sparsegpt-hybrid (one-shot "
    "hybrid at each target, mask only), sparsegpt-hybrid-update, reconstruct (PATCH's learned masks with "
    "SparseGPT's weight update under them, at each target), finetune (PATCH's learned masks with their kept "
    "weights fine-tuned for prune.finetune_steps, at each target), dense-finetune (the dense model fine-tuned the "
    "same way, the control), or joint, tile learned modes; a per-target baseline may end in @T to run at target T "
    "only";

// A baseline name, possibly "<name>@<target>" for per-target baselines.
std::vector<Point> baseline_points(const std::string& spec, const std::vector<double>& targets,
                                   const std::string& mode) {
  std::string b = spec;
  std::vector<double> at = targets;
  if (const size_t pos = spec.find('@'); pos != std::string::npos) {
    b = spec.substr(0, pos);
    try {
      at = {std::stod(spec.substr(pos + 1))};
    } catch (const std::exception&) {
      throw core::ConfigError(core::str("sweep.baselines: '", spec, "': no target after '@'"));
    }
  }
  const bool one_shot = b == "magnitude" || b == "wanda" || b == "sparsegpt";
  if (b == "dense-finetune") {
    if (at != targets)
      throw core::ConfigError(core::str("sweep.baselines: '", spec, "' is the dense model; it takes no @target"));
    Point p{"dense-finetune", "dense + fine-tune", 0.0, "", "", false};
    p.finetune = true;
    return {p};
  }
  if (b == "maskllm" || one_shot || b == "sparsegpt-mask") {
    if (at != targets)
      throw core::ConfigError(core::str("sweep.baselines: '", spec, "' is 2:4 (sparsity 0.5); it takes no @target"));
    if (b == "maskllm") return {{"maskllm", "maskllm", 0.5, "", "", false}};
    if (b == "sparsegpt-mask") return {{"sparsegpt-mask-2-4", "sparsegpt 2:4 mask", 0.5, "sparsegpt", "2:4", false}};
    // SparseGPT as published: with its updated weights.
    return {{b + "-2-4", b + " 2:4", 0.5, b, "2:4", b == "sparsegpt"}};
  }
  std::vector<Point> points;
  for (double t : at) {
    const std::string label = target_label(t);
    if (b == "magnitude-hybrid" || b == "wanda-hybrid" || b == "sparsegpt-hybrid" ||
        b == "sparsegpt-hybrid-update") {
      const std::string method = b.substr(0, b.find('-'));
      const bool update = b == "sparsegpt-hybrid-update";
      points.push_back({b + "-" + label, method + " hybrid" + (update ? " update" : ""), t, method, "hybrid", update});
    } else if (b == "joint" || b == "tile") {
      points.push_back({"patch-" + b + "-" + label, "patch-" + b, t, "", "", false});
    } else if (b == "reconstruct" || b == "finetune") {
      if (std::find(targets.begin(), targets.end(), t) == targets.end())
        throw core::ConfigError(core::str("sweep.baselines: '", spec, "' fits the weights to the masks PATCH learns at ",
                                          label, ", which is not in sweep.targets"));
      const std::string from = "patch-" + mode + "-" + label;
      if (b == "reconstruct") {
        points.push_back({from + "-reconstruct", "patch-" + mode + " + reconstruction", t, "sparsegpt", "", true, from});
      } else {
        Point p{from + "-finetune", "patch-" + mode + " + fine-tune", t, "", "", false, from};
        p.finetune = true;
        points.push_back(p);
      }
    } else {
      throw core::ConfigError(core::str("sweep.baselines: unknown baseline '", spec, "' (", kBaselineHelp, ")"));
    }
  }
  return points;
}

std::vector<Point> plan(const config::Config& cfg) {
  std::vector<Point> points = {{"dense", "dense", 0.0, "", "", false}};
  const std::string mode = cfg.get_string("mask.mode");
  const std::vector<double> targets = cfg.get_float_list("sweep.targets");
  for (double t : targets)
    points.push_back({"patch-" + mode + "-" + target_label(t), "patch-" + mode, t, "", "", false});
  for (const auto& b : cfg.get_string_list("sweep.baselines"))
    for (Point& p : baseline_points(b, targets, mode)) {
      if (p.finetune && cfg.get_int("prune.finetune_steps") <= 0)
        throw core::ConfigError(core::str("prune.finetune_steps: the sweep baseline '", b,
                                          "' fine-tunes; give the number of steps (--set prune.finetune_steps=N)"));
      for (const Point& q : points)
        if (q.name == p.name)
          throw core::ConfigError(core::str("sweep.baselines: '", b, "' repeats the point ", p.name));
      points.push_back(std::move(p));
    }
  return points;
}

// What a learned point cost: steps, tokens, wall time, the median tokens/s and
// the largest peak memory of its steps (from its metrics.jsonl).
json training_summary(const std::string& dir, int64_t tokens_per_step) {
  std::vector<double> rates;
  double peak = 0.0, elapsed = 0.0;
  int64_t steps = 0;
  std::istringstream lines(core::read_file(dir + "/metrics.jsonl"));
  for (std::string line; std::getline(lines, line);) {
    const json m = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!m.is_object()) continue;
    if (m.contains("tokens_per_s")) rates.push_back(m["tokens_per_s"].get<double>());
    if (m.contains("peak_mem_gib")) peak = std::max(peak, m["peak_mem_gib"].get<double>());
    if (m.contains("step")) steps = std::max(steps, m["step"].get<int64_t>());
    if (m.value("final", false)) elapsed = m.value("elapsed_s", 0.0);
  }
  std::sort(rates.begin(), rates.end());
  const double median = rates.empty() ? 0.0 : rates[rates.size() / 2];
  return {{"steps", steps},
          {"train_tokens", steps * tokens_per_step},
          {"train_seconds", elapsed},
          {"tokens_per_s", median},
          {"peak_mem_gib", peak}};
}

// Trains a learned point (PATCH or MaskLLM), resuming a stopped run; 0 when done.
int train_point(config::Config pcfg, const std::string& dir) {
  const bool resume = fs::exists(fs::path(dir) / "checkpoint.safetensors");
  pcfg.set("output.dir", dir);
  pcfg.set("output.resume", resume);
  pcfg.set("output.overwrite", !resume);
  core::prepare_output_dir(dir, /*overwrite=*/true, resume);
  config::write_resolved(dir, pcfg);
  return train::run_training(pcfg, dir);
}

// A fine-tune point: the kept weights under the masks of p.masks_from (all
// weights for the dense control) trained end to end; the decoder ends with them.
json finetune_point(model::Decoder& decoder, const config::Config& pcfg, const text::Tokenizer& tok, const Point& p,
                    const std::string& dir) {
  const maskfile::MaskFile masks =
      p.masks_from.empty()
          ? train::all_kept(decoder)
          : maskfile::read_mask_file((fs::path(dir).parent_path() / p.masks_from / "masks.safetensors").string());
  const train::FinetuneOptions fo = train::finetune_options(pcfg);
  const auto ids = train::finetune_windows(pcfg, tok, fo.steps * fo.micro_batch);
  const auto t0 = std::chrono::steady_clock::now();
  const auto ft = train::finetune_kept_weights(decoder, masks, {}, ids, fo);
  return {{"sparsity", masks.sparsity()},
          {"finetune_steps", fo.steps},
          {"finetune_tokens", fo.steps * fo.micro_batch * ids.size(1)},
          {"finetune_lr", fo.lr},
          {"finetune_seconds", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count()},
          {"finetune_loss_first", ft.losses.front()},
          {"finetune_loss_last", ft.losses.back()}};
}

json run_point(const config::Config& cfg, const Point& p, const std::string& dir) {
  config::Config pcfg = cfg;
  pcfg.set("mask.target_sparsity", p.target);
  const std::string model_path = core::resolve_path(cfg.get_string("model.path"));
  json result = {{"name", p.name}, {"method", p.method}, {"target", p.target}};
  std::string masks_path;

  const bool learned =
      !p.finetune && p.prune_method.empty() && (p.method == "maskllm" || p.method.rfind("patch-", 0) == 0);
  if (learned) {
    pcfg.set("mask.mode", p.method == "maskllm" ? "maskllm" : p.method.substr(6));
    if (int rc = train_point(pcfg, dir); rc != 0) return {{"exit", rc}};
    masks_path = dir + "/masks.safetensors";
    result.update(training_summary(dir, pcfg.get_int("train.global_batch") * pcfg.get_int("data.seq_len")));
  }
  const model::DecoderOptions dopts = eval::inference_options(pcfg);
  io::Checkpoint ckpt = io::load_checkpoint(model_path, dopts.dtype);
  auto tok = text::load_tokenizer_for(model_path);
  eval::check_sequence_lengths(pcfg, ckpt.config, model_path, /*windows=*/true,
                               /*calibrates=*/!p.prune_method.empty() && p.prune_method != "magnitude");
  model::Decoder decoder(ckpt, dopts);
  if (p.finetune) {
    result.update(finetune_point(decoder, pcfg, *tok, p, dir));
  } else if (!masks_path.empty()) {
    auto file = maskfile::read_mask_file(masks_path);
    maskfile::apply_masks(decoder, file);
    result["sparsity"] = file.sparsity();
  } else if (p.method == "dense") {
    result["sparsity"] = 0.0;
  } else {
    pcfg.set("prune.method", p.prune_method);
    if (!p.pattern.empty()) pcfg.set("prune.pattern", p.pattern);
    auto po = prune::prune_options(pcfg);
    po.sparsegpt.update_weights = p.update_weights;
    if (!p.masks_from.empty())
      po.fixed_masks = std::make_shared<maskfile::MaskFile>(maskfile::read_mask_file(
          (fs::path(dir).parent_path() / p.masks_from / "masks.safetensors").string()));
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

void check_sweep(const config::Config& cfg) {
  if (cfg.get_string_list("eval.data").empty())
    throw core::ConfigError("eval.data: a sweep evaluates every point; give the evaluation text(s)");
  if (cfg.get_string_list("data.train").empty())
    throw core::ConfigError("data.train: a sweep trains and calibrates on it; give the training text (--data FILE)");
  (void)plan(cfg);
}

int run_sweep(const config::Config& cfg_in, const std::string& out_dir) {
  config::Config cfg = cfg_in;
  check_sweep(cfg);
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
