#include "train/optimizer.h"

#include <algorithm>

#include <c10/core/GradMode.h>

#include <cmath>
#include <cstddef>
#include <tuple>

#include "core/error.h"

namespace patch::train {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions opts)
    : params_(std::move(params)), opts_(opts) {
  for (const auto& [name, p] : params_) {
    exp_avg_.push_back(at::zeros_like(p));
    exp_avg_sq_.push_back(at::zeros_like(p));
  }
}

void AdamW::step(double lr, double grad_scale, const float* device) {
  c10::NoGradGuard no_grad;
  if (!device) ++steps_;
  std::vector<at::Tensor> ps, gs, ms, vs;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    ps.push_back(p);
    gs.push_back(p.grad());
    ms.push_back(exp_avg_[i]);
    vs.push_back(exp_avg_sq_[i]);
  }
  adamw_update(ps, gs, ms, vs, {opts_, lr, grad_scale, steps_, device});
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_)
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
}

at::Tensor AdamW::grad_norm(const at::Tensor& extra_sq) const {
  c10::NoGradGuard no_grad;
  // Multi-tensor kernels: a few launches for all layers, and no read on the host.
  std::vector<at::Tensor> grads;
  for (auto& [name, p] : params_)
    if (p.grad().defined()) grads.push_back(p.grad());
  at::Tensor sq = extra_sq;
  if (!grads.empty()) sq = sq + at::stack(at::_foreach_norm(grads, 2)).to(at::kDouble).square().sum();
  return sq.sqrt();
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    out.emplace_back(params_[i].first + ".exp_avg", exp_avg_[i]);
    out.emplace_back(params_[i].first + ".exp_avg_sq", exp_avg_sq_[i]);
  }
  return out;
}

void AdamW::load_state(const std::map<std::string, at::Tensor>& tensors, int64_t steps) {
  c10::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    for (auto [suffix, dst] : {std::pair<const char*, at::Tensor*>{".exp_avg", &exp_avg_[i]},
                               {".exp_avg_sq", &exp_avg_sq_[i]}}) {
      auto it = tensors.find(params_[i].first + suffix);
      core::check(it != tensors.end(), "checkpoint",
                  core::str("optimizer state '", params_[i].first, suffix, "' is missing"));
      core::check(it->second.sizes() == dst->sizes(), "checkpoint",
                  core::str("optimizer state '", params_[i].first, suffix, "' has the wrong shape"));
      dst->copy_(it->second);
    }
  }
  steps_ = steps;
}

MaskOptimizer::MaskOptimizer(sparsity::MaskSet& masks, AdamWOptions opts, bool compact)
    : masks_(masks), opts_(opts), adam_(masks.named_parameters(), opts), compact_(compact) {}

void MaskOptimizer::begin_step(double lr) {
  if (compact_)
    masks_.state().update = {lr, opts_.beta1, opts_.beta2, opts_.eps, opts_.weight_decay, clip_scale_, adam_.steps() + 1};
  if (!device_scalars_) return;
  // The step is counted here, on the host, because a replayed graph runs no host code.
  adam_.set_steps(adam_.steps() + 1);
  const int64_t t = adam_.steps();
  sparsity::StepScalars s = masks_.step_scalars();
  // As adam_args (compact state's update) and adamw_update form them.
  s.inv_bias1 = static_cast<float>(1.0 / sparsity::SamplerState::bias_correction(opts_.beta1, t));
  s.inv_bias2 = static_cast<float>(1.0 / sparsity::SamplerState::bias_correction(opts_.beta2, t));
  s.lr = static_cast<float>(lr);
  std::tie(s.step_size, s.inv_bias2_sqrt) = adamw_step_factors({opts_, lr, 1.0, t});
  masks_.upload_step_scalars(s);
}

void MaskOptimizer::use_device_scalars() {
  for (const auto& [name, p] : masks_.named_parameters())
    core::check(p.is_cuda() && p.scalar_type() == at::kFloat, name,
                "CUDA graphs need float32 mask logits on a CUDA device");
  masks_.use_device_scalars(clip_scale_);
  device_scalars_ = true;
}

namespace {
// The float32 word of the state's device StepScalars at byte `offset`.
at::Tensor scalar_slot(sparsity::MaskSet& masks, size_t offset) {
  return masks.state().device.narrow(0, static_cast<int64_t>(offset / sizeof(float)), 1);
}
}  // namespace

at::Tensor MaskOptimizer::finish_step_on_device(double clip) {
  core::check(device_scalars_, "MaskOptimizer", "finish_step_on_device needs use_device_scalars");
  c10::NoGradGuard no_grad;
  const at::Tensor norm = adam_.grad_norm(masks_.take_pattern_sq_norm());
  // clip / (norm + 1e-6) where the norm exceeds clip, as finish_step; compact
  // state's next in-backward update reads the same slot as its factor.
  at::Tensor scale = clip > 0 ? at::where(norm > clip, clip / (norm + 1e-6), at::ones_like(norm))
                              : at::ones_like(norm);
  scalar_slot(masks_, offsetof(sparsity::StepScalars, grad_scale)).copy_(scale.reshape({1}));
  const auto* dev = static_cast<const float*>(masks_.state().device.data_ptr());
  adam_.step(0.0, 1.0, dev + offsetof(sparsity::StepScalars, lr) / sizeof(float));
  adam_.zero_grad();
  return norm;
}

double MaskOptimizer::clip_scale() const {
  if (!device_scalars_) return clip_scale_;
  return scalar_slot(masks_, offsetof(sparsity::StepScalars, grad_scale)).item<double>();
}

void MaskOptimizer::set_clip_scale(double s) {
  clip_scale_ = s;
  if (device_scalars_) scalar_slot(masks_, offsetof(sparsity::StepScalars, grad_scale)).fill_(s);
}

std::vector<at::Tensor> MaskOptimizer::params_in_backward_order() const {
  std::vector<at::Tensor> out;
  for (const auto& [name, p] : masks_.named_parameters())
    if (p.requires_grad()) out.push_back(p);
  std::reverse(out.begin(), out.end());  // layers are listed in forward order
  return out;
}

double MaskOptimizer::finish_step(double lr, double clip) {
  // One device sync for both parts of the norm (compact state's 2:4 part is 0 otherwise).
  const double norm = adam_.grad_norm(masks_.take_pattern_sq_norm()).item<double>();
  const double scale = clip > 0 && norm > clip ? clip / (norm + 1e-6) : 1.0;
  if (compact_) clip_scale_ = scale;
  adam_.step(lr, scale);
  adam_.zero_grad();
  return norm;
}

double lr_at(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio) {
  if (warmup > 0 && step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  int64_t decay = std::max<int64_t>(1, total - warmup);
  double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(decay));
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return peak * (min_ratio + (1.0 - min_ratio) * cosine);
}

}  // namespace patch::train
