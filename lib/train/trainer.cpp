#include "train/trainer.h"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <atomic>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <filesystem>
#include <set>
#include <fstream>
#include <optional>
#include <nlohmann/json.hpp>

#include "core/atomic_file.h"
#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "core/progress.h"
#include "core/signals.h"
#include "core/tensor_utils.h"
#include "data/dataset.h"
#include "dist/dist.h"
#include "eval/perplexity.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "maskfile/apply.h"
#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "prune/pruner.h"
#include "sparsity/tile_grid.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "sparsity/prior.h"
#include "core/sha256.h"
#include "text/tokenizer.h"
#include "train/optimizer.h"

namespace patch::train {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;
using core::str;

constexpr const char* kCheckpointName = "checkpoint.safetensors";
// The one-shot prior of the run, kept so that --resume need not recompute it.
constexpr const char* kPriorName = "prior.safetensors";
constexpr const char* kCheckpointFormat = "patch-train-checkpoint";

struct Run {
  const config::Config& cfg;
  std::string out_dir;
  at::Device device = at::kCPU;
  int64_t steps = 0, micro = 0, global = 0, seq_len = 0;
  double target = 0.0;
  sparsity::BudgetKind budget = sparsity::BudgetKind::kGlobal;
  std::unique_ptr<model::Decoder> model;
  std::unique_ptr<data::BlockDataset> train_data, valid_data;
  std::vector<int64_t> train_blocks, valid_blocks;
  std::shared_ptr<sparsity::SamplerState> state;
  std::unique_ptr<sparsity::MaskSet> masks;
  sparsity::SamplerSchedule schedule;
  std::unique_ptr<MaskOptimizer> opt;
  double weight_norm_total = 0.0;  // sum over layers of ||W||, for the weight term
  std::string model_path;
  dist::Env env;  // this process's rank in a data-parallel run
  // mask.prior=file: the file's priors, read and checked once (check_prior_file).
  std::map<std::string, sparsity::Prior> file_priors;

  explicit Run(const config::Config& c, std::string dir) : cfg(c), out_dir(std::move(dir)) {}
};

void load_model_and_data(Run& r) {
  const auto& cfg = r.cfg;
  r.model_path = core::resolve_path(cfg.get_string("model.path"));
  r.device = core::resolve_device(cfg.get_string("model.device"));
  r.device = dist::rank_device(r.device, r.env.local_rank, r.env.world);
  model::DecoderOptions mo;
  mo.device = r.device;
  mo.dtype = core::resolve_dtype(cfg.get_string("model.dtype"), r.device);
  io::Checkpoint ckpt = io::load_checkpoint(r.model_path, mo.dtype);
  const std::string prior = cfg.get_string("mask.prior");
  eval::check_sequence_lengths(cfg, ckpt.config, r.model_path, /*windows=*/true,
                               /*calibrates=*/prior == "wanda" || prior == "sparsegpt");
  mo.checkpointing = cfg.get_bool("model.checkpointing");
  r.model = std::make_unique<model::Decoder>(ckpt, mo);
  core::log::info(str("model ", r.model_path, ": ", ckpt.config.num_layers, " layers on ", r.device.str(),
                      " in ", core::dtype_name(mo.dtype)));

  auto tok = text::load_tokenizer_for(r.model_path);
  data::DataOptions dopts = data::data_options(cfg);
  if (dopts.cache_dir.empty()) dopts.cache_dir = core::cache_dir() + "/tokens";

  // Several files, or a token cap, make one in-memory stream; a single file
  // stays memory-mapped.
  const int64_t max_tokens = cfg.get_int("data.max_tokens");
  auto stream_of = [&](const char* key, const std::vector<std::string>& files, int64_t cap) {
    std::vector<data::TokenStream> parts;
    for (const auto& f : files) {
      parts.push_back(data::load_tokens(core::resolve_path(f), *tok, dopts));
      if (parts.back().size() == 0)
        throw core::Error(str(key, ": '", core::resolve_path(f), "' holds no tokens (an empty file, or blank documents only)"));
    }
    if (parts.size() == 1 && (cap <= 0 || parts[0].size() <= cap)) return parts[0];
    std::vector<int32_t> all;
    for (const auto& p : parts) {
      int64_t n = cap > 0 ? std::min<int64_t>(p.size(), cap - static_cast<int64_t>(all.size())) : p.size();
      std::vector<int64_t> buf(static_cast<size_t>(n));
      p.read(0, n, buf.data());
      all.insert(all.end(), buf.begin(), buf.end());
      if (cap > 0 && static_cast<int64_t>(all.size()) >= cap) break;
    }
    return data::TokenStream(std::move(all));
  };
  auto train_files = cfg.get_string_list("data.train");
  if (train_files.empty())
    throw core::ConfigError("data.train: no training file given (use --data FILE or data.train in the config)");
  r.seq_len = cfg.get_int("data.seq_len");
  r.train_data = std::make_unique<data::BlockDataset>(stream_of("data.train", train_files, max_tokens), r.seq_len);
  auto valid_files = cfg.get_string_list("data.valid");
  if (valid_files.empty()) {
    const int64_t held_out = cfg.get_int("data.valid_blocks");
    if (r.train_data->num_blocks() <= held_out)
      throw core::Error(str("data.train: ", r.train_data->num_blocks(), " blocks of data.seq_len + 1 = ", r.seq_len + 1,
                            " tokens, too few to hold out data.valid_blocks = ", held_out,
                            " for validation and train on the rest (more text, a shorter data.seq_len, or data.valid)"));
    auto split = data::split_blocks(r.train_data->num_blocks(), held_out);
    r.train_blocks = split.train;
    r.valid_blocks = split.valid;
  } else {
    for (int64_t i = 0; i < r.train_data->num_blocks(); ++i) r.train_blocks.push_back(i);
    r.valid_data = std::make_unique<data::BlockDataset>(stream_of("data.valid", valid_files, 0), r.seq_len);
    for (int64_t i = 0; i < r.valid_data->num_blocks(); ++i) r.valid_blocks.push_back(i);
  }
  const int64_t eval_blocks = cfg.get_int("train.eval_blocks");
  if (static_cast<int64_t>(r.valid_blocks.size()) > eval_blocks) r.valid_blocks.resize(eval_blocks);
  if (r.train_blocks.empty())
    throw core::Error(str("data.train: fewer tokens than one block of data.seq_len + 1 = ", r.seq_len + 1,
                          " after holding out ", r.valid_blocks.size(), " validation blocks"));
  core::log::info(str("data: ", r.train_blocks.size(), " training blocks, ", r.valid_blocks.size(),
                      " validation blocks of ", r.seq_len, " tokens"));
}

void build_masks(Run& r) {
  const auto& cfg = r.cfg;
  r.target = cfg.get_float("mask.target_sparsity");
  r.budget = sparsity::parse_budget(cfg.get_string("mask.budget"));
  sparsity::MaskSetOptions mo;
  mo.mask.mode = sparsity::parse_mask_mode(cfg.get_string("mask.mode"));
  mo.mask.init_std = cfg.get_float("mask.init_std");
  mo.mask.seed = static_cast<uint64_t>(cfg.get_int("train.seed"));
  mo.mask.device = r.device;
  mo.mask.fused = cfg.get_string("mask.kernel") == "fused";
  mo.mask.compact = cfg.get_string("train.state") == "compact";
  auto tile = cfg.get_int_list("mask.tile");
  mo.tile_rows = tile[0];
  mo.tile_cols = tile[1];
  mo.include = cfg.get_string_list("mask.include");
  mo.exclude = cfg.get_string_list("mask.exclude");

  auto tau24 = cfg.get_float_list("mask.tau_24"), sc24 = cfg.get_float_list("mask.scale_24");
  auto taut = cfg.get_float_list("mask.tau_tile"), sct = cfg.get_float_list("mask.scale_tile");
  r.schedule = {tau24[0], tau24[1], sc24[0], sc24[1], taut[0], taut[1], sct[0], sct[1],
                sparsity::parse_anneal(cfg.get_string("mask.anneal"))};
  r.state = std::make_shared<sparsity::SamplerState>();
  r.state->seed = mo.mask.seed;
  r.state->hard_24 = cfg.get_bool("mask.hard_24");
  r.state->hard_tile = cfg.get_bool("mask.hard_tile");
  r.schedule.apply(*r.state, 0.0);

  // Wanda/SparseGPT priors calibrate on the dense model, before any mask is attached.
  const std::string prior = cfg.get_string("mask.prior");
  std::map<std::string, sparsity::Prior> priors;
  if (prior == "wanda" || prior == "sparsegpt") {
    auto po = prune::prune_options(cfg);
    po.method = prune::parse_method(prior);
    // The cache is shared by every run: the key is everything the priors depend on.
    json key = {prior,
                core::file_fingerprint(r.model_path),
                cfg.tree()["data"],
                cfg.at("mask.target_sparsity"),
                cfg.at("mask.tile"),
                cfg.at("mask.include"),
                cfg.at("mask.exclude"),
                cfg.at("model.dtype"),
                cfg.tree()["prune"]};
    for (const auto& f : cfg.get_string_list("data.train")) key.push_back(core::file_fingerprint(core::resolve_path(f)));
    std::string dir = cfg.get_string("mask.prior_cache");
    if (dir.empty()) dir = core::cache_dir() + "/priors";
    const std::string cached =
        (fs::path(dir) / (prior + "-" + core::sha256_hex(key.dump()).substr(0, 16) + ".safetensors")).string();
    // A resumed run takes the prior its run folder kept (the same by the resume check).
    const std::string kept = (fs::path(r.out_dir) / kPriorName).string();
    const bool resumed = cfg.get_bool("output.resume") && fs::exists(kept);
    if (resumed || fs::exists(cached)) {
      priors = prune::load_priors(resumed ? kept : cached);
      core::log::info(str("prior: ", prior, " from ", resumed ? kept : cached));
    } else {
      auto calib = prune::calibration_ids(r.train_data->tokens(), prune::calibration_options(cfg));
      core::log::info(str("prior: ", prior, " on ", calib.size(0), " calibration sequences of ", calib.size(1),
                          " tokens"));
      priors = prune::oneshot_priors(*r.model, calib, po);
      std::error_code ec;
      fs::create_directories(dir, ec);
      try {
        prune::save_priors(cached, priors);
      } catch (const core::Error& e) {  // a cache is a convenience, never a reason to stop
        core::log::warn(str("prior cache not written: ", e.what()));
      }
    }
    if (r.env.rank == 0 && !resumed) prune::save_priors(kept, priors);
  }

  r.masks = std::make_unique<sparsity::MaskSet>(mo, r.state);
  std::vector<std::pair<std::string, at::Tensor>> weights;
  for (auto* lin : r.model->linears()) weights.emplace_back(lin->name(), lin->weight());
  r.masks->add_layers(weights, [&](const std::string& name, const std::shared_ptr<sparsity::LinearMask>& m) {
    r.model->linear(name)->set_provider(m);
  });
  if (r.masks->size() == 0)
    throw core::ConfigError("mask.include: the patterns select no linear layer of the model");
  core::log::info(str("masks: ", r.masks->size(), " layers, ", r.masks->total_weights(), " weights, mode ",
                      cfg.get_string("mask.mode"), ", target sparsity ", r.target));

  // Priors shift the N(0, sigma) initial logits towards a one-shot mask.
  bool prior_applied = false;
  if (prior == "magnitude") {
    priors = sparsity::magnitude_priors(*r.masks, r.target);
  } else if (prior == "file") {
    const std::string path = core::resolve_path(cfg.get_string("mask.prior_file"));
    priors = std::move(r.file_priors);  // read and checked by check_prior_file
    try {
      sparsity::PriorStrength strength{mo.mask.init_std, cfg.get_float("mask.prior_strength_24"),
                                       cfg.get_float("mask.prior_strength_tile")};
      sparsity::apply_prior(*r.masks, priors, r.target, r.budget, strength);
    } catch (const core::Error& e) {
      throw core::Error(str(path, ": ", e.what(), " (mask.prior_file, tile ", cfg.at("mask.tile").dump(), ")"));
    }
    prior_applied = true;
  }
  if (prior == "none") {
    if (mo.mask.mode == sparsity::MaskMode::kTile)
      throw core::ConfigError("mask.prior: tile mode fixes the 2:4 patterns from a prior; 'none' gives none");
  } else if (!prior_applied) {
    sparsity::PriorStrength strength{mo.mask.init_std, cfg.get_float("mask.prior_strength_24"),
                                     cfg.get_float("mask.prior_strength_tile")};
    sparsity::apply_prior(*r.masks, priors, r.target, r.budget, strength);
  }

  c10::NoGradGuard no_grad;
  for (size_t i = 0; i < r.masks->size(); ++i)
    r.weight_norm_total += r.masks->weight(i).to(at::kFloat).norm().item<double>();

  auto betas = cfg.get_float_list("train.betas");
  r.opt = std::make_unique<MaskOptimizer>(*r.masks, AdamWOptions{betas[0], betas[1], 1e-8, cfg.get_float("train.weight_decay")},
                                          mo.mask.compact);
}

// The training blocks of global sample positions [begin, end): epochs reshuffle
// with the seed, so the data position is a pure function of the step.
std::vector<int64_t> sample_blocks(const Run& r, int64_t begin, int64_t end) {
  const auto n = static_cast<int64_t>(r.train_blocks.size());
  const uint64_t seed = static_cast<uint64_t>(r.cfg.get_int("train.seed"));
  std::vector<int64_t> out;
  int64_t cached_epoch = -1;
  std::vector<int64_t> order;
  for (int64_t pos = begin; pos < end; ++pos) {
    int64_t epoch = pos / n;
    if (epoch != cached_epoch) {
      order = data::epoch_order(r.train_blocks, seed, epoch);
      cached_epoch = epoch;
    }
    out.push_back(order[pos % n]);
  }
  return out;
}

// Mean loss over the validation windows with the model's providers as they are.
double validation_loss(Run& r) {
  c10::NoGradGuard no_grad;
  const data::BlockDataset& ds = r.valid_data ? *r.valid_data : *r.train_data;
  double sum = 0.0;
  int64_t n = 0;
  for (size_t b = 0; b < r.valid_blocks.size(); b += static_cast<size_t>(r.micro)) {
    std::vector<int64_t> idx(r.valid_blocks.begin() + static_cast<int64_t>(b),
                             r.valid_blocks.begin() + static_cast<int64_t>(std::min(r.valid_blocks.size(), b + r.micro)));
    auto ids = ds.blocks(idx).to(r.device);
    sum += r.model->loss(ids).item<double>() * static_cast<double>(idx.size());
    n += static_cast<int64_t>(idx.size());
  }
  return n ? sum / static_cast<double>(n) : std::nan("");
}

// Puts the learnable masks back as the masked linears' weight providers.
void attach_learnable(Run& r) {
  for (const auto& m : r.masks->masks()) r.model->linear(m->name())->set_provider(m);
}

// Validation loss with the hardened masks installed, then the learnable ones back.
double evaluate_hard(Run& r, const sparsity::Hardened& hard) {
  maskfile::apply_masks(*r.model, hard.layers);
  const double loss = validation_loss(r);
  attach_learnable(r);
  return loss;
}

// Validation loss of the unmasked model on the same windows.
double evaluate_dense(Run& r) {
  for (const auto& m : r.masks->masks()) r.model->linear(m->name())->set_provider(nullptr);
  const double loss = validation_loss(r);
  attach_learnable(r);
  return loss;
}

// The windows every validation number of the run is measured on.
json validation_windows(const Run& r) {
  const auto n = static_cast<int64_t>(r.valid_blocks.size());
  return {{"source", r.valid_data ? "data.valid" : "data.train (held-out blocks)"},
          {"windows", n},
          {"seq_len", r.seq_len},
          {"tokens_scored", n * r.seq_len}};
}

// The step-0 validation loss (hardened initial masks: the prior alone) from
// metrics.jsonl, which a resumed run keeps.
double initial_loss(const std::string& metrics_path, size_t windows) {
  std::ifstream in(metrics_path);
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.value("step", int64_t{-1}) == 0 && j.contains("valid_loss") &&
        j["valid_loss"].is_number() && j.value("windows", size_t{0}) == windows)
      return j["valid_loss"].get<double>();
  }
  return std::nan("");
}

std::string checkpoint_path(const Run& r) { return (fs::path(r.out_dir) / kCheckpointName).string(); }

void save_checkpoint(const Run& r, int64_t step) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (auto& [name, t] : r.masks->named_state()) tensors.emplace_back("mask/" + name, t.detach());
  for (auto& [name, t] : r.opt->adam().state()) tensors.emplace_back("adam/" + name, t);
  std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat},
      {"step", std::to_string(step)},
      {"adam_steps", std::to_string(r.opt->adam().steps())},
      {"clip_scale", json(r.opt->clip_scale()).dump()},
      {"data_position", std::to_string(step * r.global)},
      {"seed", std::to_string(r.cfg.get_int("train.seed"))},
      {"config", r.cfg.tree().dump()}};
  io::write_safetensors(checkpoint_path(r), tensors, meta);
  core::log::debug(str("checkpoint at step ", step, " -> ", checkpoint_path(r)));
}

// Returns the step to continue from (0 when there is nothing to resume).
int64_t load_checkpoint(Run& r) {
  const std::string path = checkpoint_path(r);
  if (!fs::exists(path)) {
    core::log::warn(str("output.resume: no checkpoint in ", r.out_dir, "; starting from step 0"));
    return 0;
  }
  io::SafetensorsFile f(path);
  const auto& meta = f.metadata();
  auto get = [&](const std::string& k) {
    auto it = meta.find(k);
    if (it == meta.end()) throw core::Error(str(path, ": not a patch-train checkpoint (no '", k, "')"));
    return it->second;
  };
  if (get("format") != kCheckpointFormat) throw core::Error(str(path, ": not a patch-train checkpoint"));
  std::map<std::string, at::Tensor> masks, adam;
  for (const auto& e : f.entries()) {
    if (e.name.rfind("mask/", 0) == 0) masks[e.name.substr(5)] = f.tensor(e.name);
    if (e.name.rfind("adam/", 0) == 0) adam[e.name.substr(5)] = f.tensor(e.name);
  }
  {
    c10::NoGradGuard no_grad;
    r.masks->load_state(masks, path);
  }
  r.opt->adam().load_state(adam, std::stoll(get("adam_steps")));
  if (auto it = meta.find("clip_scale"); it != meta.end()) r.opt->set_clip_scale(json::parse(it->second).get<double>());
  int64_t step = std::stoll(get("step"));
  core::log::info(str("resuming from step ", step, " (", path, ")"));
  return step;
}

// Keeps metrics lines up to `step` so a resumed run's metrics read as one run.
void truncate_metrics(const std::string& path, int64_t step) {
  if (!fs::exists(path)) return;
  std::ifstream in(path);
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  core::write_file_atomic(path, kept);
}

double hard_density_by_sign(const Run& r) {
  int64_t dense = 0;
  for (const auto& m : r.masks->masks()) {
    auto tiles = m->hard_tiles().to(at::kLong).cpu();
    dense += (tiles * m->grid().counts()).sum().item<int64_t>();
  }
  const double total = static_cast<double>(r.masks->total_weights());
  return (static_cast<double>(dense) + 0.5 * (total - static_cast<double>(dense))) / total;
}

// Perplexity for JSON: null where the loss is unknown.
json perplexity_json(double loss) { return std::isfinite(loss) ? json(std::exp(loss)) : json(nullptr); }

// The run's result in three numbers on the same windows: the unmasked model,
// the prior alone (hardened at the target), and the learned masks.
json validation_summary(Run& r, double learned_loss, double dense_loss, double prior_loss) {
  json v = validation_windows(r);
  v["dense_perplexity"] = perplexity_json(dense_loss);
  v["prior"] = r.cfg.get_string("mask.prior");
  v["prior_perplexity"] = perplexity_json(prior_loss);
  v["perplexity"] = perplexity_json(learned_loss);
  return v;
}

void write_outputs(Run& r, const sparsity::Hardened& hard, double valid_loss, const json& validation) {
  maskfile::MaskFileMeta meta;
  meta.model_source = r.model_path;
  meta.model_config_hash = io::config_hash(r.model->config());
  meta.training_config = r.cfg.tree().dump();
  auto file = maskfile::from_hardened(hard, meta);
  const std::string masks_path = (fs::path(r.out_dir) / "masks.safetensors").string();
  maskfile::write_mask_file(masks_path, file);

  auto report = sparsity::density_report(*r.masks, hard);
  core::log::info("density (kept fraction), learned vs hardened:\n" + report.format());
  json rep;
  rep["target_sparsity"] = r.target;
  rep["achieved_sparsity"] = hard.achieved_sparsity();
  rep["validation"] = validation;
  rep["valid_loss"] = valid_loss;
  rep["valid_perplexity"] = std::exp(valid_loss);
  auto rows = [](const std::vector<sparsity::DensityRow>& v) {
    json a = json::array();
    for (const auto& d : v)
      a.push_back({{"name", d.name}, {"block", d.block}, {"weights", d.weights}, {"soft_density", d.soft},
                   {"hard_density", d.hard}});
    return a;
  };
  rep["total"] = {{"weights", report.total.weights}, {"soft_density", report.total.soft},
                  {"hard_density", report.total.hard}};
  rep["blocks"] = rows(report.blocks);
  rep["layers"] = rows(report.layers);
  core::write_file_atomic((fs::path(r.out_dir) / "report.json").string(), rep.dump(2) + "\n");
  core::log::info(str("masks written to ", masks_path, "; report.json beside it"));
  // The run's result, last on the console: three perplexities on the same windows.
  const auto ppl = [](const json& v) { return v.is_number() ? str(std::round(v.get<double>() * 100) / 100) : std::string("?"); };
  core::log::info(str("validation perplexity on ", validation["windows"].get<int64_t>(), " windows of ",
                      validation["seq_len"].get<int64_t>(), " tokens (", validation["source"].get<std::string>(),
                      "): dense ", ppl(validation["dense_perplexity"]), ", prior (", validation["prior"].get<std::string>(),
                      ") alone ", ppl(validation["prior_perplexity"]), ", learned ", ppl(validation["perplexity"]),
                      " at sparsity ", hard.achieved_sparsity(), " (target ", r.target, ")"));
}

}  // namespace

const std::vector<std::string>& resume_mutable_keys() {
  static const std::vector<std::string> keys = {
      "model.device",         "model.checkpointing",    "model.masks",        "model.packed",
      "data.cache_dir",       "mask.kernel",            "mask.prior_cache",   "train.cuda_graph",
      "train.eval_every",     "train.eval_blocks",      "train.checkpoint_every", "train.log_every",
      "prune.micro_batch",    "prune.method",           "prune.pattern",      "prune.update_weights"};
  return keys;
}

void check_resume_config(const config::Config& cfg, const std::string& out_dir) {
  const std::string path = (fs::path(out_dir) / kCheckpointName).string();
  if (!fs::exists(path)) return;
  io::SafetensorsFile f(path);
  const auto& meta = f.metadata();
  const auto it = meta.find("config");
  if (it == meta.end()) throw core::Error(str(path, ": not a patch-train checkpoint (no 'config')"));
  using config::Json;
  const Json saved = Json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!saved.is_object()) throw core::Error(str(path, ": its 'config' is not a JSON object"));
  const auto& mutable_keys = resume_mutable_keys();
  // Every key of the sections that shape what is learned: the model, the data,
  // the masks and their prior, the optimization.
  for (const char* section : {"model", "data", "mask", "train", "prune"}) {
    const Json now = cfg.tree().contains(section) ? cfg.tree().at(section) : Json::object();
    const Json then = saved.contains(section) ? saved.at(section) : Json::object();
    for (auto k = now.begin(); k != now.end(); ++k) {
      const std::string key = str(section, ".", k.key());
      if (std::find(mutable_keys.begin(), mutable_keys.end(), key) != mutable_keys.end()) continue;
      const Json before = then.contains(k.key()) ? then.at(k.key()) : Json();
      if (before != k.value())
        throw core::ConfigError(str(key, ": ", k.value().dump(), " differs from ", before.dump(),
                                    " in the checkpoint of ", out_dir,
                                    "; a resumed run must be the same run (start a new one, or --overwrite)"));
    }
  }
}

int stop_signal() { return core::stop_signal(); }

void install_stop_handlers() { core::install_stop_handlers(); }

void check_run_setup(const config::Config& cfg, int world) {
  if (cfg.get_string("train.state") == "compact") {
    // The 2:4 logits are updated inside the backward, once per backward pass.
    if (cfg.get_string("mask.kernel") != "fused")
      throw core::ConfigError("train.state: compact state needs mask.kernel=fused");
    if (cfg.get_int("train.global_batch") != cfg.get_int("train.micro_batch"))
      throw core::ConfigError(str("train.state: compact state updates inside the backward, so it needs one "
                                  "micro-batch per step (train.global_batch = train.micro_batch), got ",
                                  cfg.get_int("train.global_batch"), " and ", cfg.get_int("train.micro_batch")));
    if (cfg.get_float("train.lambda_weight") > 0)
      throw core::ConfigError("train.state: compact state does not support train.lambda_weight > 0");
  }
  if (cfg.get_bool("train.cuda_graph")) {
    // Each condition keeps the step free of host reads and per-step host values.
    const auto need = [](bool ok, const std::string& what) {
      if (!ok) throw core::ConfigError("train.cuda_graph: needs " + what);
    };
    need(world <= 1 && cfg.get_int("dist.nproc") <= 1, "one process (dist.nproc=1)");
    need(cfg.get_string("mask.kernel") == "fused", "mask.kernel=fused");
    need(cfg.get_float("train.lambda_weight") == 0.0, "train.lambda_weight=0 (its factor changes every step)");
    need(core::resolve_device(cfg.get_string("model.device")).is_cuda(), "model.device=cuda");
  }
  if (world <= 1) return;
  const int64_t micro = cfg.get_int("train.micro_batch"), global = cfg.get_int("train.global_batch");
  if ((global / micro) % world != 0)
    throw core::ConfigError(str("train.global_batch: ", global / micro, " micro-batches per step (", global, " / ",
                                micro, ") do not split evenly over ", world, " ranks"));
  if (cfg.get_string("train.state") == "compact")
    throw core::ConfigError("train.state: compact state updates the 2:4 logits inside each rank's backward, "
                            "before gradients can be summed over ranks; use train.state=full with several ranks");
}

namespace {
// The tile fits every masked layer (checked on the loaded model, before any work).
void check_tile(const Run& r) {
  const auto tile = r.cfg.get_int_list("mask.tile");
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (auto* lin : r.model->linears()) shapes.emplace_back(lin->weight().size(0), lin->weight().size(1));
  sparsity::check_tile_fits(tile[0], tile[1], shapes);
}

// mask.prior=file: the file gives exactly the layers the globs mask, each
// named and shaped as in the model (checked before the run folder is claimed);
// keeps the priors in r.file_priors.
void check_prior_file(Run& r) {
  if (r.cfg.get_string("mask.prior") != "file") return;
  const std::string path = core::resolve_path(r.cfg.get_string("mask.prior_file"));
  r.file_priors = maskfile::priors_from_file(maskfile::read_mask_file(path));
  const auto include = r.cfg.get_string_list("mask.include"), exclude = r.cfg.get_string_list("mask.exclude");
  const auto any = [](const std::vector<std::string>& globs, const std::string& name) {
    return std::any_of(globs.begin(), globs.end(), [&](const std::string& g) { return sparsity::glob_match(g, name); });
  };
  std::map<std::string, std::pair<int64_t, int64_t>> masked;  // name -> [out, in]
  std::set<std::string> given;
  for (auto* lin : r.model->linears())
    if (any(include, lin->name()) && !any(exclude, lin->name()))
      masked[lin->name()] = {lin->weight().size(0), lin->weight().size(1)};
  for (const auto& [name, prior] : r.file_priors) {
    given.insert(name);
    const auto it = masked.find(name);
    if (it == masked.end())
      throw core::Error(str(path, ": layer '", name, "' is not a masked layer of ", r.model_path,
                            " (mask.prior_file must come from this model with the same mask.include)"));
    const auto [out, in] = it->second;
    if (prior.pattern.size(0) != out || prior.pattern.size(1) * 4 != in)
      throw core::Error(str(path, ": layer '", name, "' is [", prior.pattern.size(0), ", ", prior.pattern.size(1) * 4,
                            "] but the model's is [", out, ", ", in, "] (mask.prior_file must come from ",
                            r.model_path, ")"));
  }
  for (const auto& [name, shape] : masked)
    if (!given.count(name)) throw core::Error(str(path, ": no mask for the layer '", name, "' of ", r.model_path));
}
}  // namespace

int run_training(const config::Config& cfg, const std::string& out_dir, const std::function<void()>& on_validated) {
  Run r(cfg, out_dir);
  r.env = dist::env_from_environment();
  r.steps = cfg.get_int("train.steps");
  r.micro = cfg.get_int("train.micro_batch");
  r.global = cfg.get_int("train.global_batch");
  const int world = r.env.world;
  check_run_setup(cfg, world);
  if (cfg.get_bool("output.resume")) check_resume_config(cfg, out_dir);
  at::manual_seed(static_cast<uint64_t>(cfg.get_int("train.seed")));
  load_model_and_data(r);
  check_tile(r);
  check_prior_file(r);
  if (on_validated) on_validated();
  build_masks(r);
  // Every rank holds the whole model and the same masks; each takes its share
  // of a step's micro-batches, and the summed logit gradients keep the masks
  // identical. Rank 0 alone evaluates and writes.
  dist::Group group(r.env, r.device, cfg.get_string("dist.backend"));
  const bool root = group.is_root();
  if (world > 1)
    core::log::info(str("rank ", r.env.rank, " of ", world, " (", group.backend(), ") on ", r.device.str()));

  const std::string metrics_path = (fs::path(out_dir) / "metrics.jsonl").string();
  int64_t start = 0;
  if (cfg.get_bool("output.resume")) start = load_checkpoint(r);
  // A run stopped before its first step resumes at 0 and writes the step-0 line again.
  if (root) truncate_metrics(metrics_path, start == 0 ? -1 : start);
  std::ofstream metrics;
  if (root) metrics.open(metrics_path, std::ios::app);
  // One line per call, flushed; a failed write names the file and the reason.
  auto write_metrics = [&](const json& line) {
    errno = 0;
    metrics << line.dump() << "\n" << std::flush;
    if (!metrics)
      throw core::Error(str(metrics_path, ": write failed (", errno ? std::strerror(errno) : "unknown error", ")"));
  };

  const double lr_peak = cfg.get_float("train.lr");
  const double min_ratio = cfg.get_float("train.min_lr_ratio");
  const int64_t warmup = cfg.get_int("train.warmup_steps");
  const double clip = cfg.get_float("train.grad_clip");
  const double lambda_s = cfg.get_float("train.lambda_sparsity");
  // train.loss=kd: the LM term (logged as "ce") is the divergence from the unmasked model.
  const bool distill = cfg.get_string("train.loss") == "kd";
  const double lambda_w = cfg.get_float("train.lambda_weight");
  const int64_t eval_every = cfg.get_int("train.eval_every");
  const int64_t ckpt_every = cfg.get_int("train.checkpoint_every");
  const int64_t log_every = cfg.get_int("train.log_every");
  const int64_t n_micro = r.global / r.micro;
  int64_t last_checkpoint = start;
  // train.cuda_graph: after one eager step, each step is one graph replay;
  // its micro-batches are copied into fixed device buffers first, and its
  // outputs are read after it.
  std::optional<core::CudaGraph> graph;
  if (cfg.get_bool("train.cuda_graph")) {
    r.opt->use_device_scalars();
    graph.emplace(r.device);
  }
  at::Tensor graph_ids;  // [micro-batches of this rank, micro, block] on the device
  struct {
    at::Tensor ce, reg, density, norm;
  } graph_out;
  const sparsity::Budget budget{r.target, r.budget};
  auto density_reg = [&] { return budget.penalty(*r.masks); };

  if (start == 0 && root) {
    // The hardened starting point (init + prior) as step 0, the baseline of the run.
    auto hard0 = budget.harden(*r.masks);
    double vl0 = evaluate_hard(r, hard0);
    write_metrics({{"step", 0}, {"valid_loss", vl0}, {"valid_ppl", std::exp(vl0)},
                   {"hard_sparsity", hard0.achieved_sparsity()}, {"windows", r.valid_blocks.size()}});
    core::log::info(str("step 0: validation perplexity ", std::exp(vl0), " with the hardened initial masks (prior ",
                        cfg.get_string("mask.prior"), ", sparsity ", hard0.achieved_sparsity(), ")"));
  }

  std::optional<core::Progress> progress;
  // Not interruptible: a signal stops the loop at the next step boundary, with a checkpoint.
  if (root) progress.emplace("train", static_cast<long>(r.steps), 10.0, /*interruptible=*/false);
  auto t_start = std::chrono::steady_clock::now();
  const int64_t per_rank = n_micro / world;
  // After a resume has loaded the logits: the reducer hooks the tensors themselves.
  std::optional<dist::GradReducer> reducer;
  if (world > 1) reducer.emplace(group, r.opt->params_in_backward_order());
  for (int64_t step = start; step < r.steps; ++step) {
    // The ranks agree on stopping, so that none waits for the others in a collective.
    int sig = core::stop_signal();
    if (world > 1) sig = static_cast<int>(group.allreduce_max(sig));
    if (sig) {
      if (root) save_checkpoint(r, step);
      if (progress) progress->finish();
      core::log::warn(str("stopped by signal ", sig, " at step ", step, "; checkpoint written, continue with --resume"));
      return core::kExitInterrupted;
    }
    auto t0 = std::chrono::steady_clock::now();
    core::reset_peak_memory(r.device);
    const double frac = r.steps > 1 ? static_cast<double>(step) / static_cast<double>(r.steps - 1) : 1.0;
    r.schedule.apply(*r.state, frac);
    r.state->step = step;
    const double lr = lr_at(step, r.steps, warmup, lr_peak, min_ratio);

    // LM loss, accumulated over micro-batches.
    r.opt->begin_step(lr);
    at::Tensor ce_sum;  // read once after the micro-batches: no device sync between them
    auto blocks = sample_blocks(r, step * r.global, (step + 1) * r.global);
    const int64_t first = r.env.rank * per_rank, last = first + per_rank - 1;
    auto micro_ids = [&](int64_t k) {
      std::vector<int64_t> idx(blocks.begin() + k * r.micro, blocks.begin() + (k + 1) * r.micro);
      return r.train_data->blocks(idx);
    };
    // One micro-batch's forward and backward; adds its share of the step's
    // cross-entropy (float64, detached) to `sum`.
    auto micro_step = [&](const at::Tensor& ids, bool arm_reducer, at::Tensor& sum) {
      at::Tensor loss = distill ? r.model->distill_loss(ids, r.model->teacher_hidden(ids)) : r.model->loss(ids);
      if (arm_reducer) reducer->arm();
      (loss / static_cast<double>(n_micro)).backward();
      const at::Tensor part = loss.detach().to(at::kDouble) / static_cast<double>(n_micro);
      sum = sum.defined() ? sum + part : part;
    };
    if (graph) {
      for (int64_t k = first; k <= last; ++k) {
        const at::Tensor ids = micro_ids(k);
        if (!graph_ids.defined())
          graph_ids = at::empty({per_rank, ids.size(0), ids.size(1)}, ids.options().device(r.device));
        graph_ids[k - first].copy_(ids);
      }
      graph->run([&] {
        at::Tensor sum;
        for (int64_t k = 0; k < per_rank; ++k) micro_step(graph_ids[k], /*arm_reducer=*/false, sum);
        auto [density, reg] = density_reg();
        at::Tensor total_reg = reg * lambda_s;
        if (total_reg.requires_grad()) total_reg.backward();
        // Detached: an autograd graph kept alive past the step would keep its
        // leaves' gradient accumulators, and with them the eager run's stream.
        graph_out = {sum, reg.detach(), density.detach(), r.opt->finish_step_on_device(clip)};
      });
      ce_sum = graph_out.ce;
    } else {
      for (int64_t k = first; k <= last; ++k)
        micro_step(micro_ids(k).to(r.device), reducer && k == last, ce_sum);
    }
    double ce = ce_sum.item<double>();
    if (reducer) {
      // Summed before the regularizers' backward, which every rank computes whole.
      reducer->finish();
      ce = group.allreduce_sum(ce);
    }
    // Regularizers: density towards the budget, minus the kept-weight term
    // (a replayed graph has run the whole step).
    auto [density, reg] = graph ? std::make_pair(graph_out.density, graph_out.reg) : density_reg();
    at::Tensor total_reg = reg * lambda_s;
    double weight_term = 0.0;
    const double w_coef = lambda_w * (1.0 - static_cast<double>(step) / static_cast<double>(r.steps));
    if (w_coef > 0) {
      at::Tensor kept = at::zeros({}, density.options());
      for (size_t i = 0; i < r.masks->size(); ++i)
        kept = kept + r.masks->masks()[i]->weight_term(r.masks->weight(i)).sqrt();
      at::Tensor wt = kept / r.weight_norm_total;
      weight_term = wt.item<double>();
      total_reg = total_reg - w_coef * wt;
    }
    if (!graph && total_reg.requires_grad()) total_reg.backward();
    const double reg_value = reg.item<double>();
    const double density_value = density.item<double>();
    const double loss_value = ce + lambda_s * reg_value - w_coef * weight_term;
    if (!std::isfinite(loss_value)) {
      if (progress) progress->finish();
      throw core::Error(str("step ", step + 1, ": the loss is ", loss_value, " (cross-entropy ", ce,
                            "); stopping. The last good checkpoint (step ", last_checkpoint, ") is in ", out_dir,
                            "; lower train.lr or check the data"));
    }
    const double grad_norm = graph ? graph_out.norm.item<double>() : r.opt->finish_step(lr, clip);
    if (!root) continue;

    const int64_t done = step + 1;
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tokens = static_cast<double>(r.global * r.seq_len);
    bool is_last = done == r.steps;
    json m;
    if (done % log_every == 0 || is_last || (eval_every > 0 && done % eval_every == 0)) {
      m = {{"step", done},
           {"lr", lr},
           {"loss", loss_value},
           {"ce", ce},
           {"sparsity_reg", reg_value},
           {"weight_term", weight_term},
           {"soft_density", density_value},
           {"hard_density", hard_density_by_sign(r)},
           {"tau_24", r.state->tau_24},
           {"scale_24", r.state->scale_24},
           {"tau_tile", r.state->tau_tile},
           {"scale_tile", r.state->scale_tile},
           {"grad_norm", grad_norm},
           {"tokens_per_s", tokens / step_s},
           {"step_ms", step_s * 1e3},
           {"peak_mem_gib", core::peak_memory_gib(r.device)}};
    }
    if ((eval_every > 0 && done % eval_every == 0) && !is_last) {
      auto hard = budget.harden(*r.masks);
      double vl = evaluate_hard(r, hard);
      m["valid_loss"] = vl;
      m["valid_ppl"] = std::exp(vl);
      m["hard_sparsity"] = hard.achieved_sparsity();
      progress->message(str("step ", done, ": validation perplexity ", std::exp(vl), " (hardened, sparsity ",
                            hard.achieved_sparsity(), ")"));
    }
    if (!m.is_null()) write_metrics(m);
    progress->update(static_cast<long>(done), static_cast<long>(tokens),
                    str("loss ", std::round(ce * 1000) / 1000, " density ",
                        std::round(density_value * 1000) / 1000));
    if ((ckpt_every > 0 && done % ckpt_every == 0) && !is_last) {
      save_checkpoint(r, done);
      last_checkpoint = done;
    }
  }
  if (!root) return 0;
  progress->finish();

  auto hard = budget.harden(*r.masks);
  double vl = evaluate_hard(r, hard);
  json fin = {{"step", r.steps}, {"final", true}, {"valid_loss", vl}, {"valid_ppl", std::exp(vl)},
              {"hard_sparsity", hard.achieved_sparsity()},
              {"elapsed_s", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count()}};
  write_metrics(fin);
  save_checkpoint(r, r.steps);
  const double dense = evaluate_dense(r);
  const double prior = initial_loss(metrics_path, r.valid_blocks.size());
  write_outputs(r, hard, vl, validation_summary(r, vl, dense, prior));
  return 0;
}

}  // namespace patch::train
