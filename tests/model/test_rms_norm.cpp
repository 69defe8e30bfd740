// model::rms_norm: on the CPU transformers' LlamaRMSNorm op for op (the
// decoder's logits are checked against transformers elsewhere); the CUDA
// kernels' per-element math (rms_norm_math.h), run here on the host row by
// row, against that expression forward and through autograd backward; and on a
// GPU the kernels themselves against the CPU.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>

#include <vector>

#include "catch.h"
#include "model/rms_norm.h"
#include "model/rms_norm_math.h"

using namespace patch;

namespace {

double max_abs_diff(const at::Tensor& a, const at::Tensor& b) {
  return (a.to(at::kCPU, at::kDouble) - b.to(at::kCPU, at::kDouble)).abs().max().item<double>();
}

// y and dx by the kernels' math, one row at a time on the host.
template <typename T>
std::pair<at::Tensor, at::Tensor> by_the_math(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy,
                                              float eps) {
  const int64_t rows = x.size(0), n = x.size(1);
  const at::Tensor xf = x.to(at::kFloat), wf = w.to(at::kFloat), dyf = dy.to(at::kFloat);
  const float* xp = xf.data_ptr<float>();
  const float* wp = wf.data_ptr<float>();
  const float* dp = dyf.data_ptr<float>();
  at::Tensor y = at::empty({rows, n}, at::kFloat), dx = at::empty({rows, n}, at::kFloat);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0, gx = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(xp[r * n + i]) * xp[r * n + i];
    const float scale = model::rms::scale(static_cast<float>(ss), static_cast<int>(n), eps);
    for (int64_t i = 0; i < n; ++i) {
      y[r][i] = static_cast<float>(model::rms::out<T>(xp[r * n + i], scale, wp[i]));
      gx += static_cast<double>(model::rms::upstream<T>(dp[r * n + i], wp[i])) * xp[r * n + i];
    }
    const float mean_gx = static_cast<float>(gx / static_cast<double>(n));
    for (int64_t i = 0; i < n; ++i)
      dx[r][i] = static_cast<float>(
          model::rms::grad<T>(model::rms::upstream<T>(dp[r * n + i], wp[i]), xp[r * n + i], scale, mean_gx));
  }
  return {y, dx};
}

// y and dx of model::rms_norm through autograd.
std::pair<at::Tensor, at::Tensor> by_autograd(const at::Tensor& x, const at::Tensor& w, const at::Tensor& dy,
                                              double eps) {
  at::Tensor xl = x.detach().clone().requires_grad_(true);
  const at::Tensor y = model::rms_norm(xl, w, eps);
  torch::autograd::backward({y}, {dy});
  return {y.detach(), xl.grad()};
}

}  // namespace

TEST_CASE("rms_norm's kernel math equals transformers' expression and its autograd gradient", "[model]") {
  at::manual_seed(7);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (int64_t n : {int64_t{64}, int64_t{576}, int64_t{2048}}) {
      INFO(c10::toString(dtype) << " n " << n);
      const at::Tensor x = (at::randn({9, n}) * 3).to(dtype);
      const at::Tensor w = (at::rand({n}) + 0.5).to(dtype);
      const at::Tensor dy = at::randn({9, n}).to(dtype);
      const auto [y_ref, dx_ref] = by_autograd(x, w, dy, 1e-5);
      const auto [y, dx] = dtype == at::kBFloat16 ? by_the_math<at::BFloat16>(x, w, dy, 1e-5f)
                           : dtype == at::kHalf   ? by_the_math<at::Half>(x, w, dy, 1e-5f)
                                                  : by_the_math<float>(x, w, dy, 1e-5f);
      // One rounding of the dtype where the two sum the row in another order.
      const double ulp = dtype == at::kBFloat16 ? 1.6e-2 : dtype == at::kHalf ? 2e-3 : 1e-5;
      CHECK(max_abs_diff(y, y_ref) <= ulp * y_ref.abs().max().item<double>());
      CHECK(max_abs_diff(dx, dx_ref) <= ulp * dx_ref.abs().max().item<double>());
    }
  }
}

TEST_CASE("rms_norm on CUDA equals the CPU, forward and backward", "[cuda]") {
  if (!at::hasCUDA()) {
    WARN("no CUDA device: skipped");
    return;
  }
  at::manual_seed(11);
  for (at::ScalarType dtype : {at::kBFloat16, at::kHalf, at::kFloat}) {
    for (std::vector<int64_t> shape : {std::vector<int64_t>{3, 5, 4096}, {2, 7, 4, 128}, {1, 576}, {33, 8192}}) {
      INFO(c10::toString(dtype) << " shape " << at::IntArrayRef(shape));
      const at::Tensor x = (at::randn(shape) * 3).to(dtype);
      const at::Tensor w = (at::rand({shape.back()}) + 0.5).to(dtype);
      const at::Tensor dy = at::randn(shape).to(dtype);
      const auto [y_ref, dx_ref] = by_autograd(x, w, dy, 1e-6);
      const auto [y, dx] = by_autograd(x.cuda(), w.cuda(), dy.cuda(), 1e-6);
      REQUIRE(y.sizes() == x.sizes());
      const double ulp = dtype == at::kBFloat16 ? 1.6e-2 : dtype == at::kHalf ? 2e-3 : 1e-5;
      CHECK(max_abs_diff(y, y_ref) <= ulp * y_ref.abs().max().item<double>());
      CHECK(max_abs_diff(dx, dx_ref) <= ulp * dx_ref.abs().max().item<double>());
    }
  }
  // A non-contiguous input (a head's view, as Qwen3's q_norm gets it).
  const at::Tensor x = at::randn({2, 6, 8, 64}, at::TensorOptions().device(at::kCUDA)).transpose(1, 2);
  const at::Tensor w = at::rand({64}, at::TensorOptions().device(at::kCUDA)) + 0.5;
  CHECK(max_abs_diff(model::rms_norm(x, w, 1e-6), model::rms_norm(x.cpu(), w.cpu(), 1e-6)) <= 1e-5);
}
