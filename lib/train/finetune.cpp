#include "train/finetune.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <memory>
#include <random>
#include <utility>

#include "core/error.h"
#include "core/progress.h"
#include "core/signals.h"
#include "maskfile/apply.h"
#include "train/optimizer.h"

namespace patch::train {
namespace {

// W' ⊙ M in the compute dtype, differentiable in W' (float32).
class KeptWeight : public model::WeightProvider {
 public:
  KeptWeight(at::Tensor param, at::Tensor keep) : param_(std::move(param)), keep_(std::move(keep)) {}
  at::Tensor effective_weight(const at::Tensor& weight) override {
    return (param_ * keep_).to(weight.scalar_type());
  }

 private:
  at::Tensor param_, keep_;
};

// Every masked layer's keep mask [out, in] (1 kept, 0 removed) as float32.
std::vector<std::pair<std::string, at::Tensor>> keep_masks(const maskfile::MaskFile& masks) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& l : masks.layers) out.emplace_back(l.name, l.mask(at::kFloat));
  for (const auto& b : masks.bitmasks) out.emplace_back(b.name, b.mask(at::kFloat));
  return out;
}

}  // namespace

FinetuneOptions finetune_options(const config::Config& cfg) {
  return {cfg.get_int("prune.finetune_steps"), cfg.get_int("prune.micro_batch"), cfg.get_float("prune.finetune_lr"),
          static_cast<uint64_t>(cfg.get_int("prune.seed"))};
}

maskfile::MaskFile all_kept(model::Decoder& decoder) {
  maskfile::MaskFile file;
  file.meta.structure = "unstructured";
  file.meta.mode = "oneshot";
  for (auto* lin : decoder.linears()) {
    const int64_t out = lin->weight().size(0), in = lin->weight().size(1);
    file.bitmasks.push_back({lin->name(), out, in, maskfile::pack_bits(at::ones({out, in}, at::kByte))});
  }
  return file;
}

FinetuneResult finetune_kept_weights(model::Decoder& decoder, const maskfile::MaskFile& masks,
                                     const std::map<std::string, at::Tensor>& start, const at::Tensor& ids,
                                     const FinetuneOptions& o) {
  core::check(ids.dim() == 2 && ids.size(0) > 0, "finetune", "needs token windows [n, seq]");
  core::check(o.steps > 0 && o.micro_batch > 0, "finetune", "needs steps > 0 and micro_batch > 0");
  const auto device = decoder.options().device;
  std::vector<std::pair<std::string, at::Tensor>> params;  // "<layer>.weight" -> W' (float32, trained)
  std::vector<std::pair<std::string, at::Tensor>> keeps;
  for (auto& [name, keep] : keep_masks(masks)) {
    auto* lin = decoder.linear(name);
    core::check(lin != nullptr, "finetune", "layer '" + name + "' of the masks is not a linear of the model");
    const auto it = start.find(name + ".weight");
    const at::Tensor w0 = it != start.end() ? it->second : lin->weight();
    const auto k = keep.to(device);
    auto p = (w0.to(device, at::kFloat) * k).detach().requires_grad_(true);
    lin->set_provider(std::make_shared<KeptWeight>(p, k));
    params.emplace_back(name + ".weight", p);
    keeps.emplace_back(name + ".weight", k);
  }
  AdamW opt(params, AdamWOptions{});
  FinetuneResult r;
  std::mt19937_64 rng(o.seed);
  std::vector<int64_t> order;
  const int64_t warmup = std::max<int64_t>(1, o.steps / 10);
  core::Progress progress("finetune", static_cast<long>(o.steps));
  for (int64_t step = 0; step < o.steps; ++step) {
    core::throw_if_stopped("finetune");
    std::vector<int64_t> rows;
    while (static_cast<int64_t>(rows.size()) < std::min(o.micro_batch, ids.size(0))) {
      if (order.empty()) {
        order.resize(static_cast<size_t>(ids.size(0)));
        for (int64_t i = 0; i < ids.size(0); ++i) order[static_cast<size_t>(i)] = i;
        std::shuffle(order.begin(), order.end(), rng);
      }
      rows.push_back(order.back());
      order.pop_back();
    }
    const auto batch = ids.index_select(0, at::tensor(rows, at::kLong)).to(device);
    at::Tensor loss = decoder.loss(batch);
    loss.backward();
    const double lr = o.lr * std::min(1.0, static_cast<double>(step + 1) / static_cast<double>(warmup));
    opt.step(lr);
    opt.zero_grad();
    r.losses.push_back(loss.item<double>());
    progress.update(static_cast<long>(step + 1), 0, core::str("loss ", r.losses.back()));
  }
  progress.finish();
  c10::NoGradGuard no_grad;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto w = (params[i].second * keeps[i].second).detach();
    r.weights[params[i].first] = w.cpu();
    const std::string layer = params[i].first.substr(0, params[i].first.size() - 7);
    decoder.linear(layer)->set_provider(std::make_shared<maskfile::FixedWeightProvider>(
        w.to(decoder.linear(layer)->weight().scalar_type())));
  }
  return r;
}

}  // namespace patch::train
