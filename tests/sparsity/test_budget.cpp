// Hardening under the exact budget, priors and the density report, checked
// with explicit loops (brute force) over tiles, groups and patterns.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "catch.h"
#include "core/error.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "sparsity/prior.h"

using namespace patch::sparsity;

namespace {

const int kRef[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

int64_t ref_count(const TileGrid& g, int64_t r, int64_t c) {
  return std::min(g.tile_rows(), g.out() - r * g.tile_rows()) * std::min(g.tile_cols(), g.in() - c * g.tile_cols());
}

// Checks one pool of tiles: the budget bound and that dense tiles outrank sparse ones.
void check_pool(const std::vector<TileScores>& layers, const std::vector<at::Tensor>& dense,
                const std::vector<size_t>& members, double target) {
  int64_t total = 0, dense_w = 0, max_count = 0;
  double min_dense = INFINITY, max_sparse = -INFINITY;
  for (size_t i : members) {
    const auto& g = layers[i].grid;
    for (int64_t r = 0; r < g.rows(); ++r)
      for (int64_t c = 0; c < g.cols(); ++c) {
        const int64_t n = ref_count(g, r, c);
        const double s = layers[i].score[r][c].item<double>();
        total += n;
        max_count = std::max(max_count, n);
        if (dense[i][r][c].item<int>() == 1) {
          dense_w += n;
          min_dense = std::min(min_dense, s);
        } else {
          REQUIRE(dense[i][r][c].item<int>() == 0);
          max_sparse = std::max(max_sparse, s);
        }
      }
  }
  if (total == 0) return;
  const double achieved = 0.5 * static_cast<double>(total - dense_w) / static_cast<double>(total);
  CHECK(std::abs(achieved - target) <= static_cast<double>(max_count) / (2.0 * total) + 1e-12);
  CHECK(std::abs(dense_w - (1 - 2 * target) * total) <= max_count / 2.0 + 1e-9);
  CHECK(min_dense >= max_sparse);
}

std::vector<std::pair<std::string, at::Tensor>> toy_weights() {
  return {{"model.layers.0.self_attn.q_proj", at::randn({12, 24})},
          {"model.layers.0.mlp.up_proj", at::randn({10, 20})},
          {"model.layers.1.self_attn.q_proj", at::randn({12, 24})},
          {"model.layers.1.mlp.down_proj", at::randn({20, 12})}};
}

MaskSet toy_set(MaskMode mode, double init_std = 1.0) {
  MaskSetOptions o;
  o.mask.mode = mode;
  o.mask.init_std = init_std;
  o.mask.seed = 11;
  o.tile_rows = 4;
  o.tile_cols = 8;
  auto st = std::make_shared<SamplerState>();
  MaskSet set(o, st);
  set.add_layers(toy_weights());
  return set;
}

}  // namespace

TEST_CASE("hardening hits the budget within one tile on random ragged layers", "[budget]") {
  std::mt19937 rng(42);
  auto uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  for (int trial = 0; trial < 60; ++trial) {
    std::vector<TileScores> layers;
    const int n = uni(1, 6);
    for (int i = 0; i < n; ++i) {
      TileGrid g(uni(1, 40), 4 * uni(1, 12), uni(1, 16), 4 * uni(1, 4));
      auto score = at::randn({g.rows(), g.cols()}, at::kDouble);
      if (trial % 3 == 0) score = at::round(score);  // plenty of ties
      layers.push_back({g, score, uni(0, 2)});
    }
    const double target = trial % 10 == 0 ? 0.0 : trial % 10 == 1 ? 0.5 : std::uniform_real_distribution<double>(0, 0.5)(rng);
    std::vector<size_t> all(layers.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    check_pool(layers, select_dense_tiles(layers, target, BudgetKind::kGlobal), all, target);
    auto per_block = select_dense_tiles(layers, target, BudgetKind::kPerBlock);
    for (int b = 0; b <= 2; ++b) {
      std::vector<size_t> members;
      for (size_t i = 0; i < layers.size(); ++i)
        if (layers[i].block == b) members.push_back(i);
      check_pool(layers, per_block, members, target);
    }
  }
  CHECK_THROWS_AS(select_dense_tiles({}, 0.6, BudgetKind::kGlobal), patch::core::ConfigError);
}

TEST_CASE("harden: exact budget from the logits - 2:4 by argmax or fixed", "[budget]") {
  auto joint = toy_set(MaskMode::kJoint);
  auto h = harden(joint, 0.3, BudgetKind::kGlobal);
  REQUIRE(h.layers.size() == 4);
  CHECK(h.total_weights() == 288 + 200 + 288 + 240);
  int64_t max_count = 32;
  CHECK(std::abs(h.achieved_sparsity() - 0.3) <= max_count / (2.0 * h.total_weights()));
  for (size_t i = 0; i < 4; ++i) {
    const auto& m = joint.masks()[i];
    CHECK(h.layers[i].pattern.equal(m->pattern_logits().detach().argmax(-1).to(at::kByte)));
    // the rebuilt mask's zeros match the reported count
    CHECK(h.layers[i].mask().eq(0).sum().item<int64_t>() == h.layers[i].zero_weights());
  }
  auto per_block = harden(joint, 0.2, BudgetKind::kPerBlock);
  for (int64_t b : {0, 1}) {
    int64_t total = 0, zeros = 0;
    for (const auto& l : per_block.layers)
      if (l.block == b) total += l.grid.numel(), zeros += l.zero_weights();
    CHECK(std::abs(static_cast<double>(zeros) / total - 0.2) <= max_count / (2.0 * total));
  }

  auto tile = toy_set(MaskMode::kTile);
  auto fixed = at::randint(0, 6, {12, 6}, at::kLong);
  tile.masks()[0]->set_fixed_pattern(fixed);
  CHECK(harden(tile, 0.3, BudgetKind::kGlobal).layers[0].pattern.equal(fixed.to(at::kByte)));

  auto mllm = toy_set(MaskMode::kMaskLLM);
  auto hm = harden(mllm, 0.3, BudgetKind::kGlobal);
  CHECK(hm.achieved_sparsity() == 0.5);
}

TEST_CASE("magnitude prior: best pattern by brute force - survivors per tile", "[prior]") {
  TileGrid g(7, 24, 4, 8);
  auto w = at::randn({7, 24});
  auto prior = magnitude_prior(w, g, 0.4);
  for (int64_t r = 0; r < 7; ++r)
    for (int64_t grp = 0; grp < 6; ++grp) {
      int best = -1;
      float best_sum = -1;
      for (int k = 0; k < 6; ++k) {
        const float s = std::abs(w[r][4 * grp + kRef[k][0]].item<float>()) +
                        std::abs(w[r][4 * grp + kRef[k][1]].item<float>());
        if (s > best_sum) best = k, best_sum = s;
      }
      CHECK(prior.pattern[r][grp].item<int>() == best);
    }
  // Unstructured prune of round(0.4 * 168) = 67 smallest |w| over the layer.
  std::vector<std::pair<float, int64_t>> mags;
  for (int64_t i = 0; i < 168; ++i) mags.push_back({std::abs(w[i / 24][i % 24].item<float>()), i});
  std::sort(mags.begin(), mags.end());
  std::vector<int> keep(168, 1);
  for (int i = 0; i < 67; ++i) keep[mags[i].second] = 0;
  for (int64_t r = 0; r < g.rows(); ++r)
    for (int64_t c = 0; c < g.cols(); ++c) {
      int kept = 0;
      for (int64_t i = 0; i < 7; ++i)
        for (int64_t j = 0; j < 24; ++j)
          if (i / 4 == r && j / 8 == c) kept += keep[i * 24 + j];
      CHECK(prior.tile_score[r][c].item<float>() == Approx(static_cast<double>(kept) / ref_count(g, r, c)));
    }
}

TEST_CASE("apply_prior shifts the logits as the formula says", "[prior]") {
  const double sigma = 0.7, s24 = 3.0, s_tile = 2.0, target = 0.3;
  auto set = toy_set(MaskMode::kJoint, sigma);
  std::vector<at::Tensor> pat_before, tile_before;
  for (const auto& m : set.masks()) {
    pat_before.push_back(m->pattern_logits().detach().clone());
    tile_before.push_back(m->tile_logits().detach().clone());
  }
  auto priors = magnitude_priors(set, target);
  apply_prior(set, priors, target, BudgetKind::kGlobal, {sigma, s24, s_tile});
  std::vector<TileScores> scores;
  std::vector<at::Tensor> dense;
  for (size_t i = 0; i < set.size(); ++i) {
    const auto& m = set.masks()[i];
    const auto& p = priors.at(m->name());
    auto dp = (m->pattern_logits().detach() - pat_before[i]).to(at::kDouble);
    for (int64_t r = 0; r < m->grid().out(); ++r)
      for (int64_t grp = 0; grp < m->grid().groups(); ++grp) {
        const int q = p.pattern[r][grp].item<int>();
        for (int k = 0; k < 6; ++k) {
          int shared = 0;
          for (int a : kRef[k])
            for (int b : kRef[q]) shared += a == b;
          CHECK(dp[r][grp][k].item<double>() == Approx((shared - 1) * sigma * s24).margin(1e-5));
        }
      }
    auto dt = (m->tile_logits().detach() - tile_before[i]).to(at::kDouble);
    CHECK(at::allclose(dt.abs(), at::full_like(dt, sigma * s_tile), 1e-5, 1e-5));
    scores.push_back({m->grid(), p.tile_score, m->block()});
    dense.push_back(dt.gt(0).to(at::kByte));
  }
  std::vector<size_t> all = {0, 1, 2, 3};
  check_pool(scores, dense, all, target);

  auto tile = toy_set(MaskMode::kTile, sigma);
  auto tile_priors = magnitude_priors(tile, target);
  apply_prior(tile, tile_priors, target, BudgetKind::kGlobal, {sigma, s24, s_tile});
  for (const auto& m : tile.masks()) CHECK(m->fixed_pattern().equal(tile_priors.at(m->name()).pattern));
  tile_priors.erase(tile.masks()[0]->name());
  CHECK_THROWS_AS(apply_prior(tile, tile_priors, target, BudgetKind::kGlobal, {}), patch::core::Error);
}

TEST_CASE("density report: soft and hard per layer - block and total", "[budget]") {
  auto set = toy_set(MaskMode::kJoint);
  auto h = harden(set, 0.25, BudgetKind::kGlobal);
  auto rep = density_report(set, h);
  REQUIRE(rep.layers.size() == 4);
  REQUIRE(rep.blocks.size() == 2);
  CHECK(rep.total.hard == Approx(1.0 - h.achieved_sparsity()));
  double soft = 0;
  for (size_t i = 0; i < 4; ++i) {
    CHECK(rep.layers[i].soft == Approx(set.masks()[i]->expected_density()));
    CHECK(rep.layers[i].hard == Approx(h.layers[i].mask().mean().item<double>()));
    soft += rep.layers[i].soft * rep.layers[i].weights;
  }
  CHECK(rep.total.soft == Approx(soft / h.total_weights()));
  CHECK(rep.blocks[1].weights == 288 + 240);
  CHECK(rep.format().find("block 1") != std::string::npos);
}
