#include "sparsity/mask_set.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
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
  flat_ = {};
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

// The density terms of all layers in one node: the forward sums count * T per
// layer from the cached step gates (the forward's own), the backward hands
// every layer dL/dS * count * soft (1 - soft) * k, the straight-through
// derivative LinearMask's gates carry. Per-layer ops would cost a few hundred
// small launches each way, all after the model's backward, with the GPU idle.
struct TileSumsFn : torch::autograd::Function<TileSumsFn> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::TensorList /*logits*/,
                            const MaskSet* set) {
    std::vector<at::Tensor> value, soft;
    std::vector<int64_t> rows, cols;
    for (const auto& m : set->masks_) {
      const at::Tensor& g = m->step_gates();
      value.push_back(g[0].reshape({-1}));
      soft.push_back(g[1].reshape({-1}));
      rows.push_back(g.size(1));
      cols.push_back(g.size(2));
    }
    const MaskSet::Flat& f = set->flat_;
    // Prefix sums in float64 keep the per-layer differences exact enough.
    const at::Tensor prefix = (at::cat(value).to(at::kDouble) * f.counts).cumsum(0);
    const at::Tensor ends = at::cat({at::zeros({1}, prefix.options()), prefix}).index_select(0, f.bounds);
    const at::Tensor soft_flat = at::cat(soft);
    ctx->save_for_backward({soft_flat, f.counts_logit, f.layer});
    ctx->saved_data["rows"] = rows;
    ctx->saved_data["cols"] = cols;
    ctx->saved_data["k"] = tile_k_value(set->state());
    return (ends.slice(0, 1) - ends.slice(0, 0, -1)).to(soft_flat.scalar_type());
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_out) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &soft = saved[0], &counts = saved[1], &layer = saved[2];
    const auto rows = ctx->saved_data["rows"].toIntVector(), cols = ctx->saved_data["cols"].toIntVector();
    const at::Tensor flat =
        times_tile_k(grad_out[0].index_select(0, layer) * counts * soft * (1.0 - soft), ctx->saved_data["k"]);
    torch::autograd::variable_list out;
    int64_t at = 0;
    for (size_t i = 0; i < rows.size(); ++i) {
      out.push_back(flat.slice(0, at, at + rows[i] * cols[i]).view({rows[i], cols[i]}));
      at += rows[i] * cols[i];
    }
    out.emplace_back();  // the MaskSet pointer
    return out;
  }
};

at::Tensor MaskSet::tile_sums() const {
  const auto& first = *masks_.front();
  const auto opts = first.tile_logits().options();
  if (!flat_.counts.defined()) {
    std::vector<at::Tensor> counts, layer;
    std::vector<int64_t> bounds{0}, block_ids;
    std::map<int64_t, int64_t> weights;
    int64_t n = 0;
    for (size_t i = 0; i < masks_.size(); ++i) {
      const at::Tensor& c = masks_[i]->tile_counts();
      counts.push_back(c.reshape({-1}).to(at::kDouble));
      layer.push_back(at::full({c.numel()}, static_cast<int64_t>(i), c.options().dtype(at::kLong)));
      bounds.push_back(n += c.numel());
      weights[masks_[i]->block()] += masks_[i]->grid().numel();
    }
    // blocks [B, layers]: 0.5 / (the block's weights) where the layer is in the block.
    at::Tensor blocks = at::zeros({static_cast<int64_t>(weights.size()), static_cast<int64_t>(masks_.size())},
                                  at::TensorOptions().dtype(at::kDouble));
    for (size_t i = 0; i < masks_.size(); ++i) {
      const auto b = weights.find(masks_[i]->block());
      blocks[std::distance(weights.begin(), b)][static_cast<int64_t>(i)] = 0.5 / static_cast<double>(b->second);
    }
    for (const auto& [b, w] : weights) block_ids.push_back(b);
    const at::Tensor all = at::cat(counts);
    flat_ = {all, all.to(opts.dtype()), at::cat(layer),
             at::tensor(bounds, at::TensorOptions().dtype(at::kLong)).to(opts.device()), blocks.to(opts), block_ids};
  }
  if (first.mode() == MaskMode::kMaskLLM) return at::zeros({static_cast<int64_t>(masks_.size())}, opts);
  std::vector<at::Tensor> logits;
  for (const auto& m : masks_) logits.push_back(m->tile_logits());
  return TileSumsFn::apply(at::TensorList(logits), this);
}

at::Tensor MaskSet::soft_density() const {
  core::check(!masks_.empty(), "MaskSet", "no masked layers");
  // A layer's density is 0.5 + 0.5 * S / numel (M24 keeps half of a group).
  return 0.5 + tile_sums().sum() * (0.5 / static_cast<double>(total_weights()));
}

std::map<int64_t, at::Tensor> MaskSet::block_soft_density() const {
  core::check(!masks_.empty(), "MaskSet", "no masked layers");
  const at::Tensor sums = tile_sums();  // builds flat_ on first use
  const at::Tensor density = 0.5 + at::mv(flat_.blocks, sums);
  std::map<int64_t, at::Tensor> out;
  for (size_t j = 0; j < flat_.block_ids.size(); ++j) out[flat_.block_ids[j]] = density[static_cast<int64_t>(j)];
  return out;
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

at::Tensor MaskSet::take_pattern_sq_norm() {
  at::Tensor sum;
  for (const auto& m : masks_)
    if (auto t = m->take_pattern_sq_norm(); t.defined()) sum = sum.defined() ? sum + t : t;
  if (!sum.defined()) {
    const auto device = masks_.empty() ? at::Device(at::kCPU) : masks_.front()->tile_logits().device();
    return at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  }
  return sum.to(at::kDouble);
}

void MaskSet::use_device_scalars(double grad_scale) {
  core::check(!masks_.empty() && masks_.front()->tile_logits().is_cuda() && opts_.mask.fused,
              "MaskSet", "device step values need fused masks on a CUDA device");
  auto& dev = state_->device;
  dev = at::zeros({static_cast<int64_t>(sizeof(StepScalars) / sizeof(float))},
                  masks_.front()->tile_logits().options().dtype(at::kFloat));
  dev.narrow(0, offsetof(StepScalars, grad_scale) / sizeof(float), 1).fill_(grad_scale);
  upload_step_scalars(step_scalars());
}

StepScalars MaskSet::step_scalars() const {
  const SamplerState& st = *state_;
  StepScalars s{};
  s.step_key = step_key(st.seed, st.step);
  // As the eager launches form them (mask_kernels_cuda.cu), so both agree bit for bit.
  s.scale_24 = static_cast<float>(st.scale_24);
  s.inv_tau_24 = static_cast<float>(1.0 / st.tau_24);
  s.scale_tile = static_cast<float>(st.scale_tile);
  s.inv_tau_tile = static_cast<float>(1.0 / st.tau_tile);
  s.k_tile = static_cast<float>(st.scale_tile / st.tau_tile);
  s.hard_24 = st.hard_24 ? 1 : 0;
  s.hard_tile = st.hard_tile ? 1 : 0;
  return s;
}

void MaskSet::upload_step_scalars(const StepScalars& s) {
  core::check(state_->device.defined(), "MaskSet", "use_device_scalars first");
  constexpr int64_t words = kUploadedScalarBytes / sizeof(float);
  // Pinned staging from the caching host allocator: it is not reused before
  // the copy has run, so the copy need not be waited for.
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
  std::memcpy(host.data_ptr(), &s, kUploadedScalarBytes);
  state_->device.narrow(0, 0, words).copy_(host, /*non_blocking=*/true);
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
