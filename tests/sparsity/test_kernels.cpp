// The fused mask kernels (mask_kernels.h) against independent oracles: ATen's
// Philox engine for the generator, the distributions for the noise, and the
// unfused LinearMask path (ATen autograd on a materialised mask, with the same
// regenerated noise) for the fused forward and backward. The CUDA cases check
// the kernels against the CPU reference.
#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <memory>

#include "catch.h"
#include "sparsity/linear_mask.h"
#include "sparsity/mask_group.h"
#include "sparsity/mask_kernels.h"
#include "sparsity/mask_set.h"
#include "sparsity/philox.h"

using namespace patch::sparsity;

namespace {

std::shared_ptr<SamplerState> state(bool hard) {
  auto s = std::make_shared<SamplerState>();
  s->tau_24 = 0.7;
  s->scale_24 = 2.5;
  s->tau_tile = 0.9;
  s->scale_tile = 1.7;
  s->hard_24 = s->hard_tile = hard;
  s->seed = 42;
  s->step = 5;
  return s;
}

LinearMaskOptions options(MaskMode mode, bool fused, at::ScalarType dtype,
                          at::Device device = at::kCPU) {
  LinearMaskOptions o;
  o.mode = mode;
  o.fused = fused;
  o.dtype = dtype;
  o.device = device;
  o.seed = 11;
  o.init_std = 0.8;
  return o;
}

// Same logits in both masks.
void copy_logits(const LinearMask& from, LinearMask& to) {
  at::NoGradGuard no_grad;
  to.tile_logits().copy_(from.tile_logits());
  if (from.pattern_logits().defined()) to.pattern_logits().copy_(from.pattern_logits());
  if (from.fixed_pattern().defined()) to.set_fixed_pattern(from.fixed_pattern());
}

void set_random_pattern(LinearMask& m) {
  if (m.mode() == MaskMode::kTile)
    m.set_fixed_pattern(at::randint(0, 6, {m.grid().out(), m.grid().groups()}, at::kLong));
}

// Weights [out, in] in tiles of tr x tc: edge tiles cut short, 96-column tiles
// (24 groups: a backward warp with idle lanes) and a grid smaller than a tile.
struct Shape {
  int64_t out, in, tr, tc;
};
const Shape kRagged[] = {{300, 520, 128, 128}, {77, 1000, 32, 96}, {5, 12, 4, 8}};

// True, with the test passed, where there is no CUDA device to run it on.
bool no_cuda() {
  if (at::hasCUDA()) return false;
  SUCCEED("no CUDA device");
  return true;
}

// loss = sum(W*M * r) + 0.3 ||W*M||^2 through one mask; returns W*M.
at::Tensor run_loss(LinearMask& m, const at::Tensor& w, const at::Tensor& r, bool weight_term) {
  auto wm = m.effective_weight(w);
  auto loss = (wm.to(r.scalar_type()) * r).sum();
  if (weight_term) loss = loss + 0.3 * m.weight_term(w).to(r.scalar_type());
  loss.backward();
  return wm.detach();
}

}  // namespace

TEST_CASE("philox matches ATen's philox engine", "[kernels][noise]") {
  for (uint64_t key : {0ULL, 1ULL, 0x243f6a8885a308d3ULL, ~0ULL})
    for (uint64_t sub : {0ULL, 7ULL, 123456789012ULL})
      for (uint32_t block : {0u, 1u, 5u}) {
        at::philox_engine ref(key, sub, block);
        auto got = philox4x32(key, sub, block);
        for (int i = 0; i < 4; ++i) CHECK(got.v[i] == ref());
      }
}

TEST_CASE("regenerated noise has the Gumbel and logistic distributions", "[kernels][noise]") {
  auto g = gumbel_noise(400, 250, 99, at::kDouble);  // 600k samples
  auto mean = g.mean().item<double>(), var = g.var().item<double>();
  CHECK(mean == Approx(0.5772156649).margin(0.01));
  CHECK(var == Approx(M_PI * M_PI / 6).epsilon(0.02));
  // The six pattern draws of a group are independent.
  auto flat = g.view({-1, 6});
  auto corr = at::corrcoef(flat.t());
  CHECK((corr - at::eye(6, at::kDouble)).abs().max().item<double>() < 0.01);
  auto l = logistic_noise(500, 400, 5, at::kDouble);
  CHECK(l.mean().item<double>() == Approx(0.0).margin(0.02));
  CHECK(l.var().item<double>() == Approx(M_PI * M_PI / 3).epsilon(0.02));
  CHECK(gumbel_noise(3, 4, 99, at::kFloat).equal(gumbel_noise(3, 4, 99, at::kFloat)));
  CHECK(!gumbel_noise(3, 4, 98, at::kFloat).equal(gumbel_noise(3, 4, 99, at::kFloat)));
  CHECK(at::isfinite(g).all().item<bool>());
}

TEST_CASE("stochastic rounding to bf16 is unbiased", "[kernels]") {
  const float x = 1.0f + 0.3f / 128.0f;  // 30% of the way from 1 to the next bf16 value
  double sum = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const float r = static_cast<float>(
        group::round_stochastic(x, philox4x32(3, static_cast<uint64_t>(i)).v[0]));
    CHECK((r == 1.0f || r == 1.0f + 1.0f / 128.0f));
    sum += r;
  }
  CHECK(sum / n == Approx(x).epsilon(2e-4));
}

TEST_CASE("fused forward and gradients equal the unfused autograd path (fp64)", "[kernels][grad]") {
  // Ragged: 13 rows in tiles of 4, 28 inputs in tiles of 8 (the last 4 wide).
  TileGrid grid(13, 28, 4, 8);
  for (bool hard : {false, true})
    for (auto mode : {MaskMode::kJoint, MaskMode::kTile, MaskMode::kMaskLLM})
      for (bool weight_term : {false, true}) {
        auto st = state(hard);
        LinearMask ref("model.layers.1.mlp.up_proj", grid, st,
                       options(mode, /*fused=*/false, at::kDouble));
        LinearMask fused("model.layers.1.mlp.up_proj", grid, st,
                         options(mode, /*fused=*/true, at::kDouble));
        set_random_pattern(ref);
        copy_logits(ref, fused);
        auto w = at::randn({13, 28}, at::kDouble);
        auto r = at::randn({13, 28}, at::kDouble);
        auto a = run_loss(ref, w, r, weight_term);
        auto b = run_loss(fused, w, r, weight_term);
        INFO("mode " << mask_mode_name(mode) << " hard " << hard << " weight term " << weight_term);
        CHECK(at::allclose(a, b, 1e-12, 1e-12));
        auto pr = ref.parameters(), pf = fused.parameters();
        REQUIRE(pr.size() == pf.size());
        for (size_t i = 0; i < pr.size(); ++i) {
          REQUIRE(pf[i].grad().defined());
          CHECK(at::allclose(pr[i].grad(), pf[i].grad(), 1e-10, 1e-12));
          CHECK(pf[i].grad().abs().sum().item<double>() > 0);
        }
      }
}

TEST_CASE("compact state applies AdamW inside the backward", "[kernels][compact]") {
  TileGrid grid(8, 32, 4, 16);
  auto st = state(false);
  auto copts = options(MaskMode::kJoint, /*fused=*/true, at::kFloat);
  copts.compact = true;
  LinearMask compact("model.layers.0.self_attn.q_proj", grid, st, copts);
  LinearMask full("model.layers.0.self_attn.q_proj", grid, st,
                  options(MaskMode::kJoint, /*fused=*/true, at::kFloat));
  REQUIRE(compact.pattern_logits().scalar_type() == at::kBFloat16);
  copy_logits(compact, full);               // full starts from the bf16 values
  CHECK(compact.parameters().size() == 1);  // the tile logits only
  auto w = at::randn({8, 32});
  auto r = at::randn({8, 32});
  st->update = {0.05, 0.9, 0.99, 1e-8, 0.01, 0.5, 1};
  const auto before = full.pattern_logits().detach().clone();
  run_loss(full, w, r, /*weight_term=*/false);
  run_loss(compact, w, r, /*weight_term=*/false);
  CHECK(!compact.pattern_logits().grad().defined());
  // The tile logits still get their gradient.
  CHECK(at::allclose(compact.tile_logits().grad(), full.tile_logits().grad(), 1e-5, 1e-6));
  // AdamW step 1 written out: m = 0.1 g, v = 0.01 g^2, bias corrections 0.1 and 0.01.
  auto g = full.pattern_logits().grad() * 0.5;
  auto m = g * 0.1, v = g * g * 0.01;
  auto expect = before * (1 - 0.05 * 0.01) - 0.05 / 0.1 * m / ((v / 0.01).sqrt() + 1e-8);
  auto got = compact.pattern_logits().detach().to(at::kFloat);
  // Stochastic rounding: within one bf16 step of the exact value.
  auto ulp = expect.abs().clamp_min(1e-30) * (1.0 / 128.0);
  CHECK(((got - expect).abs() <= ulp + 1e-6).all().item<bool>());
  CHECK(!got.equal(before));
  auto sq = compact.take_pattern_sq_norm();
  REQUIRE(sq.defined());
  CHECK(sq.item<double>() ==
        Approx(full.pattern_logits().grad().square().sum().item<double>()).epsilon(1e-4));
  CHECK(!compact.take_pattern_sq_norm().defined());
  // The moments are checkpoint state.
  int moments = 0;
  for (auto& [name, t] : compact.named_state())
    moments += name.find("exp_avg") != std::string::npos;
  CHECK(moments == 2);
}

TEST_CASE("CUDA kernels equal the CPU reference on ragged shapes", "[kernels][cuda]") {
  if (no_cuda()) return;
  const at::Device cuda(at::kCUDA);
  for (const auto& shape : kRagged)
    for (bool hard : {false, true})
      for (auto mode : {MaskMode::kJoint, MaskMode::kTile, MaskMode::kMaskLLM}) {
        TileGrid grid(shape.out, shape.in, shape.tr, shape.tc);
        auto st = state(hard);
        LinearMask cpu("model.layers.2.mlp.down_proj", grid, st,
                       options(mode, /*fused=*/true, at::kFloat));
        LinearMask gpu("model.layers.2.mlp.down_proj", grid, st,
                       options(mode, /*fused=*/true, at::kFloat, cuda));
        set_random_pattern(cpu);
        copy_logits(cpu, gpu);
        auto w = at::randn({shape.out, shape.in});
        auto r = at::randn({shape.out, shape.in});
        INFO("shape " << grid.str() << " mode " << mask_mode_name(mode) << " hard " << hard);
        auto a = run_loss(cpu, w, r, /*weight_term=*/true);
        auto b = run_loss(gpu, w.to(cuda), r.to(cuda), /*weight_term=*/true).cpu();
        // fp32 with the device's exp/log: a few ulp; hard decisions may flip only at exact ties.
        CHECK(at::allclose(a, b, 1e-4, 1e-5));
        auto pc = cpu.parameters(), pg = gpu.parameters();
        for (size_t i = 0; i < pc.size(); ++i)
          CHECK(at::allclose(pc[i].grad(), pg[i].grad().cpu(), 1e-3, 1e-4));
        // bf16 weights: the kernel reads bf16 and writes bf16.
        auto wb = w.to(cuda, at::kBFloat16);
        at::NoGradGuard no_grad;
        auto fused_bf16 = gpu.effective_weight(wb);
        CHECK(fused_bf16.scalar_type() == at::kBFloat16);
        CHECK(at::allclose(fused_bf16.to(at::kFloat).cpu(),
                           (wb.to(at::kFloat) * gpu.sampled_mask()).cpu(), 1e-2, 1e-2));
      }
}

TEST_CASE("CUDA compact state updates as the CPU reference does", "[kernels][cuda][compact]") {
  if (no_cuda()) return;
  const at::Device cuda(at::kCUDA);
  for (const auto& shape : kRagged)
    for (auto mode : {MaskMode::kJoint, MaskMode::kMaskLLM}) {
      TileGrid grid(shape.out, shape.in, shape.tr, shape.tc);
      auto st = state(false);
      auto copts = options(mode, /*fused=*/true, at::kFloat);
      copts.compact = true;
      LinearMask cpu("model.layers.2.mlp.down_proj", grid, st, copts);
      copts.device = cuda;
      LinearMask gpu("model.layers.2.mlp.down_proj", grid, st, copts);
      copy_logits(cpu, gpu);
      auto w = at::randn({shape.out, shape.in});
      INFO("shape " << grid.str() << " mode " << mask_mode_name(mode));
      for (int step = 1; step <= 2; ++step) {
        st->step = step;
        st->update = {0.05, 0.9, 0.99, 1e-8, 0.01, 0.7, step};
        auto r = at::randn({shape.out, shape.in});
        run_loss(cpu, w, r, /*weight_term=*/false);
        run_loss(gpu, w.to(cuda), r.to(cuda), /*weight_term=*/false);
        CHECK(cpu.take_pattern_sq_norm().item<double>() ==
              Approx(gpu.take_pattern_sq_norm().item<double>()).epsilon(1e-3));
      }
      // bf16 state, bit for bit except where the device's exp/log moved a
      // value across a rounding boundary, or flipped the sign of a gradient
      // near zero (AdamW's first steps move a logit by about lr either way).
      std::map<std::string, at::Tensor> want;
      for (auto& [name, t] : cpu.named_state()) want[name] = t.detach().to(at::kFloat);
      for (auto& [name, t] : gpu.named_state()) {
        INFO(name);
        const auto a = want.at(name), b = t.detach().to(at::kFloat).cpu();
        CHECK(a.ne(b).sum().item<int64_t>() <= std::max<int64_t>(2, a.numel() / 100));
        if (name.find("pattern_logits") != std::string::npos)
          CHECK(((a - b).abs() <= 2 * 2 * 0.05 + a.abs() * (1.0 / 128.0)).all().item<bool>());
      }
    }
}

TEST_CASE("CUDA: fused gradients equal unfused autograd with the same noise", "[kernels][cuda]") {
  if (no_cuda()) return;
  const at::Device cuda(at::kCUDA);
  TileGrid grid(384, 640, 128, 128);
  for (auto mode : {MaskMode::kJoint, MaskMode::kTile, MaskMode::kMaskLLM}) {
    auto st = state(false);
    LinearMask ref("model.layers.3.mlp.up_proj", grid, st,
                   options(mode, /*fused=*/false, at::kFloat, cuda));
    LinearMask fused("model.layers.3.mlp.up_proj", grid, st,
                     options(mode, /*fused=*/true, at::kFloat, cuda));
    set_random_pattern(ref);
    copy_logits(ref, fused);
    auto w = at::randn({384, 640}, cuda);
    auto r = at::randn({384, 640}, cuda);
    INFO("mode " << mask_mode_name(mode));
    CHECK(at::allclose(run_loss(ref, w, r, false), run_loss(fused, w, r, false), 1e-4, 1e-5));
    auto pr = ref.parameters(), pf = fused.parameters();
    for (size_t i = 0; i < pr.size(); ++i)
      CHECK(at::allclose(pr[i].grad(), pf[i].grad(), 1e-3, 1e-4));
  }
}

TEST_CASE("CUDA kernels read a step's values from device memory as from their arguments",
          "[kernels][cuda]") {
  if (no_cuda()) return;
  // Two mask sets with the same logits: one eager, one whose state carries
  // the step in device memory (what a replayed CUDA graph reads). The
  // device-side state's host values are then scrambled, so only what the
  // kernels read from the device can make the two agree, bit for bit.
  const at::Device cuda(at::kCUDA);
  const Shape shape = kRagged[1];
  for (auto mode : {MaskMode::kJoint, MaskMode::kTile, MaskMode::kMaskLLM})
    for (bool compact : {false, true})
      for (bool hard : {false, true}) {
        if (compact && mode == MaskMode::kTile) continue;
        INFO("mode " << mask_mode_name(mode) << " compact " << compact << " hard " << hard);
        MaskSetOptions so;
        so.mask = options(mode, /*fused=*/true, at::kFloat, cuda);
        so.mask.compact = compact;
        so.tile_rows = shape.tr;
        so.tile_cols = shape.tc;
        auto st_eager = state(hard), st_dev = state(hard);
        st_eager->update = st_dev->update = {0.05, 0.9, 0.99, 1e-8, 0.01, 0.7, 3};
        MaskSet eager(so, st_eager), dev(so, st_dev);
        const auto w = at::randn({shape.out, shape.in}, cuda);
        eager.add_layers({{"model.layers.1.self_attn.q_proj", w}});
        dev.add_layers({{"model.layers.1.self_attn.q_proj", w}});
        if (mode == MaskMode::kTile) {
          const auto p = at::randint(0, 6, {shape.out, shape.in / 4}, at::kLong);
          eager.masks()[0]->set_fixed_pattern(p);
          dev.masks()[0]->set_fixed_pattern(p);
        }
        dev.use_device_scalars(/*grad_scale=*/0.7);
        StepScalars s = dev.step_scalars();
        s.lr = 0.05f;
        s.inv_bias1 = static_cast<float>(1.0 / (1.0 - std::pow(0.9, 3.0)));
        s.inv_bias2 = static_cast<float>(1.0 / (1.0 - std::pow(0.99, 3.0)));
        dev.upload_step_scalars(s);
        st_dev->step = 77;
        st_dev->tau_24 = st_dev->tau_tile = 3.0;
        st_dev->scale_24 = st_dev->scale_tile = 9.0;
        st_dev->hard_24 = st_dev->hard_tile = !hard;
        st_dev->update.lr = 1.0;
        st_dev->update.grad_scale = 0.1;
        st_dev->update.steps = 40;

        const auto r = at::randn({shape.out, shape.in}, cuda);
        std::vector<at::Tensor> outs;
        for (MaskSet* set : {&eager, &dev}) {
          auto wm = set->masks()[0]->effective_weight(w);
          auto loss = (wm * r).sum();
          if (mode != MaskMode::kMaskLLM) loss = loss + 3.0 * set->soft_density();
          loss.backward();
          outs.push_back(wm.detach());
        }
        CHECK(at::equal(outs[0], outs[1]));
        const auto& a = *eager.masks()[0];
        const auto& b = *dev.masks()[0];
        if (mode != MaskMode::kMaskLLM) CHECK(at::equal(a.tile_logits().grad(), b.tile_logits().grad()));
        if (mode != MaskMode::kTile) {
          if (compact) {
            CHECK(at::equal(a.pattern_logits(), b.pattern_logits()));
            CHECK(eager.take_pattern_sq_norm().item<double>() ==
                  dev.take_pattern_sq_norm().item<double>());
          } else {
            CHECK(at::equal(a.pattern_logits().grad(), b.pattern_logits().grad()));
          }
        }
      }
}
