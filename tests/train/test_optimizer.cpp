// AdamW and the learning-rate schedule against their published formulas.
#include <cmath>

#include "catch.h"
#include "train/adamw.h"
#include "train/optimizer.h"

using namespace patch;

TEST_CASE("AdamW matches the reference update written out step by step") {
  at::manual_seed(3);
  auto p = at::randn({5}, at::kDouble).requires_grad_(true);
  auto p0 = p.detach().clone();
  train::AdamW opt({{"p", p}}, {0.9, 0.99, 1e-8, 0.1});
  auto m = at::zeros_like(p0), v = at::zeros_like(p0), ref = p0.clone();
  for (int t = 1; t <= 3; ++t) {
    auto g = at::randn({5}, at::kDouble);
    p.mutable_grad() = g.clone();
    opt.step(0.01);
    ref = ref * (1 - 0.01 * 0.1);
    m = 0.9 * m + 0.1 * g;
    v = 0.99 * v + 0.01 * g * g;
    auto mhat = m / (1 - std::pow(0.9, t)), vhat = v / (1 - std::pow(0.99, t));
    ref = ref - 0.01 * mhat / (vhat.sqrt() + 1e-8);
    CHECK(at::allclose(p.detach(), ref, 1e-12, 1e-12));
  }
  // Saved state reloads into a fresh optimizer that then takes the same step.
  auto q = p.detach().clone().requires_grad_(true);
  train::AdamW opt2({{"p", q}}, {0.9, 0.99, 1e-8, 0.1});
  std::map<std::string, at::Tensor> st;
  for (auto& [k, t] : opt.state()) st[k] = t.clone();
  opt2.load_state(st, opt.steps());
  auto g = at::randn({5}, at::kDouble);
  p.mutable_grad() = g.clone();
  q.mutable_grad() = g.clone();
  opt.step(0.02);
  opt2.step(0.02);
  CHECK(at::equal(p.detach(), q.detach()));
}

TEST_CASE("the gradient norm is global and a step's grad_scale clips like scaled gradients") {
  auto a = at::zeros({2}, at::kDouble).requires_grad_(true);
  auto b = at::zeros({1}, at::kDouble).requires_grad_(true);
  train::AdamW opt({{"a", a}, {"b", b}}, {});
  a.mutable_grad() = at::tensor({3.0, 0.0}, at::kDouble);
  b.mutable_grad() = at::tensor({4.0}, at::kDouble);
  CHECK(opt.grad_norm(at::zeros({}, at::kDouble)).item<double>() == Approx(5.0));
  CHECK(opt.grad_norm(/*extra_sq=*/at::full({}, 11.0, at::kDouble)).item<double>() == Approx(6.0));
  auto c = at::zeros({2}, at::kDouble).requires_grad_(true);
  auto d = at::zeros({1}, at::kDouble).requires_grad_(true);
  train::AdamW scaled({{"c", c}, {"d", d}}, {});
  c.mutable_grad() = at::tensor({0.6, 0.0}, at::kDouble);
  d.mutable_grad() = at::tensor({0.8}, at::kDouble);
  opt.step(0.1, /*grad_scale=*/0.2);
  scaled.step(0.1);
  CHECK(at::allclose(a.detach(), c.detach(), 1e-12, 1e-12));
  CHECK(at::allclose(b.detach(), d.detach(), 1e-12, 1e-12));
  CHECK(a.detach()[0].item<double>() != 0.0);
}

TEST_CASE("the CUDA AdamW kernel equals ATen's fused AdamW", "[cuda]") {
  if (!at::hasCUDA()) {
    SUCCEED("no CUDA device");
    return;
  }
  at::manual_seed(5);
  const auto f32 = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  // Sizes with n % 4 != 0 and a large one (many blocks, grid-stride).
  std::vector<at::Tensor> ps, gs, ms, vs, rp, rm, rv;
  for (int64_t n : {1, 7, 4096, 1001, 3 * (1 << 20) + 3}) {
    ps.push_back(at::randn({n}, f32));
    ms.push_back(at::zeros({n}, f32));
    vs.push_back(at::zeros({n}, f32));
    rp.push_back(ps.back().clone());
    rm.push_back(ms.back().clone());
    rv.push_back(vs.back().clone());
  }
  for (int64_t step = 1; step <= 4; ++step) {
    train::AdamWStep s;
    s.opts = {/*beta1=*/0.8, /*beta2=*/0.95, /*eps=*/1e-6, /*weight_decay=*/0.1};
    s.lr = 0.01;
    s.grad_scale = step % 2 ? 0.37 : 1.0;
    s.step = step;
    gs.clear();
    std::vector<at::Tensor> rg;
    for (const auto& p : ps) {
      gs.push_back(at::randn(p.sizes(), f32));
      rg.push_back(gs.back() * static_cast<float>(s.grad_scale));
    }
    train::adamw_update(ps, gs, ms, vs, s);
    const at::Tensor t = at::full({}, static_cast<double>(step), f32);
    at::_fused_adamw_(rp, rg, rm, rv, {}, std::vector<at::Tensor>(rp.size(), t), s.lr, s.opts.beta1, s.opts.beta2,
                      s.opts.weight_decay, s.opts.eps, /*amsgrad=*/false, /*maximize=*/false);
    for (size_t i = 0; i < ps.size(); ++i) {
      INFO("step " << step << ", tensor " << i);
      // float32: the two kernels may contract different products into FMAs.
      CHECK(at::allclose(ps[i], rp[i], 1e-5, 1e-6));
      CHECK(at::allclose(ms[i], rm[i], 1e-5, 1e-7));
      CHECK(at::allclose(vs[i], rv[i], 1e-5, 1e-9));
    }
  }
}

TEST_CASE("warm-up then cosine decay") {
  CHECK(train::lr_at(0, 100, 10, 1.0, 0.1) == Approx(0.1));
  CHECK(train::lr_at(9, 100, 10, 1.0, 0.1) == Approx(1.0));
  CHECK(train::lr_at(10, 100, 10, 1.0, 0.1) == Approx(1.0));
  CHECK(train::lr_at(55, 100, 10, 1.0, 0.1) == Approx(0.1 + 0.9 * 0.5));
  CHECK(train::lr_at(100, 100, 10, 1.0, 0.1) == Approx(0.1));
}
