#include "train/optimizer.h"

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

void AdamW::step(double lr) {
  c10::NoGradGuard no_grad;
  ++steps_;
  const double bc1 = 1.0 - std::pow(opts_.beta1, static_cast<double>(steps_));
  const double bc2 = 1.0 - std::pow(opts_.beta2, static_cast<double>(steps_));
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor p = params_[i].second;
    const at::Tensor& g = p.grad();
    if (!g.defined()) continue;
    if (opts_.weight_decay > 0) p.mul_(1.0 - lr * opts_.weight_decay);
    exp_avg_[i].mul_(opts_.beta1).add_(g, 1.0 - opts_.beta1);
    exp_avg_sq_[i].mul_(opts_.beta2).addcmul_(g, g, 1.0 - opts_.beta2);
    at::Tensor denom = (exp_avg_sq_[i] / bc2).sqrt_().add_(opts_.eps);
    p.addcdiv_(exp_avg_[i], denom, -lr / bc1);
  }
}

void AdamW::zero_grad() {
  for (auto& [name, p] : params_)
    if (p.grad().defined()) p.mutable_grad() = at::Tensor();
}

double AdamW::clip_grad_norm(double max_norm) {
  c10::NoGradGuard no_grad;
  std::vector<at::Tensor> norms;
  for (auto& [name, p] : params_)
    if (p.grad().defined()) norms.push_back(p.grad().norm(2).to(at::kDouble));
  if (norms.empty()) return 0.0;
  double total = at::stack(norms).norm(2).item<double>();
  if (max_norm > 0 && total > max_norm) {
    double scale = max_norm / (total + 1e-6);
    for (auto& [name, p] : params_)
      if (p.grad().defined()) p.mutable_grad().mul_(scale);
  }
  return total;
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

double lr_at(int64_t step, int64_t total, int64_t warmup, double peak, double min_ratio) {
  if (warmup > 0 && step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  int64_t decay = std::max<int64_t>(1, total - warmup);
  double progress = std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(decay));
  double cosine = 0.5 * (1.0 + std::cos(M_PI * progress));
  return peak * (min_ratio + (1.0 - min_ratio) * cosine);
}

}  // namespace patch::train
