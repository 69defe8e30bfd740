#include "model/rms_norm.h"

#include <torch/csrc/autograd/custom_function.h>

#include "core/dispatch.h"
#include "core/error.h"

namespace patch::model {

namespace {

// The reference: transformers' LlamaRMSNorm, op for op.
at::Tensor rms_norm_aten(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor t = x.to(at::promote_types(x.scalar_type(), at::kFloat));
  t = t * at::rsqrt(t.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * t.to(x.scalar_type());
}

struct RmsNormFunction : torch::autograd::Function<RmsNormFunction> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w,
                            double eps) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
    at::Tensor y = at::empty_like(x2);
    at::Tensor r = at::empty({x2.size(0)}, x2.options().dtype(at::kFloat));
    cuda::rms_norm_forward(x2, w.contiguous(), eps, y, r);
    ctx->save_for_backward({x2, w, r});
    return y.view(x.sizes());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor dy = grad_out[0].reshape({-1, saved[0].size(1)}).contiguous();
    at::Tensor dx = at::empty_like(saved[0]);
    cuda::rms_norm_backward(dy, saved[0], saved[1].contiguous(), saved[2], dx);
    return {dx.view(grad_out[0].sizes()), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  core::check(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm",
              "expected x [..., n] and weight [n]");
  // The kernels take float32, bfloat16 and float16 with a frozen weight of x's dtype.
  const at::ScalarType t = x.scalar_type();
  const bool kernels = !weight.requires_grad() && weight.scalar_type() == t &&
                       (t == at::kFloat || t == at::kBFloat16 || t == at::kHalf) && x.numel() > 0;
  return core::dispatch(
      x, "rms_norm",
      [&] { return kernels ? RmsNormFunction::apply(x, weight, eps) : rms_norm_aten(x, weight, eps); },
      [&] { return rms_norm_aten(x, weight, eps); });
}

}  // namespace patch::model
