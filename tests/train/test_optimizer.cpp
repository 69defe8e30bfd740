// AdamW and the learning-rate schedule against their published formulas.
#include <cmath>

#include "catch.h"
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

TEST_CASE("gradient clipping scales to the max norm") {
  auto a = at::zeros({2}, at::kDouble).requires_grad_(true);
  auto b = at::zeros({1}, at::kDouble).requires_grad_(true);
  train::AdamW opt({{"a", a}, {"b", b}}, {});
  a.mutable_grad() = at::tensor({3.0, 0.0}, at::kDouble);
  b.mutable_grad() = at::tensor({4.0}, at::kDouble);
  CHECK(opt.clip_grad_norm(1.0) == Approx(5.0));
  CHECK(a.grad()[0].item<double>() == Approx(0.6).epsilon(1e-5));
  CHECK(b.grad()[0].item<double>() == Approx(0.8).epsilon(1e-5));
}

TEST_CASE("warm-up then cosine decay") {
  CHECK(train::lr_at(0, 100, 10, 1.0, 0.1) == Approx(0.1));
  CHECK(train::lr_at(9, 100, 10, 1.0, 0.1) == Approx(1.0));
  CHECK(train::lr_at(10, 100, 10, 1.0, 0.1) == Approx(1.0));
  CHECK(train::lr_at(55, 100, 10, 1.0, 0.1) == Approx(0.1 + 0.9 * 0.5));
  CHECK(train::lr_at(100, 100, 10, 1.0, 0.1) == Approx(0.1));
}
