#pragma once
// Hardening under an exact density budget and the soft/hard density report.
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "sparsity/linear_mask.h"
#include "sparsity/tile_grid.h"

namespace patch::sparsity {

class MaskSet;

enum class BudgetKind { kGlobal, kPerBlock };
BudgetKind parse_budget(const std::string& name);  // "global" | "per_block"; core::ConfigError

// One layer's tile ranking input: higher score = keep dense first.
struct TileScores {
  TileGrid grid;
  at::Tensor score;    // [rows, cols], any float dtype/device
  int64_t block = -1;  // decoder block (for the per-block budget)
};

// Chooses dense tiles in decreasing score (ties: layer order, then row-major)
// within each pool (all layers, or each block), taking the longest prefix of
// that order whose dense-weight count D is closest to the budget
// B = (1 - 2 * target) * N of the pool's N weights. Guarantee: |D - B| <= c/2
// for the tile c at which the prefix stops, so per pool
//   |achieved sparsity - target| <= max tile count / (4 N)
// (within the max tile count / (2 N) that callers may rely on).
// Returns uint8 [rows, cols] (1 = dense) per layer, on the CPU.
std::vector<at::Tensor> select_dense_tiles(const std::vector<TileScores>& layers, double target_sparsity,
                                           BudgetKind kind);

struct HardenedLayer {
  std::string name;
  TileGrid grid;
  int64_t block = -1;
  at::Tensor tile_dense;  // uint8 [rows, cols], 1 = dense (CPU)
  at::Tensor pattern;     // uint8 [out, in/4], 2:4 pattern index (CPU)

  int64_t dense_weights() const;  // weights in dense tiles
  int64_t zero_weights() const;   // half of every sparse tile
  at::Tensor mask(at::ScalarType dtype = at::kFloat) const { return build_mask(grid, tile_dense, pattern, dtype); }
};

struct Hardened {
  MaskMode mode = MaskMode::kJoint;
  BudgetKind budget = BudgetKind::kGlobal;
  double target_sparsity = 0.0;
  std::vector<HardenedLayer> layers;

  int64_t total_weights() const;
  int64_t zero_weights() const;
  double achieved_sparsity() const;  // zeros / total masked weights
};

// Final masks: tiles ranked by their logits under the exact budget (joint and
// tile modes; maskllm: every tile sparse), 2:4 by argmax (tile mode: fixed).
Hardened harden(const MaskSet& masks, double target_sparsity, BudgetKind kind);

// A sparsity budget, over the whole model or in every decoder block: the
// exact rule that hardens the masks, and the soft term that training adds to
// pull the learned distribution's expected density towards it.
struct Budget {
  double target_sparsity = 0.5;
  BudgetKind kind = BudgetKind::kGlobal;

  double target_density() const { return 1.0 - target_sparsity; }
  Hardened harden(const MaskSet& masks) const { return sparsity::harden(masks, target_sparsity, kind); }
  // {the global soft density, |density - target density|}, per block the sum
  // over decoder blocks of |block density - target density|: differentiable
  // in the tile logits through this step's gates (a constant without them).
  std::pair<at::Tensor, at::Tensor> penalty(const MaskSet& masks) const;
};

// Densities (kept fraction) of the learned distribution (expected density, see
// LinearMask::expected_density) beside the hardened masks.
struct DensityRow {
  std::string name;  // layer name, "block N", or "total"
  int64_t block = -1;
  int64_t weights = 0;
  double soft = 0.0, hard = 0.0;
};
struct DensityReport {
  std::vector<DensityRow> layers, blocks;
  DensityRow total;
  std::string format() const;  // a fixed-width table, one row per line
};
DensityReport density_report(const MaskSet& masks, const Hardened& hard);

}  // namespace patch::sparsity
