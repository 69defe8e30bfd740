// Patterns, tiles, schedules and the LinearMask sampler against explicit loops
// over the published definitions (DESIGN.md pattern order, PATCH's mask formula).
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>

#include <cmath>
#include <memory>
#include <set>

#include "catch.h"
#include "core/error.h"
#include "sparsity/mask_set.h"
#include "sparsity/patterns.h"
#include "sparsity/prior.h"
#include "sparsity/schedule.h"

using namespace patch::sparsity;

namespace {

// DESIGN.md: 0={0,1}, 1={0,2}, 2={0,3}, 3={1,2}, 4={1,3}, 5={2,3}.
const int kRef[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

bool ref_keeps(int k, int j) { return kRef[k][0] == j || kRef[k][1] == j; }

std::shared_ptr<SamplerState> make_state(double tau24, double scale24, double tau_tile, double scale_tile) {
  auto s = std::make_shared<SamplerState>();
  s->tau_24 = tau24;
  s->scale_24 = scale24;
  s->tau_tile = tau_tile;
  s->scale_tile = scale_tile;
  s->seed = 1234;
  s->step = 3;
  return s;
}

LinearMaskOptions opts(MaskMode mode, at::ScalarType dtype = at::kDouble, double init_std = 1.0) {
  LinearMaskOptions o;
  o.mode = mode;
  o.dtype = dtype;
  o.init_std = init_std;
  o.seed = 7;
  return o;
}

// The relaxed mask without noise, computed element by element.
at::Tensor brute_soft_mask(const LinearMask& m) {
  const auto& g = m.grid();
  const auto& st = m.state();
  auto out = at::zeros({g.out(), g.in()}, at::kDouble);
  auto o = out.accessor<double, 2>();
  auto tl = m.tile_logits().detach().to(at::kDouble).contiguous();
  at::Tensor pl = m.pattern_logits().defined() ? m.pattern_logits().detach().to(at::kDouble).contiguous() : at::Tensor();
  for (int64_t r = 0; r < g.out(); ++r) {
    for (int64_t grp = 0; grp < g.groups(); ++grp) {
      double p[6];
      if (m.mode() == MaskMode::kTile) {
        const int fixed = m.fixed_pattern()[r][grp].item<int>();
        for (int k = 0; k < 6; ++k) p[k] = k == fixed;
      } else {
        double z = 0;
        for (int k = 0; k < 6; ++k) z += std::exp(st.scale_24 * pl[r][grp][k].item<double>() / st.tau_24);
        for (int k = 0; k < 6; ++k) p[k] = std::exp(st.scale_24 * pl[r][grp][k].item<double>() / st.tau_24) / z;
      }
      for (int j = 0; j < 4; ++j) {
        double m24 = 0;
        for (int k = 0; k < 6; ++k) m24 += ref_keeps(k, j) ? p[k] : 0.0;
        const int64_t col = 4 * grp + j;
        double t = 0;
        if (m.mode() != MaskMode::kMaskLLM)
          t = 1.0 / (1.0 + std::exp(-st.scale_tile * tl[r / g.tile_rows()][col / g.tile_cols()].item<double>() /
                                    st.tau_tile));
        o[r][col] = t + (1 - t) * m24;
      }
    }
  }
  return out;
}

}  // namespace

TEST_CASE("pattern table follows the documented order", "[patterns]") {
  auto t = pattern_table(at::kFloat);
  REQUIRE(t.sizes() == at::IntArrayRef({6, 4}));
  for (int k = 0; k < 6; ++k) {
    for (int j = 0; j < 4; ++j) CHECK(t[k][j].item<float>() == (ref_keeps(k, j) ? 1.0f : 0.0f));
    CHECK(pattern_index(static_cast<uint8_t>((1 << kRef[k][0]) | (1 << kRef[k][1]))) == k);
    for (int k2 = 0; k2 < 6; ++k2) {
      int shared = 0;
      for (int j = 0; j < 4; ++j) shared += ref_keeps(k, j) && ref_keeps(k2, j);
      CHECK(pattern_overlap(k, k2) == shared);
    }
  }
  for (uint8_t bits : {0, 1, 7, 15, 8}) CHECK(pattern_index(bits) == -1);
}

TEST_CASE("expand_patterns and patterns_of invert each other", "[patterns]") {
  auto idx = at::randint(0, 6, {5, 7}, at::kLong).to(at::kByte);
  auto mask = expand_patterns(idx, at::kFloat);
  REQUIRE(mask.sizes() == at::IntArrayRef({5, 28}));
  for (int64_t r = 0; r < 5; ++r)
    for (int64_t c = 0; c < 28; ++c)
      CHECK(mask[r][c].item<float>() == (ref_keeps(idx[r][c / 4].item<int>(), c % 4) ? 1.0f : 0.0f));
  CHECK(patterns_of(mask).equal(idx));
  mask[2][5] = 1.0f - mask[2][5].item<float>();  // a group with 1 or 3 kept
  CHECK_THROWS_AS(patterns_of(mask), patch::core::Error);
}

TEST_CASE("tile grid handles ragged edges", "[tiles]") {
  TileGrid g(10, 20, 4, 8);
  CHECK(g.rows() == 3);
  CHECK(g.cols() == 3);
  CHECK(g.groups() == 5);
  CHECK(g.max_tile_count() == 32);
  auto counts = g.counts();
  CHECK(counts.sum().item<int64_t>() == 200);
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < 3; ++c) {
      const int64_t h = std::min<int64_t>(4, 10 - 4 * r), w = std::min<int64_t>(8, 20 - 8 * c);
      CHECK(counts[r][c].item<int64_t>() == h * w);
      CHECK(g.tile_count(r, c) == h * w);
    }
  auto tiles = at::randn({3, 3}, at::kDouble);
  auto x = at::randn({10, 20}, at::kDouble);
  auto e = g.expand(tiles);
  auto s = g.reduce_sum(x);
  auto ref_s = at::zeros({3, 3}, at::kDouble);
  for (int64_t i = 0; i < 10; ++i)
    for (int64_t j = 0; j < 20; ++j) {
      CHECK(e[i][j].item<double>() == tiles[i / 4][j / 8].item<double>());
      ref_s[i / 4][j / 8] += x[i][j];
    }
  CHECK(at::allclose(s, ref_s));
  CHECK_THROWS_AS(TileGrid(10, 18, 4, 8), patch::core::Error);
  CHECK_THROWS_AS(TileGrid(10, 20, 4, 6), patch::core::Error);
}

TEST_CASE("build_mask: dense tiles all ones - sparse tiles the pattern", "[tiles]") {
  TileGrid g(6, 12, 4, 8);
  auto dense = at::tensor({1, 0, 0, 1}, at::kByte).view({2, 2});
  auto pat = at::randint(0, 6, {6, 3}, at::kLong).to(at::kByte);
  auto m = build_mask(g, dense, pat);
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t j = 0; j < 12; ++j) {
      const bool d = dense[i / 4][j / 8].item<int>() == 1;
      CHECK(m[i][j].item<float>() == ((d || ref_keeps(pat[i][j / 4].item<int>(), j % 4)) ? 1.0f : 0.0f));
    }
}

TEST_CASE("annealing schedules", "[schedule]") {
  CHECK(anneal(4, 0.05, 0.0, Anneal::kLinear) == Approx(4));
  CHECK(anneal(4, 0.05, 1.0, Anneal::kLinear) == Approx(0.05));
  CHECK(anneal(4, 0.05, 0.5, Anneal::kLinear) == Approx(2.025));
  CHECK(anneal(4, 0.05, 2.0, Anneal::kLinear) == Approx(0.05));
  CHECK(anneal(100, 500, 0.25, Anneal::kCosine) == Approx(500 + (100 - 500) * 0.5 * (1 + std::cos(M_PI / 4))));
  CHECK(anneal(100, 500, 1.0, Anneal::kCosine) == Approx(500));
  CHECK(anneal(100, 500, 0.5, Anneal::kExp) == Approx(std::sqrt(100.0 * 500.0)));
  CHECK(anneal(4, 0.05, 1.0, Anneal::kExp) == Approx(0.05));
  CHECK(parse_anneal("cosine") == Anneal::kCosine);
  CHECK_THROWS_AS(parse_anneal("step"), patch::core::ConfigError);
  // The defaults (mask.scale_24 2 -> 10, mask.scale_tile 0.5 -> 7, both tau 4 -> 0.05).
  SamplerSchedule sched;
  SamplerState st;
  sched.apply(st, 1.0);
  CHECK(st.tau_24 == Approx(0.05));
  CHECK(st.scale_24 == Approx(10));
  CHECK(st.tau_tile == Approx(0.05));
  CHECK(st.scale_tile == Approx(7));
  sched.apply(st, 0.0);
  CHECK(st.scale_tile == Approx(0.5));
  CHECK(st.scale_24 == Approx(2));
}

TEST_CASE("soft masks equal the explicit mixture of the six patterns", "[mask]") {
  TileGrid g(10, 20, 4, 8);  // ragged in both directions
  auto st = make_state(1.7, 2.0, 1.3, 1.5);
  for (auto mode : {MaskMode::kJoint, MaskMode::kMaskLLM, MaskMode::kTile}) {
    LinearMask m("model.layers.0.mlp.up_proj", g, st, opts(mode));
    if (mode == MaskMode::kTile) m.set_fixed_pattern(at::randint(0, 6, {10, 5}, at::kLong));
    auto soft = m.soft_mask(/*noise=*/false);
    CHECK(at::allclose(soft, brute_soft_mask(m), 1e-12, 1e-12));
  }
}

TEST_CASE("noisy soft masks are convex mixtures", "[mask]") {
  TileGrid g(10, 20, 4, 8);
  auto st = make_state(0.8, 3.0, 1.0, 2.0);
  LinearMask mllm("model.layers.0.mlp.up_proj", g, st, opts(MaskMode::kMaskLLM));
  auto m24 = mllm.soft_mask(/*noise=*/true).view({10, 5, 4});
  CHECK(at::allclose(m24.sum(-1), at::full({10, 5}, 2.0, at::kDouble)));
  CHECK(m24.min().item<double>() >= 0.0);
  CHECK(m24.max().item<double>() <= 1.0);

  // joint: each group sums to 2 + 2T, so T is recovered per group and must be
  // the tile's gate; the remainder (mask - T) / (1 - T) is again a 2:4 mixture.
  LinearMask joint("model.layers.0.mlp.up_proj", g, st, opts(MaskMode::kJoint));
  auto mask = joint.soft_mask(/*noise=*/true);
  auto gates = joint.tile_gates(/*noise=*/true);
  auto t = (mask.view({10, 5, 4}).sum(-1) - 2.0) / 2.0;
  for (int64_t r = 0; r < 10; ++r)
    for (int64_t grp = 0; grp < 5; ++grp) CHECK(t[r][grp].item<double>() == Approx(gates[r / 4][grp / 2].item<double>()));
  auto texp = g.expand(gates);
  auto rest = ((mask - texp) / (1.0 - texp)).view({10, 5, 4});
  CHECK(at::allclose(rest.sum(-1), at::full({10, 5}, 2.0, at::kDouble), 1e-9, 1e-9));
  CHECK(rest.min().item<double>() >= -1e-12);
  CHECK(rest.max().item<double>() <= 1.0 + 1e-12);
}

TEST_CASE("straight-through hard masks are exact 2:4 or dense tiles", "[mask]") {
  TileGrid g(10, 20, 4, 8);
  auto st = make_state(0.5, 1.0, 0.5, 1.0);
  LinearMask m("model.layers.1.self_attn.q_proj", g, st, opts(MaskMode::kJoint, at::kFloat));
  auto soft_gates = m.tile_gates(/*noise=*/true);
  st->hard_24 = st->hard_tile = true;
  auto gates = m.tile_gates(/*noise=*/true);
  CHECK(gates.equal(soft_gates.gt(0.5).to(at::kFloat)));
  auto mask = m.sampled_mask();
  CHECK(mask.eq(0).logical_or(mask.eq(1)).all().item<bool>());
  auto texp = g.expand(gates);
  CHECK(mask.masked_select(texp.eq(1)).eq(1).all().item<bool>());
  auto group_sum = mask.view({10, 5, 4}).sum(-1);
  auto sparse_groups = texp.view({10, 5, 4}).select(-1, 0).eq(0);
  CHECK(group_sum.masked_select(sparse_groups).eq(2).all().item<bool>());
  // The backward pass sees the soft gradient.
  auto r = at::randn({10, 20});
  (mask * r).sum().backward();
  CHECK(m.tile_logits().grad().abs().sum().item<float>() > 0);
  CHECK(m.pattern_logits().grad().abs().sum().item<float>() > 0);
  CHECK(at::isfinite(m.pattern_logits().grad()).all().item<bool>());
}

TEST_CASE("hard_mask: positive tile logits dense - argmax patterns elsewhere", "[mask]") {
  TileGrid g(9, 16, 4, 8);
  auto st = make_state(1, 1, 1, 1);
  LinearMask m("model.layers.2.mlp.gate_proj", g, st, opts(MaskMode::kJoint, at::kFloat));
  auto hm = m.hard_mask();
  auto pl = m.pattern_logits().detach();
  for (int64_t i = 0; i < 9; ++i)
    for (int64_t grp = 0; grp < 4; ++grp) {
      int best = 0;
      for (int k = 1; k < 6; ++k)
        if (pl[i][grp][k].item<float>() > pl[i][grp][best].item<float>()) best = k;
      const bool dense = m.tile_logits()[i / 4][grp / 2].item<float>() > 0;
      for (int j = 0; j < 4; ++j)
        CHECK(hm[i][4 * grp + j].item<float>() == ((dense || ref_keeps(best, j)) ? 1.0f : 0.0f));
    }
  LinearMask mllm("model.layers.2.mlp.gate_proj", g, st, opts(MaskMode::kMaskLLM, at::kFloat));
  CHECK(mllm.hard_tiles().sum().item<int64_t>() == 0);
  CHECK(mllm.hard_mask().sum().item<float>() == Approx(9 * 16 / 2));
}

TEST_CASE("finite-difference gradients of tile and 2:4 logits (fp64)", "[mask][grad]") {
  TileGrid g(6, 12, 4, 8);  // ragged: tiles 4/2 rows, 8/4 cols
  auto st = make_state(1.5, 2.0, 1.2, 1.7);
  for (auto mode : {MaskMode::kJoint, MaskMode::kTile, MaskMode::kMaskLLM}) {
    LinearMask m("model.layers.0.self_attn.o_proj", g, st, opts(mode, at::kDouble, 0.5));
    auto w = at::randn({6, 12}, at::kDouble);
    auto r = at::randn({6, 12}, at::kDouble);
    auto loss = [&] { return (m.effective_weight(w) * r).sum() + 0.3 * m.weight_term(w) + 2.0 * m.soft_density(); };
    loss().backward();
    for (const auto& p : m.parameters()) {
      auto grad = p.grad().clone();
      auto flat = p.view(-1);
      const int64_t stride = flat.numel() > 16 ? 3 : 1;  // every tile logit, a third of the 2:4 logits
      for (int64_t i = 0; i < flat.numel(); i += stride) {
        const double h = 1e-6;
        double up, down;
        {
          at::NoGradGuard no_grad;
          flat[i] += h;
          up = loss().item<double>();
          flat[i] -= 2 * h;
          down = loss().item<double>();
          flat[i] += h;
        }
        const double fd = (up - down) / (2 * h);
        CHECK(grad.view(-1)[i].item<double>() == Approx(fd).margin(1e-7).epsilon(1e-6));
      }
    }
  }
}

TEST_CASE("noise is a function of (seed - step - layer)", "[mask][noise]") {
  TileGrid g(8, 16, 4, 8);
  auto st = make_state(1, 1, 1, 1);
  LinearMask a("model.layers.0.mlp.up_proj", g, st, opts(MaskMode::kJoint, at::kFloat));
  LinearMask a2("model.layers.0.mlp.up_proj", g, st, opts(MaskMode::kJoint, at::kFloat));
  LinearMask b("model.layers.1.mlp.up_proj", g, st, opts(MaskMode::kJoint, at::kFloat));
  {
    at::NoGradGuard no_grad;  // same logits everywhere: only the noise differs
    a2.tile_logits().copy_(a.tile_logits());
    a2.pattern_logits().copy_(a.pattern_logits());
    b.tile_logits().copy_(a.tile_logits());
    b.pattern_logits().copy_(a.pattern_logits());
  }
  auto w = at::randn({8, 16});
  at::Tensor first;
  {
    at::NoGradGuard no_grad;  // the checkpointed first pass runs without grad
    first = a.effective_weight(w);
  }
  auto recompute = a.effective_weight(w);
  CHECK(recompute.equal(first));
  CHECK(a2.sampled_mask().equal(a.sampled_mask()));
  CHECK(a.soft_density().item<float>() == a.soft_density().item<float>());
  CHECK(!b.sampled_mask().equal(a.sampled_mask()));
  CHECK(a.sampled_mask().equal(a.soft_mask(/*noise=*/true)));  // hard flags off
  CHECK(!a.soft_mask(/*noise=*/false).equal(a.sampled_mask()));
  auto at_step3 = a.sampled_mask();
  st->step = 4;
  CHECK(!a.sampled_mask().equal(at_step3));
  st->step = 3;
  CHECK(a.sampled_mask().equal(at_step3));
  st->seed = 99;
  CHECK(!a.sampled_mask().equal(at_step3));
}

TEST_CASE("soft density follows the sampled tile gates", "[mask]") {
  TileGrid g(10, 20, 4, 8);
  auto st = make_state(1, 1, 1, 1);
  LinearMask m("model.layers.0.mlp.up_proj", g, st, opts(MaskMode::kJoint));
  auto gates = m.tile_gates(/*noise=*/true);
  double dense = 0;
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < 3; ++c) dense += g.tile_count(r, c) * gates[r][c].item<double>();
  CHECK(m.soft_density().item<double>() == Approx(0.5 + 0.5 * dense / 200.0));
  // ...and it is the mean of the sampled mask, whose 2:4 part keeps exactly half.
  CHECK(m.soft_density().item<double>() == Approx(m.sampled_mask().mean().item<double>()));
  double expected = 0;
  for (int64_t r = 0; r < 3; ++r)
    for (int64_t c = 0; c < 3; ++c)
      expected += g.tile_count(r, c) / (1.0 + std::exp(-st->scale_tile * m.tile_logits()[r][c].item<double>()));
  CHECK(m.expected_density() == Approx(0.5 + 0.5 * expected / 200.0));
  LinearMask mllm("model.layers.0.mlp.up_proj", g, st, opts(MaskMode::kMaskLLM));
  CHECK(mllm.soft_density().item<double>() == 0.5);
}

TEST_CASE("glob selection and block indices", "[maskset]") {
  CHECK(glob_match("*", "model.layers.0.mlp.up_proj"));
  CHECK(glob_match("model.layers.*.mlp.*", "model.layers.3.mlp.up_proj"));
  CHECK(!glob_match("model.layers.*.mlp.*", "model.layers.3.self_attn.q_proj"));
  CHECK(glob_match("a*b*c", "axxbyyc"));
  CHECK(!glob_match("a*b*c", "axxbyy"));
  CHECK(glob_match("model.layers.?.mlp.up_proj", "model.layers.7.mlp.up_proj"));
  CHECK(!glob_match("model.layers.?.mlp.up_proj", "model.layers.17.mlp.up_proj"));
  CHECK(glob_match("lm_head", "lm_head"));
  CHECK(block_index("model.layers.7.mlp.up_proj") == 7);
  CHECK(block_index("model.layers.12") == 12);
  CHECK(block_index("lm_head") == -1);
  CHECK(block_index("model.xlayers.3.q") == -1);
}

TEST_CASE("MaskSet selects - attaches and aggregates", "[maskset]") {
  std::vector<std::pair<std::string, at::Tensor>> weights = {
      {"model.layers.0.self_attn.q_proj", at::randn({8, 16})},
      {"model.layers.0.mlp.down_proj", at::randn({12, 20})},
      {"model.layers.0.mlp.up_proj", at::randn({10, 12})},
      {"model.layers.1.self_attn.q_proj", at::randn({8, 16})},
      {"lm_head", at::randn({16, 8})}};
  MaskSetOptions o;
  o.tile_rows = 4;
  o.tile_cols = 8;
  o.include = {"model.layers.*"};
  o.exclude = {"*.down_proj"};
  MaskSet set(o, make_state(1, 1, 1, 1));
  std::vector<std::string> attached;
  set.add_layers(weights, [&](const std::string& n, const std::shared_ptr<LinearMask>& m) {
    CHECK(m->name() == n);
    attached.push_back(n);
  });
  REQUIRE(attached == std::vector<std::string>{"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                                               "model.layers.1.self_attn.q_proj"});
  CHECK(set.total_weights() == 128 + 120 + 128);
  CHECK(set.blocks() == std::vector<int64_t>{0, 1});
  CHECK(set.find("lm_head") == nullptr);
  CHECK(set.parameters().size() == 6);
  double num = 0;
  for (const auto& m : set.masks()) num += m->soft_density().item<float>() * m->grid().numel();
  CHECK(set.soft_density().item<float>() == Approx(num / 376.0));
  auto blocks = set.block_soft_density();
  CHECK(blocks.at(1).item<float>() == Approx(set.masks()[2]->soft_density().item<float>()));
  double wt = 0;
  for (size_t i = 0; i < set.size(); ++i) wt += (weights[i == 0 ? 0 : i + 1].second * set.masks()[i]->sampled_mask()).square().sum().item<float>();
  CHECK(set.weight_term().item<float>() == Approx(wt).epsilon(1e-5));
  CHECK_THROWS_AS(set.add_layers({{"model.layers.0.mlp.up_proj", at::randn({4, 8})}}), patch::core::Error);

  // Checkpoint round trip through named_state/load_state.
  std::map<std::string, at::Tensor> saved;
  for (auto& [k, v] : set.named_state()) saved[k] = v.detach().clone() + 1.0;
  set.load_state(saved, "ckpt");
  CHECK(set.masks()[0]->tile_logits().detach().equal(saved.at("model.layers.0.self_attn.q_proj.tile_logits")));
  saved.erase("model.layers.0.mlp.up_proj.pattern_logits");
  CHECK_THROWS_AS(set.load_state(saved, "ckpt"), patch::core::Error);
}

TEST_CASE("the set's density terms have the per-layer values and gradients", "[maskset][grad]") {
  // Oracle: LinearMask::soft_density, one autograd graph per layer.
  for (bool hard : {false, true}) {
    auto st = make_state(1.0, 1.0, 0.7, 1.3);
    st->hard_tile = hard;
    MaskSetOptions o;
    o.mask = opts(MaskMode::kJoint);
    o.tile_rows = 4;
    o.tile_cols = 8;
    MaskSet set(o, st);
    set.add_layers({{"model.layers.0.self_attn.q_proj", at::randn({8, 16})},
                    {"model.layers.0.mlp.up_proj", at::randn({10, 12})},
                    {"model.layers.1.self_attn.q_proj", at::randn({9, 24})},
                    {"model.layers.2.mlp.down_proj", at::randn({4, 8})}});
    const std::vector<double> block_weight = {1.5, -0.5, 2.0};
    auto grads = [&](bool per_layer) {
      for (auto& p : set.parameters()) p.mutable_grad() = at::Tensor();
      at::Tensor total, loss;
      std::map<int64_t, at::Tensor> blocks;
      if (per_layer) {
        std::map<int64_t, int64_t> count;
        for (const auto& m : set.masks()) {
          auto d = m->soft_density() * static_cast<double>(m->grid().numel());
          total = total.defined() ? total + d : d;
          blocks[m->block()] = blocks.count(m->block()) ? blocks[m->block()] + d : d;
          count[m->block()] += m->grid().numel();
        }
        total = total / static_cast<double>(set.total_weights());
        for (auto& [b, d] : blocks) d = d / static_cast<double>(count[b]);
      } else {
        total = set.soft_density();
        blocks = set.block_soft_density();
      }
      loss = 3.0 * total;
      for (auto& [b, d] : blocks) loss = loss + block_weight[static_cast<size_t>(b)] * d;
      loss.backward();
      std::vector<at::Tensor> out{total.detach()};
      for (auto& [b, d] : blocks) out.push_back(d.detach());
      for (const auto& m : set.masks()) out.push_back(m->tile_logits().grad().clone());
      return out;
    };
    const auto want = grads(/*per_layer=*/true), got = grads(/*per_layer=*/false);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      INFO("hard " << hard << ", tensor " << i);
      CHECK(at::allclose(got[i], want[i], 1e-12, 1e-12));
    }
    CHECK(want.back().abs().sum().item<double>() > 0.0);
  }
}

TEST_CASE("FixedMask multiplies by its mask", "[mask]") {
  auto mask = at::randint(0, 2, {4, 8}).to(at::kFloat);
  FixedMask fm(mask);
  auto w = at::randn({4, 8}, at::kDouble);
  CHECK(fm.effective_weight(w).equal(w * mask.to(at::kDouble)));
}

TEST_CASE("CUDA sampling is deterministic per (seed - step - layer)", "[mask][cuda]") {
  if (!at::hasCUDA()) {
    SUCCEED("no CUDA device");
    return;
  }
  TileGrid g(300, 520, 128, 128);
  auto st = make_state(1.0, 1.0, 1.0, 1.0);
  auto o = opts(MaskMode::kJoint, at::kFloat);
  o.device = at::Device(at::kCUDA);
  LinearMask m("model.layers.0.mlp.up_proj", g, st, o);
  LinearMask m2("model.layers.0.mlp.up_proj", g, st, o);
  CHECK(m.tile_logits().is_cuda());
  CHECK(m2.pattern_logits().equal(m.pattern_logits()));
  auto w = at::randn({300, 520}, at::TensorOptions().device(at::kCUDA));
  at::Tensor first;
  {
    at::NoGradGuard no_grad;
    first = m.effective_weight(w);
  }
  CHECK(m.effective_weight(w).equal(first));
  CHECK(m2.sampled_mask().equal(m.sampled_mask()));
  auto at_step3 = m.sampled_mask();
  st->step = 4;
  CHECK(!m.sampled_mask().equal(at_step3));
  st->step = 3;
  auto mask = m.soft_mask(/*noise=*/true);
  auto t = g.expand(m.tile_gates(/*noise=*/true));
  CHECK(at::allclose(mask.view({300, 130, 4}).sum(-1), (2.0 + 2.0 * t.view({300, 130, 4}).select(-1, 0)), 1e-4, 1e-4));
  st->hard_24 = st->hard_tile = true;
  auto hard = m.sampled_mask();
  auto texp = g.expand(m.tile_gates(/*noise=*/true));
  auto sparse = texp.view({300, 130, 4}).select(-1, 0).eq(0);
  CHECK(hard.view({300, 130, 4}).sum(-1).masked_select(sparse).eq(2).all().item<bool>());
  (m.effective_weight(w) * w).sum().backward();
  CHECK(at::isfinite(m.pattern_logits().grad()).all().item<bool>());
  st->hard_24 = st->hard_tile = false;

  // Priors and hardening with everything on the GPU.
  MaskSetOptions so;
  so.mask = o;
  MaskSet set(so, st);
  set.add_layers({{"model.layers.0.mlp.up_proj", w}, {"model.layers.1.mlp.up_proj", w * 2.0}});
  auto priors = magnitude_priors(set, 0.4);
  CHECK(priors.at("model.layers.0.mlp.up_proj").pattern.equal(best_patterns(w.abs())));
  apply_prior(set, priors, 0.4, BudgetKind::kGlobal, {});
  auto h = harden(set, 0.4, BudgetKind::kGlobal);
  CHECK(std::abs(h.achieved_sparsity() - 0.4) <= 128.0 * 128.0 / (2.0 * h.total_weights()));
}
