#include "prune/priors.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/log.h"
#include "core/paths.h"
#include "core/sha256.h"
#include "prune/methods.h"
#include "prune/pruner.h"
#include "sparsity/budget.h"
#include "sparsity/linear_mask.h"

namespace patch::prune {

namespace fs = std::filesystem;
using core::str;

namespace {

// The shared cache's file for these priors: the key is everything they depend on.
std::string cache_path(const config::Config& cfg, const std::string& prior, const std::string& model_path) {
  nlohmann::json key = {prior,
                        core::file_fingerprint(model_path),
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
  return (fs::path(dir) / (prior + "-" + core::sha256_hex(key.dump()).substr(0, 16) + ".safetensors")).string();
}

}  // namespace

Priors calibrated_priors(const config::Config& cfg, const std::string& model_path, model::Decoder& model,
                         const data::TokenStream& tokens, const std::string& kept) {
  const std::string prior = cfg.get_string("mask.prior");
  if (prior != "wanda" && prior != "sparsegpt") return {};
  const std::string cached = cache_path(cfg, prior, model_path);
  const bool resumed = !kept.empty() && fs::exists(kept);
  if (resumed || fs::exists(cached)) {
    core::log::info(str("prior: ", prior, " from ", resumed ? kept : cached));
    return load_priors(resumed ? kept : cached);
  }
  auto po = prune_options(cfg);
  po.method = parse_method(prior);
  const auto calib = calibration_ids(tokens, calibration_options(cfg));
  core::log::info(str("prior: ", prior, " on ", calib.size(0), " calibration sequences of ", calib.size(1), " tokens"));
  Priors priors = oneshot_priors(model, calib, po);
  std::error_code ec;
  fs::create_directories(fs::path(cached).parent_path(), ec);
  try {
    save_priors(cached, priors);
  } catch (const core::Error& e) {  // a cache is a convenience, never a reason to stop
    core::log::warn(str("prior cache not written: ", e.what()));
  }
  return priors;
}

void apply_configured_prior(const config::Config& cfg, sparsity::MaskSet& masks, const Priors& calibrated,
                            const Priors& from_file) {
  const std::string prior = cfg.get_string("mask.prior");
  const double target = cfg.get_float("mask.target_sparsity");
  const auto budget = sparsity::parse_budget(cfg.get_string("mask.budget"));
  const sparsity::PriorStrength strength{cfg.get_float("mask.init_std"), cfg.get_float("mask.prior_strength_24"),
                                         cfg.get_float("mask.prior_strength_tile")};
  if (prior == "none") {
    if (masks.options().mask.mode == sparsity::MaskMode::kTile)
      throw core::ConfigError("mask.prior: tile mode fixes the 2:4 patterns from a prior; 'none' gives none");
    return;
  }
  if (prior == "file") {
    try {
      sparsity::apply_prior(masks, from_file, target, budget, strength);
    } catch (const core::Error& e) {
      throw core::Error(str(core::resolve_path(cfg.get_string("mask.prior_file")), ": ", e.what(),
                            " (mask.prior_file, tile ", cfg.at("mask.tile").dump(), ")"));
    }
    return;
  }
  if (prior == "magnitude") {
    sparsity::apply_prior(masks, sparsity::magnitude_priors(masks, target), target, budget, strength);
    return;
  }
  sparsity::apply_prior(masks, calibrated, target, budget, strength);
}

}  // namespace patch::prune
