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
#include "prune/priors.h"
#include "prune/pruner.h"
#include "sparsity/tile_grid.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "sparsity/prior.h"
#include "text/tokenizer.h"
#include "train/mask_learner.h"
#include "train/optimizer.h"
#include "train/train_options.h"

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
  TrainOptions opts;
  at::Device device = at::kCPU;
  int64_t seq_len = 0;
  std::unique_ptr<model::Decoder> model;
  std::unique_ptr<data::BlockDataset> train_data, valid_data;
  std::vector<int64_t> train_blocks, valid_blocks;
  std::unique_ptr<MaskLearner> learner;
  std::string model_path;
  dist::Env env;  // this process's rank in a data-parallel run
  // mask.prior=file: the file's priors, read and checked once (check_prior_file).
  std::map<std::string, sparsity::Prior> file_priors;

  explicit Run(const config::Config& c, std::string dir) : cfg(c), out_dir(std::move(dir)) {}
};

void load_model_and_data(Run& r) {
  const auto& cfg = r.cfg;
  r.model_path = core::resolve_path(cfg.get_string("model.path"));
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
  if (cfg.get_string_list("data.train").empty())
    throw core::ConfigError("data.train: no training file given (use --data FILE or data.train in the config)");
  r.seq_len = cfg.get_int("data.seq_len");
  r.train_data = std::make_unique<data::BlockDataset>(
      data::load_config_tokens(cfg, "data.train", *tok, cfg.get_int("data.max_tokens")), r.seq_len);
  if (cfg.get_string_list("data.valid").empty()) {
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
    r.valid_data = std::make_unique<data::BlockDataset>(data::load_config_tokens(cfg, "data.valid", *tok), r.seq_len);
    for (int64_t i = 0; i < r.valid_data->num_blocks(); ++i) r.valid_blocks.push_back(i);
  }
  const int64_t eval_blocks = r.opts.eval_blocks;
  if (static_cast<int64_t>(r.valid_blocks.size()) > eval_blocks) r.valid_blocks.resize(eval_blocks);
  if (r.train_blocks.empty())
    throw core::Error(str("data.train: fewer tokens than one block of data.seq_len + 1 = ", r.seq_len + 1,
                          " after holding out ", r.valid_blocks.size(), " validation blocks"));
  core::log::info(str("data: ", r.train_blocks.size(), " training blocks, ", r.valid_blocks.size(),
                      " validation blocks of ", r.seq_len, " tokens"));
}

// The learner with its masks on the model, and the prior of mask.prior in
// their logits.
void build_learner(Run& r, dist::Group& group) {
  const auto& cfg = r.cfg;
  // Wanda/SparseGPT priors calibrate on the dense model, before any mask is
  // attached; a resumed run takes the prior its run folder kept (the same by
  // the resume check).
  const std::string kept = (fs::path(r.out_dir) / kPriorName).string();
  const bool resumed = cfg.get_bool("output.resume") && fs::exists(kept);
  const prune::Priors priors =
      prune::calibrated_priors(cfg, r.model_path, *r.model, r.train_data->tokens(), resumed ? kept : "");
  if (group.is_root() && !resumed && !priors.empty()) prune::save_priors(kept, priors);

  r.learner = std::make_unique<MaskLearner>(*r.model, r.opts.step, &group);
  sparsity::MaskSet& masks = r.learner->masks();
  core::log::info(str("masks: ", masks.size(), " layers, ", masks.total_weights(), " weights, mode ",
                      cfg.get_string("mask.mode"), ", target sparsity ", r.opts.step.budget.target_sparsity));
  // Priors shift the N(0, sigma) initial logits towards a one-shot mask.
  prune::apply_configured_prior(cfg, masks, priors, r.file_priors);
}

// The training blocks of global sample positions [begin, end): epochs reshuffle
// with the seed, so the data position is a pure function of the step.
std::vector<int64_t> sample_blocks(const Run& r, int64_t begin, int64_t end) {
  const auto n = static_cast<int64_t>(r.train_blocks.size());
  const uint64_t seed = r.opts.seed;
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
  const auto micro = static_cast<size_t>(r.opts.step.micro_batch);
  for (size_t b = 0; b < r.valid_blocks.size(); b += micro) {
    std::vector<int64_t> idx(r.valid_blocks.begin() + static_cast<int64_t>(b),
                             r.valid_blocks.begin() + static_cast<int64_t>(std::min(r.valid_blocks.size(), b + micro)));
    auto ids = ds.blocks(idx).to(r.device);
    sum += r.model->loss(ids).item<double>() * static_cast<double>(idx.size());
    n += static_cast<int64_t>(idx.size());
  }
  return n ? sum / static_cast<double>(n) : std::nan("");
}

// Validation loss with the hardened masks installed, then the learnable ones back.
double evaluate_hard(Run& r, const sparsity::Hardened& hard) {
  maskfile::apply_masks(*r.model, hard.layers);
  const double loss = validation_loss(r);
  r.learner->attach();
  return loss;
}

// Validation loss of the unmasked model on the same windows.
double evaluate_dense(Run& r) {
  r.learner->detach();
  const double loss = validation_loss(r);
  r.learner->attach();
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
  MaskOptimizer& opt = r.learner->optimizer();
  for (auto& [name, t] : r.learner->masks().named_state()) tensors.emplace_back("mask/" + name, t.detach());
  for (auto& [name, t] : opt.adam().state()) tensors.emplace_back("adam/" + name, t);
  std::map<std::string, std::string> meta = {
      {"format", kCheckpointFormat},
      {"step", std::to_string(step)},
      {"adam_steps", std::to_string(opt.adam().steps())},
      {"clip_scale", json(opt.clip_scale()).dump()},
      {"data_position", std::to_string(step * r.opts.step.global_batch)},
      {"seed", std::to_string(r.opts.seed)},
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
    r.learner->masks().load_state(masks, path);
  }
  MaskOptimizer& opt = r.learner->optimizer();
  opt.adam().load_state(adam, std::stoll(get("adam_steps")));
  if (auto it = meta.find("clip_scale"); it != meta.end()) opt.set_clip_scale(json::parse(it->second).get<double>());
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

  auto report = sparsity::density_report(r.learner->masks(), hard);
  core::log::info("density (kept fraction), learned vs hardened:\n" + report.format());
  json rep;
  rep["target_sparsity"] = r.opts.step.budget.target_sparsity;
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
                      " at sparsity ", hard.achieved_sparsity(), " (target ", r.opts.step.budget.target_sparsity, ")"));
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
  check_same_run(cfg, (fs::path(out_dir) / kCheckpointName).string(), resume_mutable_keys());
}

void check_same_run(const config::Config& cfg, const std::string& path, const std::vector<std::string>& mutable_keys) {
  if (!fs::exists(path)) return;
  io::SafetensorsFile f(path);
  const auto& meta = f.metadata();
  const auto it = meta.find("config");
  if (it == meta.end()) throw core::Error(str(path, ": not a patch-train checkpoint (no 'config')"));
  using config::Json;
  const Json saved = Json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!saved.is_object()) throw core::Error(str(path, ": its 'config' is not a JSON object"));
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
                                    " in the checkpoint ", path,
                                    "; a resumed run must be the same run (start a new one, or --overwrite)"));
    }
  }
}

int stop_signal() { return core::stop_signal(); }

void install_stop_handlers() { core::install_stop_handlers(); }

void check_run_setup(const config::Config& cfg, int world) {
  check_step_options(train_options(cfg, core::resolve_device(cfg.get_string("model.device"))).step, world);
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
  const int world = r.env.world;
  r.device = dist::rank_device(core::resolve_device(cfg.get_string("model.device")), r.env.local_rank, world);
  r.opts = train_options(cfg, r.device);
  check_step_options(r.opts.step, world);
  if (cfg.get_bool("output.resume")) check_resume_config(cfg, out_dir);
  at::manual_seed(r.opts.seed);
  load_model_and_data(r);
  check_tile(r);
  check_prior_file(r);
  if (on_validated) on_validated();
  // Every rank holds the whole model and the same masks; each takes its share
  // of a step's micro-batches, and the summed logit gradients keep the masks
  // identical. Rank 0 alone evaluates and writes.
  dist::Group group(r.env, r.device, cfg.get_string("dist.backend"));
  const bool root = group.is_root();
  if (world > 1)
    core::log::info(str("rank ", r.env.rank, " of ", world, " (", group.backend(), ") on ", r.device.str()));
  build_learner(r, group);
  MaskLearner& learner = *r.learner;
  const StepOptions& so = r.opts.step;

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
  int64_t last_checkpoint = start;

  if (start == 0 && root) {
    // The hardened starting point (init + prior) as step 0, the baseline of the run.
    auto hard0 = learner.harden();
    double vl0 = evaluate_hard(r, hard0);
    write_metrics({{"step", 0}, {"valid_loss", vl0}, {"valid_ppl", std::exp(vl0)},
                   {"hard_sparsity", hard0.achieved_sparsity()}, {"windows", r.valid_blocks.size()}});
    core::log::info(str("step 0: validation perplexity ", std::exp(vl0), " with the hardened initial masks (prior ",
                        cfg.get_string("mask.prior"), ", sparsity ", hard0.achieved_sparsity(), ")"));
  }

  std::optional<core::Progress> progress;
  // Not interruptible: a signal stops the loop at the next step boundary, with a checkpoint.
  if (root) progress.emplace("train", static_cast<long>(so.steps), 10.0, /*interruptible=*/false);
  auto t_start = std::chrono::steady_clock::now();
  for (int64_t step = start; step < so.steps; ++step) {
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
    // This rank's micro-batches of the step's blocks.
    const auto blocks = sample_blocks(r, step * so.global_batch, (step + 1) * so.global_batch);
    std::vector<at::Tensor> micro_batches;
    for (int64_t k = learner.first_micro_batch(), n = 0; n < learner.micro_batches_per_rank(); ++k, ++n) {
      std::vector<int64_t> idx(blocks.begin() + k * so.micro_batch, blocks.begin() + (k + 1) * so.micro_batch);
      micro_batches.push_back(r.train_data->blocks(idx));
    }
    const StepStats st = learner.step(step, micro_batches);
    if (!std::isfinite(st.loss)) {
      if (progress) progress->finish();
      throw core::Error(str("step ", step + 1, ": the loss is ", st.loss, " (cross-entropy ", st.ce,
                            "); stopping. The last good checkpoint (step ", last_checkpoint, ") is in ", out_dir,
                            "; lower train.lr or check the data"));
    }
    if (!root) continue;

    const int64_t done = step + 1;
    const double step_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tokens = static_cast<double>(so.global_batch * r.seq_len);
    const bool is_last = done == so.steps;
    const bool eval_now = r.opts.eval_every > 0 && done % r.opts.eval_every == 0;
    json m;
    if (done % r.opts.log_every == 0 || is_last || eval_now) {
      const auto& state = learner.state();
      m = {{"step", done},
           {"lr", st.lr},
           {"loss", st.loss},
           {"ce", st.ce},
           {"sparsity_reg", st.reg},
           {"weight_term", st.weight_term},
           {"soft_density", st.density},
           {"hard_density", learner.hard_density()},
           {"tau_24", state.tau_24},
           {"scale_24", state.scale_24},
           {"tau_tile", state.tau_tile},
           {"scale_tile", state.scale_tile},
           {"grad_norm", st.grad_norm},
           {"tokens_per_s", tokens / step_s},
           {"step_ms", step_s * 1e3},
           {"peak_mem_gib", core::peak_memory_gib(r.device)}};
    }
    if (eval_now && !is_last) {
      auto hard = learner.harden();
      double vl = evaluate_hard(r, hard);
      m["valid_loss"] = vl;
      m["valid_ppl"] = std::exp(vl);
      m["hard_sparsity"] = hard.achieved_sparsity();
      progress->message(str("step ", done, ": validation perplexity ", std::exp(vl), " (hardened, sparsity ",
                            hard.achieved_sparsity(), ")"));
    }
    if (!m.is_null()) write_metrics(m);
    progress->update(static_cast<long>(done), static_cast<long>(tokens),
                    str("loss ", std::round(st.ce * 1000) / 1000, " density ", std::round(st.density * 1000) / 1000));
    if ((r.opts.checkpoint_every > 0 && done % r.opts.checkpoint_every == 0) && !is_last) {
      save_checkpoint(r, done);
      last_checkpoint = done;
    }
  }
  if (!root) return 0;
  progress->finish();

  auto hard = learner.harden();
  double vl = evaluate_hard(r, hard);
  json fin = {{"step", so.steps}, {"final", true}, {"valid_loss", vl}, {"valid_ppl", std::exp(vl)},
              {"hard_sparsity", hard.achieved_sparsity()},
              {"elapsed_s", std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count()}};
  write_metrics(fin);
  save_checkpoint(r, so.steps);
  const double dense = evaluate_dense(r);
  const double prior = initial_loss(metrics_path, r.valid_blocks.size());
  write_outputs(r, hard, vl, validation_summary(r, vl, dense, prior));
  return 0;
}

}  // namespace patch::train
