#include "train/adamw.h"

#include <cmath>
#include <cstdint>

#include "core/error.h"

namespace patch::train {
namespace {

bool kernel_fits(const at::Tensor& p, const at::Tensor& g, const at::Tensor& m,
                 const at::Tensor& v) {
  for (const at::Tensor* t : {&p, &g, &m, &v})
    if (!t->is_cuda() || t->scalar_type() != at::kFloat || !t->is_contiguous() ||
        t->sizes() != p.sizes() || reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0)
      return false;
  return true;
}

}  // namespace

std::pair<float, float> adamw_step_factors(const AdamWStep& s) {
  const float step = static_cast<float>(s.step);
  const float bias1 = 1.0f - std::pow(static_cast<float>(s.opts.beta1), step);
  const float bias2 = 1.0f - std::pow(static_cast<float>(s.opts.beta2), step);
  return {static_cast<float>(s.lr) / bias1, 1.0f / std::sqrt(bias2)};
}

void adamw_update(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<at::Tensor>& exp_avgs,
                  const std::vector<at::Tensor>& exp_avg_sqs, const AdamWStep& s) {
  core::check(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                  exp_avg_sqs.size() == params.size(),
              "adamw_update", "expected one gradient and two moments per parameter");
  std::vector<at::Tensor> ps, gs, ms, vs;
  for (size_t i = 0; i < params.size(); ++i) {
#ifdef PATCH_WITH_CUDA
    if (kernel_fits(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])) {
      at::Tensor p = params[i], m = exp_avgs[i], v = exp_avg_sqs[i];
      cuda::adamw_update(p, grads[i], m, v, s);
      continue;
    }
#endif
    ps.push_back(params[i]);
    gs.push_back(grads[i]);
    ms.push_back(exp_avgs[i]);
    vs.push_back(exp_avg_sqs[i]);
  }
  if (ps.empty()) return;
  core::check(s.device == nullptr, "adamw_update",
              "device step values need float32 CUDA tensors (16-byte aligned)");
  if (s.grad_scale != 1.0) at::_foreach_mul_(gs, s.grad_scale);
  const at::Tensor step =
      at::full({}, static_cast<double>(s.step), ps[0].options().dtype(at::kFloat));
  const std::vector<at::Tensor> steps(ps.size(), step);
  at::_fused_adamw_(ps, gs, ms, vs, /*max_exp_avg_sqs=*/{}, steps, s.lr, s.opts.beta1, s.opts.beta2,
                    s.opts.weight_decay, s.opts.eps,
                    /*amsgrad=*/false, /*maximize=*/false);
}

}  // namespace patch::train
