#include "train/optimizer.h"

#include <algorithm>

#include <c10/core/GradMode.h>

#include <cmath>

#include "core/error.h"

namespace patch::train {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions opts)
    : params_(std::move(params)), opts_(opts) {
  for (const auto& [name, p] : params_) {
    exp_avg_.push_back(at::zeros_like(p));
    exp_avg_sq_.push_back(at::zeros_like(p));
  }
}

void AdamW::step(double lr, double grad_scale) {
  c10::NoGradGuard no_grad;
  ++steps_;
  std::vector<at::Tensor> ps, gs, ms, vs;
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].second;
    if (!p.grad().defined()) continue;
    ps.push_back(p);
    gs.push_back(p.grad());
    ms.push_back(exp_avg_[i]);
    vs.push_back(exp_avg_sq_[i]);
  }
  adamw_update(ps, gs, ms, vs, {opts_, lr, grad_scale, steps_});
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_)
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
}

double AdamW::grad_norm(double extra_sq) const {
  c10::NoGradGuard no_grad;
  // Multi-tensor kernels: a few launches for all layers, one device sync.
  std::vector<at::Tensor> grads;
  for (auto& [name, p] : params_)
    if (p.grad().defined()) grads.push_back(p.grad());
  double sq = extra_sq;
  if (!grads.empty()) sq += at::stack(at::_foreach_norm(grads, 2)).to(at::kDouble).square().sum().item<double>();
  return std::sqrt(sq);
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
  if (!compact_) return;
  masks_.state().update = {lr, opts_.beta1, opts_.beta2, opts_.eps, opts_.weight_decay, clip_scale_, adam_.steps() + 1};
}

std::vector<at::Tensor> MaskOptimizer::params_in_backward_order() const {
  std::vector<at::Tensor> out;
  for (const auto& [name, p] : masks_.named_parameters())
    if (p.requires_grad()) out.push_back(p);
  std::reverse(out.begin(), out.end());  // layers are listed in forward order
  return out;
}

double MaskOptimizer::finish_step(double lr, double clip) {
  const double norm = adam_.grad_norm(compact_ ? masks_.take_pattern_sq_norm() : 0.0);
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
