#include "sparsity/mask_set.h"

#include <ATen/core/grad_mode.h>

#include <set>

#include "core/error.h"

namespace patch::sparsity {

bool glob_match(const std::string& pattern, const std::string& name) {
  // Iterative wildcard match with backtracking to the last '*'.
  size_t p = 0, n = 0, star = std::string::npos, mark = 0;
  while (n < name.size()) {
    if (p < pattern.size() && (pattern[p] == '?' || pattern[p] == name[n])) {
      ++p;
      ++n;
    } else if (p < pattern.size() && pattern[p] == '*') {
      star = p++;
      mark = n;
    } else if (star != std::string::npos) {
      p = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

MaskSet::MaskSet(MaskSetOptions opts, std::shared_ptr<SamplerState> state)
    : opts_(std::move(opts)), state_(std::move(state)) {
  core::check(state_ != nullptr, "MaskSet", "needs a sampler state");
}

bool MaskSet::selects(const std::string& name) const {
  auto any = [&](const std::vector<std::string>& globs) {
    for (const auto& g : globs)
      if (glob_match(g, name)) return true;
    return false;
  };
  return any(opts_.include) && !any(opts_.exclude);
}

void MaskSet::add_layers(const std::vector<std::pair<std::string, at::Tensor>>& weights, const Attach& attach) {
  for (const auto& [name, w] : weights) {
    if (!selects(name)) continue;
    core::check(!index_.count(name), name, "masked twice");
    core::check(w.dim() == 2, name, core::str("expected a 2-D weight, got ", w.sizes()));
    TileGrid grid(w.size(0), w.size(1), opts_.tile_rows, opts_.tile_cols);
    auto mask = std::make_shared<LinearMask>(name, grid, state_, opts_.mask);
    index_[name] = masks_.size();
    masks_.push_back(mask);
    weights_.push_back(w);
    if (attach) attach(name, mask);
  }
}

std::shared_ptr<LinearMask> MaskSet::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : masks_[it->second];
}

int64_t MaskSet::total_weights() const {
  int64_t n = 0;
  for (const auto& m : masks_) n += m->grid().numel();
  return n;
}

std::vector<int64_t> MaskSet::blocks() const {
  std::set<int64_t> b;
  for (const auto& m : masks_) b.insert(m->block());
  return {b.begin(), b.end()};
}

at::Tensor MaskSet::soft_density() const {
  core::check(!masks_.empty(), "MaskSet", "no masked layers");
  at::Tensor sum;
  for (const auto& m : masks_) {
    auto d = m->soft_density() * static_cast<double>(m->grid().numel());
    sum = sum.defined() ? sum + d : d;
  }
  return sum / static_cast<double>(total_weights());
}

std::map<int64_t, at::Tensor> MaskSet::block_soft_density() const {
  std::map<int64_t, at::Tensor> sum;
  std::map<int64_t, int64_t> count;
  for (const auto& m : masks_) {
    auto d = m->soft_density() * static_cast<double>(m->grid().numel());
    auto& s = sum[m->block()];
    s = s.defined() ? s + d : d;
    count[m->block()] += m->grid().numel();
  }
  for (auto& [b, s] : sum) s = s / static_cast<double>(count[b]);
  return sum;
}

at::Tensor MaskSet::weight_term() const {
  core::check(!masks_.empty(), "MaskSet", "no masked layers");
  at::Tensor sum;
  for (size_t i = 0; i < masks_.size(); ++i) {
    auto t = masks_[i]->weight_term(weights_[i]);
    sum = sum.defined() ? sum + t : t;
  }
  return sum;
}

std::vector<at::Tensor> MaskSet::parameters() const {
  std::vector<at::Tensor> out;
  for (const auto& m : masks_)
    for (auto& p : m->parameters()) out.push_back(p);
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> MaskSet::named_parameters() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& m : masks_)
    for (auto& kv : m->named_parameters()) out.push_back(kv);
  return out;
}

double MaskSet::take_pattern_sq_norm() {
  at::Tensor sum;
  for (const auto& m : masks_)
    if (auto t = m->take_pattern_sq_norm(); t.defined()) sum = sum.defined() ? sum + t : t;
  return sum.defined() ? sum.item<double>() : 0.0;  // one device sync
}

std::vector<std::pair<std::string, at::Tensor>> MaskSet::named_state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& m : masks_)
    for (auto& kv : m->named_state()) out.push_back(kv);
  return out;
}

void MaskSet::load_state(const std::map<std::string, at::Tensor>& tensors, const std::string& source) {
  at::NoGradGuard no_grad;
  for (auto& [key, live] : named_state()) {
    auto it = tensors.find(key);
    core::check(it != tensors.end(), source, core::str("missing tensor '", key, "'"));
    core::check(it->second.sizes() == live.sizes(), source,
                core::str("tensor '", key, "' has shape ", it->second.sizes(), ", expected ", live.sizes()));
    live.copy_(it->second);
  }
}

}  // namespace patch::sparsity
