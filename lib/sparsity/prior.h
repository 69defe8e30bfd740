#pragma once
// Priors: a one-shot method's 2:4 choice and tile ranking, used to initialise
// the logits (magnitude here; Wanda/SparseGPT/mask files fill the same struct).
#include <ATen/ATen.h>

#include <map>
#include <string>

#include "sparsity/budget.h"
#include "sparsity/tile_grid.h"

namespace patch::sparsity {

class MaskSet;

struct Prior {
  at::Tensor pattern;     // uint8 [out, in/4], the prior's 2:4 pattern per group
  at::Tensor tile_score;  // float [rows, cols], higher = more important to keep dense
};

// Per group, the pattern keeping the largest sum of `score` [out, in] (ties: lower index).
at::Tensor best_patterns(const at::Tensor& score);
// Per tile, the fraction of its weights surviving an unstructured prune of the
// layer at `sparsity` (the round(sparsity * numel) lowest scores removed,
// ties broken by position).
at::Tensor survivor_fraction(const at::Tensor& score, const TileGrid& grid, double sparsity);
// best_patterns + survivor_fraction (PATCH's rule) for any importance score.
Prior prior_from_scores(const at::Tensor& score, const TileGrid& grid, double target_sparsity);
// Magnitude: score = |W|.
Prior magnitude_prior(const at::Tensor& weight, const TileGrid& grid, double target_sparsity);
// Magnitude priors of every layer of `masks` from its stored weights.
std::map<std::string, Prior> magnitude_priors(const MaskSet& masks, double target_sparsity);

struct PriorStrength {
  double sigma = 1.0;   // mask.init_std
  double s24 = 3.0;     // mask.prior_strength_24
  double s_tile = 3.0;  // mask.prior_strength_tile
};

// Shifts the logits of every layer (all must have a prior):
//   pattern_logits[.., k] += (overlap(k, prior) - 1) * sigma * s24
// (overlap = kept positions shared with the prior's pattern: 2, 1 or 0); tile
// mode takes the prior's pattern as its fixed pattern instead. Tile logits
// += sigma * s_tile for the tiles that select_dense_tiles picks by tile_score
// under the budget and -= for the rest (not in maskllm mode).
void apply_prior(MaskSet& masks, const std::map<std::string, Prior>& priors, double target_sparsity,
                 BudgetKind kind, const PriorStrength& strength);

}  // namespace patch::sparsity
