#include "sparsity/budget.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "core/error.h"
#include "sparsity/mask_set.h"

namespace patch::sparsity {

BudgetKind parse_budget(const std::string& name) {
  if (name == "global") return BudgetKind::kGlobal;
  if (name == "per_block") return BudgetKind::kPerBlock;
  throw core::ConfigError(core::str("unknown budget '", name, "' (expected global or per_block)"));
}


std::vector<at::Tensor> select_dense_tiles(const std::vector<TileScores>& layers, double target_sparsity,
                                           BudgetKind kind) {
  if (!(target_sparsity >= 0.0 && target_sparsity <= 0.5))
    throw core::ConfigError(core::str("target sparsity ", target_sparsity, " is outside [0, 0.5]"));
  struct Entry {
    double score;
    size_t layer;
    int64_t tile, count;
  };
  std::map<int64_t, std::vector<Entry>> pools;  // entries in layer, then row-major tile order
  std::vector<at::Tensor> dense;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    const auto& g = l.grid;
    core::check(l.score.dim() == 2 && l.score.size(0) == g.rows() && l.score.size(1) == g.cols(),
                "select_dense_tiles", core::str("layer ", i, ": expected [", g.rows(), ", ", g.cols(), "] scores"));
    auto s = l.score.detach().to(at::kCPU, at::kDouble).contiguous();
    core::check(!s.isnan().any().item<bool>(), "select_dense_tiles", core::str("layer ", i, ": NaN tile score"));
    const double* sp = s.data_ptr<double>();
    auto& pool = pools[kind == BudgetKind::kPerBlock ? l.block : 0];
    for (int64_t r = 0; r < g.rows(); ++r)
      for (int64_t c = 0; c < g.cols(); ++c)
        pool.push_back({sp[r * g.cols() + c], i, r * g.cols() + c, g.tile_count(r, c)});
    dense.push_back(at::zeros({g.rows(), g.cols()}, at::kByte));
  }
  std::vector<uint8_t*> flags;
  for (auto& d : dense) flags.push_back(d.data_ptr<uint8_t>());
  for (auto& [key, pool] : pools) {
    int64_t total = 0;
    for (const auto& e : pool) total += e.count;
    const double budget = (1.0 - 2.0 * target_sparsity) * static_cast<double>(total);
    std::stable_sort(pool.begin(), pool.end(), [](const Entry& a, const Entry& b) { return a.score > b.score; });
    double taken = 0.0;
    for (const auto& e : pool) {
      const bool fits = taken + static_cast<double>(e.count) <= budget;
      // The first tile that does not fit ends the prefix; it is taken when
      // overshooting by it is closer to the budget than stopping short.
      if (!fits && taken + static_cast<double>(e.count) - budget >= budget - taken) break;
      flags[e.layer][e.tile] = 1;
      taken += static_cast<double>(e.count);
      if (!fits) break;
    }
  }
  return dense;
}

int64_t HardenedLayer::dense_weights() const {
  return (grid.counts() * tile_dense.to(at::kCPU, at::kLong)).sum().item<int64_t>();
}

int64_t HardenedLayer::zero_weights() const { return (grid.numel() - dense_weights()) / 2; }

int64_t Hardened::total_weights() const {
  int64_t n = 0;
  for (const auto& l : layers) n += l.grid.numel();
  return n;
}

int64_t Hardened::zero_weights() const {
  int64_t n = 0;
  for (const auto& l : layers) n += l.zero_weights();
  return n;
}

double Hardened::achieved_sparsity() const {
  const int64_t total = total_weights();
  return total ? static_cast<double>(zero_weights()) / static_cast<double>(total) : 0.0;
}

Hardened harden(const MaskSet& masks, double target_sparsity, BudgetKind kind) {
  Hardened h;
  h.mode = masks.options().mask.mode;
  h.budget = kind;
  h.target_sparsity = target_sparsity;
  std::vector<at::Tensor> dense;
  if (h.mode == MaskMode::kMaskLLM) {
    for (const auto& m : masks.masks()) dense.push_back(m->hard_tiles().cpu());
  } else {
    std::vector<TileScores> scores;
    for (const auto& m : masks.masks()) scores.push_back({m->grid(), m->tile_logits(), m->block()});
    dense = select_dense_tiles(scores, target_sparsity, kind);
  }
  for (size_t i = 0; i < masks.size(); ++i) {
    const auto& m = masks.masks()[i];
    h.layers.push_back({m->name(), m->grid(), m->block(), dense[i], m->hard_pattern().cpu()});
  }
  return h;
}

DensityReport density_report(const MaskSet& masks, const Hardened& hard) {
  core::check(masks.size() == hard.layers.size(), "density_report", "hardened masks do not match the mask set");
  DensityReport rep;
  std::map<int64_t, DensityRow> blocks;
  rep.total.name = "total";
  auto accumulate = [](DensityRow& acc, const DensityRow& row) {
    acc.soft += row.soft * static_cast<double>(row.weights);
    acc.hard += row.hard * static_cast<double>(row.weights);
    acc.weights += row.weights;
  };
  for (size_t i = 0; i < masks.size(); ++i) {
    const auto& m = masks.masks()[i];
    const auto& l = hard.layers[i];
    core::check(m->name() == l.name, "density_report", core::str("layer ", i, " is '", l.name, "', expected '",
                                                                 m->name(), "'"));
    DensityRow row{m->name(), m->block(), m->grid().numel(), m->expected_density(),
                   1.0 - static_cast<double>(l.zero_weights()) / static_cast<double>(m->grid().numel())};
    rep.layers.push_back(row);
    auto& b = blocks[m->block()];
    b.block = m->block();
    b.name = m->block() < 0 ? "outside blocks" : core::str("block ", m->block());
    accumulate(b, row);
    accumulate(rep.total, row);
  }
  auto finish = [](DensityRow& r) {
    if (r.weights == 0) return;
    r.soft /= static_cast<double>(r.weights);
    r.hard /= static_cast<double>(r.weights);
  };
  for (auto& [k, b] : blocks) {
    finish(b);
    rep.blocks.push_back(b);
  }
  finish(rep.total);
  return rep;
}

std::string DensityReport::format() const {
  std::string out;
  char line[256];
  auto row = [&](const DensityRow& r) {
    std::snprintf(line, sizeof line, "%-52s %14lld %8.4f %8.4f\n", r.name.c_str(), static_cast<long long>(r.weights),
                  r.soft, r.hard);
    out += line;
  };
  std::snprintf(line, sizeof line, "%-52s %14s %8s %8s\n", "layer", "weights", "soft", "hard");
  out += line;
  for (const auto& r : layers) row(r);
  for (const auto& r : blocks) row(r);
  row(total);
  return out;
}

std::pair<at::Tensor, at::Tensor> Budget::penalty(const MaskSet& masks) const {
  at::Tensor density = masks.soft_density();
  at::Tensor reg;
  if (kind == BudgetKind::kPerBlock) {
    reg = at::zeros({}, density.options());
    for (auto& [b, d] : masks.block_soft_density()) reg = reg + (d - target_density()).abs();
  } else {
    reg = (density - target_density()).abs();
  }
  return {density, reg};
}

}  // namespace patch::sparsity
