#pragma once
// The prior that mask.prior names, for the masks of a mask-learning run: one
// place that chooses it, calibrates it (or reads it from the shared cache or a
// file) and puts it into the initial logits.
#include <map>
#include <string>

#include "config/config.h"
#include "data/token_file.h"
#include "model/decoder.h"
#include "sparsity/mask_set.h"
#include "sparsity/prior.h"

namespace patch::prune {

using Priors = std::map<std::string, sparsity::Prior>;

// mask.prior = wanda | sparsegpt: the calibrated priors of the model at
// `model_path` (`model` dense, before any mask is attached), from `kept` when
// that file exists (a resumed run's own copy), else from the shared cache
// (mask.prior_cache, keyed by everything the priors depend on), else
// calibrated on `tokens` and cached. Any other prior: none (empty).
Priors calibrated_priors(const config::Config& cfg, const std::string& model_path, model::Decoder& model,
                         const data::TokenStream& tokens, const std::string& kept);

// Shifts the N(0, init_std) initial logits of `masks` towards mask.prior's
// one-shot mask at mask.target_sparsity: `calibrated` for wanda and sparsegpt,
// `from_file` for file (errors name mask.prior_file), the magnitudes for
// magnitude, nothing for none (refused in tile mode, which takes its 2:4
// patterns from the prior).
void apply_configured_prior(const config::Config& cfg, sparsity::MaskSet& masks, const Priors& calibrated,
                            const Priors& from_file);

}  // namespace patch::prune
