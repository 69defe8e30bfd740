// model::linear_cross_entropy against ATen's autograd of cross_entropy(x w^T)
// (the oracle), and the CUDA kernel of cross_entropy_rows_ against the CPU one.
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <cmath>
#include <vector>

#include "catch.h"
#include "core/error.h"
#include "model/lm_loss.h"

using namespace patch;

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kDouble).cpu() - b.to(at::kDouble).cpu()).abs().max().item<double>();
}

struct LossAndGrad {
  at::Tensor loss, grad;
};

// The sum of cross-entropy through the head, scaled by 3 before backward (an
// upstream gradient that is not 1).
LossAndGrad ours(const at::Tensor& x0, const at::Tensor& w, const at::Tensor& t, int64_t chunk) {
  at::Tensor x = x0.detach().requires_grad_(true);
  at::Tensor loss = model::linear_cross_entropy(x, w, t, chunk);
  (loss * 3.0).backward();
  return {loss.detach(), x.grad()};
}

LossAndGrad aten(const at::Tensor& x0, const at::Tensor& w, const at::Tensor& t) {
  at::Tensor x = x0.detach().requires_grad_(true);
  const at::ScalarType acc = x0.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss =
      at::cross_entropy_loss(at::linear(x, w).to(acc), t, /*weight=*/{}, at::Reduction::Sum);
  (loss * 3.0).backward();
  return {loss.detach(), x.grad()};
}

}  // namespace

TEST_CASE("linear_cross_entropy: loss and input gradient equal autograd's at any chunking") {
  at::manual_seed(11);
  const int64_t n = 23, h = 16, vocab = 37;
  for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
    INFO(c10::toString(dtype));
    const at::Tensor x = at::randn({n, h}, at::TensorOptions().dtype(dtype));
    const at::Tensor w = at::randn({vocab, h}, at::TensorOptions().dtype(dtype));
    const at::Tensor t = at::randint(vocab, {n}, at::kLong);
    const LossAndGrad want = aten(x, w, t);
    const double tol = dtype == at::kDouble ? 1e-12 : 2e-5;
    for (int64_t chunk : {int64_t{1}, int64_t{7}, n, int64_t{100}}) {
      INFO("chunk " << chunk);
      const LossAndGrad got = ours(x, w, t, chunk);
      REQUIRE(got.loss.scalar_type() == want.loss.scalar_type());
      CHECK(got.loss.item<double>() == Approx(want.loss.item<double>()).epsilon(tol));
      REQUIRE(got.grad.scalar_type() == dtype);
      CHECK(max_abs_diff(got.grad, want.grad) <= tol * want.grad.abs().max().item<double>());
    }
  }
}

TEST_CASE("linear_cross_entropy: bfloat16 logits and float32 softmax") {
  at::manual_seed(12);
  const at::Tensor x = at::randn({19, 32}).to(at::kBFloat16);
  const at::Tensor w = (at::randn({301, 32}) * 0.3).to(at::kBFloat16);
  const at::Tensor t = at::randint(301, {19}, at::kLong);
  const LossAndGrad want = aten(x, w, t);
  const LossAndGrad got = ours(x, w, t, 8);
  CHECK(got.loss.scalar_type() == at::kFloat);
  CHECK(got.loss.item<double>() == Approx(want.loss.item<double>()).epsilon(1e-4));
  // The gradient is rounded to bfloat16 before the GEMM on both sides, once
  // scaled by the upstream 3 (autograd) and once not (ours).
  CHECK(max_abs_diff(got.grad, want.grad) <= 0.02 * want.grad.abs().max().item<double>());
}

TEST_CASE("linear_cross_entropy: without grad mode nothing is kept and bad input is refused") {
  const at::Tensor x = at::randn({5, 4}).requires_grad_(true);
  const at::Tensor w = at::randn({9, 4});
  const at::Tensor t = at::randint(9, {5}, at::kLong);
  const double want = aten(x, w, t).loss.item<double>();
  {
    const at::NoGradGuard no_grad;
    const at::Tensor l = model::linear_cross_entropy(x, w, t, 2);
    CHECK_FALSE(l.requires_grad());
    CHECK(l.item<double>() == Approx(want).epsilon(1e-5));
  }
  CHECK_THROWS_AS(model::linear_cross_entropy(x, w.clone().requires_grad_(true), t, 2), core::Error);
  CHECK_THROWS_AS(model::linear_cross_entropy(x, w, t.slice(0, 0, 4), 2), core::Error);
  CHECK_THROWS_AS(model::linear_cross_entropy(x, w, t, 0), core::Error);
  at::Tensor logits = at::randn({2, 9});
  CHECK_THROWS_AS(model::cross_entropy_rows_(logits, at::tensor({0, 9}, at::kLong), false), core::Error);
}

// The CUDA kernel against the CPU reference (skipped without a GPU): 16-byte
// rows (vocab a multiple of 8) and others, with and without the gradient.
TEST_CASE("cross_entropy_rows_ on CUDA equals the CPU reference", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: skipped");
    return;
  }
  at::manual_seed(13);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat, at::kDouble}) {
    for (int64_t vocab : {int64_t{128256}, int64_t{32000}, int64_t{1001}, int64_t{3}}) {
      INFO(c10::toString(dtype) << " vocab " << vocab);
      const at::Tensor z = (at::randn({37, vocab}) * 4).to(dtype);
      const at::Tensor t = at::randint(vocab, {37}, at::kLong);
      for (bool grad : {false, true}) {
        at::Tensor cpu = z.clone(), dev = z.cuda();
        const at::Tensor want = model::cross_entropy_rows_(cpu, t, grad);
        const at::Tensor got = model::cross_entropy_rows_(dev, t.cuda(), grad);
        const double tol = dtype == at::kDouble ? 1e-12 : 1e-5;
        CHECK(max_abs_diff(got, want) <= tol * (1 + want.abs().max().item<double>()));
        // The gradient: equal up to one rounding of the logits' dtype.
        const double ulp = dtype == at::kBFloat16 ? 8e-3 : dtype == at::kHalf ? 1e-3 : tol;
        CHECK(max_abs_diff(dev, cpu) <= ulp);
      }
    }
  }
  // A target outside the vocabulary gives a NaN loss instead of a wild read.
  at::Tensor z = at::randn({2, 8}, at::TensorOptions().device(at::kCUDA));
  const at::Tensor l = model::cross_entropy_rows_(z, at::tensor({1, 8}, at::kLong).cuda(), false).cpu();
  CHECK(std::isfinite(l[0].item<double>()));
  CHECK(std::isnan(l[1].item<double>()));
}

TEST_CASE("linear_cross_entropy on CUDA in bfloat16 matches the CPU in float32", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: skipped");
    return;
  }
  at::manual_seed(14);
  const at::Tensor x = at::randn({600, 64});
  const at::Tensor w = at::randn({5000, 64}) * 0.2;
  const at::Tensor t = at::randint(5000, {600}, at::kLong);
  const LossAndGrad want = aten(x, w, t);
  const LossAndGrad got = ours(x.to(at::kCUDA, at::kBFloat16), w.to(at::kCUDA, at::kBFloat16), t.cuda(), 256);
  CHECK(got.loss.item<double>() == Approx(want.loss.item<double>()).epsilon(1e-2));
  CHECK(max_abs_diff(got.grad, want.grad) <= 0.03 * want.grad.abs().max().item<double>());
}
