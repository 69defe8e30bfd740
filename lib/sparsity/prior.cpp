#include "sparsity/prior.h"

#include <ATen/core/grad_mode.h>

#include <cmath>

#include "core/error.h"
#include "sparsity/mask_set.h"
#include "sparsity/patterns.h"

namespace patch::sparsity {

at::Tensor best_patterns(const at::Tensor& score) {
  core::check(score.dim() == 2 && score.size(1) % kGroupSize == 0, "best_patterns",
              core::str("expected a [out, in] score with in a multiple of 4, got ", score.sizes()));
  auto s = score.reshape({score.size(0), score.size(1) / kGroupSize, kGroupSize});
  std::vector<at::Tensor> kept;
  for (const auto& k : kPatternKept) kept.push_back(s.select(-1, k[0]) + s.select(-1, k[1]));
  return at::stack(kept, -1).argmax(-1).to(at::kByte);
}

at::Tensor survivor_fraction(const at::Tensor& score, const TileGrid& grid, double sparsity) {
  core::check(score.dim() == 2 && score.size(0) == grid.out() && score.size(1) == grid.in(), "survivor_fraction",
              core::str("score ", score.sizes(), " does not match ", grid.str()));
  core::check(sparsity >= 0.0 && sparsity <= 1.0, "survivor_fraction", core::str("sparsity ", sparsity, " outside [0, 1]"));
  auto flat = score.detach().reshape(-1);
  auto keep = at::ones({flat.numel()}, flat.options().dtype(at::kFloat));
  const auto pruned = static_cast<int64_t>(std::llround(sparsity * static_cast<double>(flat.numel())));
  if (pruned > 0) {
    auto order = at::argsort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    keep.index_fill_(0, order.narrow(0, 0, pruned), 0.0);
  }
  auto kept = grid.reduce_sum(keep.view({grid.out(), grid.in()}));
  return kept / grid.counts().to(kept.device(), at::kFloat);
}

Prior prior_from_scores(const at::Tensor& score, const TileGrid& grid, double target_sparsity) {
  return {best_patterns(score), survivor_fraction(score, grid, target_sparsity)};
}

Prior magnitude_prior(const at::Tensor& weight, const TileGrid& grid, double target_sparsity) {
  return prior_from_scores(weight.detach().abs().to(at::kFloat), grid, target_sparsity);
}

std::map<std::string, Prior> magnitude_priors(const MaskSet& masks, double target_sparsity) {
  std::map<std::string, Prior> out;
  for (size_t i = 0; i < masks.size(); ++i) {
    const auto& m = masks.masks()[i];
    out[m->name()] = magnitude_prior(masks.weight(i), m->grid(), target_sparsity);
  }
  return out;
}

void apply_prior(MaskSet& masks, const std::map<std::string, Prior>& priors, double target_sparsity,
                 BudgetKind kind, const PriorStrength& strength) {
  std::vector<TileScores> scores;
  for (const auto& m : masks.masks()) {
    auto it = priors.find(m->name());
    core::check(it != priors.end(), m->name(), "no prior for this layer");
    const auto& p = it->second;
    const auto& g = m->grid();
    core::check(p.pattern.dim() == 2 && p.pattern.size(0) == g.out() && p.pattern.size(1) == g.groups(),
                m->name(), core::str("prior pattern ", p.pattern.sizes(), ", expected [", g.out(), ", ", g.groups(), "]"));
    core::check(p.tile_score.dim() == 2 && p.tile_score.size(0) == g.rows() && p.tile_score.size(1) == g.cols(),
                m->name(), core::str("prior tile score ", p.tile_score.sizes(), ", expected [", g.rows(), ", ", g.cols(), "]"));
    scores.push_back({g, p.tile_score, m->block()});
  }
  const auto mode = masks.options().mask.mode;
  std::vector<at::Tensor> dense;
  if (mode != MaskMode::kMaskLLM) dense = select_dense_tiles(scores, target_sparsity, kind);

  // shift[p][k] = overlap(k, p) - 1: +1 for the prior's pattern, -1 for its complement.
  auto shift = at::empty({kNumPatterns, kNumPatterns}, at::kDouble);
  for (int p = 0; p < kNumPatterns; ++p)
    for (int k = 0; k < kNumPatterns; ++k) shift[p][k] = pattern_overlap(k, p) - 1;
  shift = shift * (strength.sigma * strength.s24);

  at::NoGradGuard no_grad;
  for (size_t i = 0; i < masks.size(); ++i) {
    const auto& m = masks.masks()[i];
    const auto& p = priors.at(m->name());
    if (mode == MaskMode::kTile) {
      m->set_fixed_pattern(p.pattern);
    } else {
      const auto& logits = m->pattern_logits();
      auto idx = p.pattern.to(logits.device(), at::kLong).reshape(-1);
      logits.add_(shift.to(logits.device(), logits.scalar_type()).index_select(0, idx).view(logits.sizes()));
    }
    if (mode != MaskMode::kMaskLLM) {
      const auto& logits = m->tile_logits();
      auto sign = dense[i].to(at::kDouble) * 2.0 - 1.0;
      logits.add_((sign * (strength.sigma * strength.s_tile)).to(logits.device(), logits.scalar_type()));
    }
  }
}

}  // namespace patch::sparsity
