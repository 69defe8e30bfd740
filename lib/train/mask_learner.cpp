#include "train/mask_learner.h"

#include <c10/core/GradMode.h>

#include <cmath>
#include <string>
#include <utility>

#include "core/error.h"
#include "sparsity/linear_mask.h"

namespace patch::train {

MaskLearner::MaskLearner(model::Decoder& model, const StepOptions& options, dist::Group* group)
    : model_(model), options_(options), group_(group), state_(std::make_shared<sparsity::SamplerState>()) {
  state_->seed = options_.masks.mask.seed;
  state_->hard_24 = options_.hard_24;
  state_->hard_tile = options_.hard_tile;
  options_.schedule.apply(*state_, 0.0);
  masks_ = std::make_unique<sparsity::MaskSet>(options_.masks, state_);
  std::vector<std::pair<std::string, at::Tensor>> weights;
  for (auto* lin : model_.linears()) weights.emplace_back(lin->name(), lin->weight());
  masks_->add_layers(weights, [&](const std::string& name, const std::shared_ptr<sparsity::LinearMask>& m) {
    model_.linear(name)->set_provider(m);
  });
  if (masks_->size() == 0) throw core::ConfigError("mask.include: the patterns select no linear layer of the model");
  {
    c10::NoGradGuard no_grad;
    for (size_t i = 0; i < masks_->size(); ++i)
      weight_norm_total_ += masks_->weight(i).to(at::kFloat).norm().item<double>();
  }
  opt_ = std::make_unique<MaskOptimizer>(*masks_, options_.adamw, options_.compact());
}

MaskLearner::~MaskLearner() = default;

int64_t MaskLearner::micro_batches_per_rank() const {
  return options_.micro_batches() / (group_ ? group_->world() : 1);
}

int64_t MaskLearner::first_micro_batch() const { return (group_ ? group_->rank() : 0) * micro_batches_per_rank(); }

void MaskLearner::attach() {
  for (const auto& m : masks_->masks()) model_.linear(m->name())->set_provider(m);
}

void MaskLearner::detach() {
  for (const auto& m : masks_->masks()) model_.linear(m->name())->set_provider(nullptr);
}

double MaskLearner::hard_density() const {
  int64_t dense = 0;
  for (const auto& m : masks_->masks()) {
    auto tiles = m->hard_tiles().to(at::kLong).cpu();
    dense += (tiles * m->grid().counts()).sum().item<int64_t>();
  }
  const double total = static_cast<double>(masks_->total_weights());
  return (static_cast<double>(dense) + 0.5 * (total - static_cast<double>(dense))) / total;
}

at::Tensor MaskLearner::lm_loss(const at::Tensor& ids) {
  return options_.distill ? model_.distill_loss(ids, model_.teacher_hidden(ids)) : model_.loss(ids);
}

at::Tensor MaskLearner::backward_micro_batches(const std::vector<at::Tensor>& ids, bool reduce) {
  // Each micro-batch's mean loss counts 1 / n of the step, n over all ranks.
  const auto n = static_cast<double>(options_.micro_batches());
  at::Tensor sum;  // read once after the micro-batches: no device sync between them
  for (size_t k = 0; k < ids.size(); ++k) {
    const at::Tensor loss = lm_loss(ids[k]);
    if (reduce && k + 1 == ids.size()) reducer_->arm();
    (loss / n).backward();
    const at::Tensor part = loss.detach().to(at::kDouble) / n;
    sum = sum.defined() ? sum + part : part;
  }
  return sum;
}

at::Tensor MaskLearner::weight_term() const {
  at::Tensor kept = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(options_.masks.mask.device));
  for (size_t i = 0; i < masks_->size(); ++i)
    kept = kept + masks_->masks()[i]->weight_term(masks_->weight(i)).sqrt();
  return kept / weight_norm_total_;
}

StepStats MaskLearner::step(int64_t step, const std::vector<at::Tensor>& micro_batches, const Inspect& before_update) {
  if (static_cast<int64_t>(micro_batches.size()) != micro_batches_per_rank())
    throw core::Error(core::str("mask step: ", micro_batches.size(), " micro-batches given, this rank runs ",
                                micro_batches_per_rank()));
  const int64_t steps = options_.steps;
  const double frac = steps > 1 ? static_cast<double>(step) / static_cast<double>(steps - 1) : 1.0;
  options_.schedule.apply(*state_, frac);
  state_->step = step;
  const double lr = lr_at(step, steps, options_.warmup_steps, options_.lr, options_.min_lr_ratio);
  if (group_ && group_->world() > 1 && !reducer_) reducer_.emplace(*group_, opt_->params_in_backward_order());
  if (options_.cuda_graph) {
    if (before_update) throw core::Error("mask step: a CUDA-graph step cannot stop before its update");
    if (!graph_) {
      opt_->use_device_scalars();
      graph_.emplace(options_.masks.mask.device);
    }
    return graph_step(lr, micro_batches);
  }
  return eager_step(step, lr, micro_batches, before_update);
}

StepStats MaskLearner::eager_step(int64_t step, double lr, const std::vector<at::Tensor>& micro_batches,
                                  const Inspect& before_update) {
  opt_->begin_step(lr);
  std::vector<at::Tensor> ids;
  for (const auto& b : micro_batches) ids.push_back(b.to(options_.masks.mask.device));
  StepStats s;
  s.lr = lr;
  s.ce = backward_micro_batches(ids, reducer_.has_value()).item<double>();
  if (reducer_) {
    // Summed before the regularizers' backward, which every rank computes whole.
    reducer_->finish();
    s.ce = group_->allreduce_sum(s.ce);
  }
  // Regularizers: density towards the budget, minus the kept-weight term.
  auto [density, reg] = options_.budget.penalty(*masks_);
  at::Tensor total_reg = reg * options_.lambda_sparsity;
  const double w_coef =
      options_.lambda_weight * (1.0 - static_cast<double>(step) / static_cast<double>(options_.steps));
  if (w_coef > 0) {
    const at::Tensor wt = weight_term();
    s.weight_term = wt.item<double>();
    total_reg = total_reg - w_coef * wt;
  }
  if (total_reg.requires_grad()) total_reg.backward();  // maskllm has no tile logit to pull
  s.reg = reg.item<double>();
  s.density = density.item<double>();
  s.loss = s.ce + options_.lambda_sparsity * s.reg - w_coef * s.weight_term;
  if (before_update) before_update();
  if (!std::isfinite(s.loss)) return s;
  s.grad_norm = opt_->finish_step(lr, options_.grad_clip);
  s.updated = true;
  return s;
}

StepStats MaskLearner::graph_step(double lr, const std::vector<at::Tensor>& micro_batches) {
  opt_->begin_step(lr);
  // The step's micro-batches go into fixed device buffers, which the graph reads.
  for (size_t k = 0; k < micro_batches.size(); ++k) {
    const at::Tensor& ids = micro_batches[k];
    if (!graph_ids_.defined())
      graph_ids_ = at::empty({static_cast<int64_t>(micro_batches.size()), ids.size(0), ids.size(1)},
                             ids.options().device(options_.masks.mask.device));
    graph_ids_[static_cast<int64_t>(k)].copy_(ids);
  }
  graph_->run([&] {
    std::vector<at::Tensor> ids;
    for (int64_t k = 0; k < graph_ids_.size(0); ++k) ids.push_back(graph_ids_[k]);
    const at::Tensor ce = backward_micro_batches(ids, /*reduce=*/false);
    auto [density, reg] = options_.budget.penalty(*masks_);
    const at::Tensor total_reg = reg * options_.lambda_sparsity;
    if (total_reg.requires_grad()) total_reg.backward();
    // Detached: an autograd graph kept alive past the step would keep its
    // leaves' gradient accumulators, and with them the eager run's stream.
    graph_out_ = {ce, reg.detach(), density.detach(), opt_->finish_step_on_device(options_.grad_clip)};
  });
  StepStats s;
  s.lr = lr;
  s.ce = graph_out_.ce.item<double>();
  s.reg = graph_out_.reg.item<double>();
  s.density = graph_out_.density.item<double>();
  s.loss = s.ce + options_.lambda_sparsity * s.reg;
  s.grad_norm = graph_out_.norm.item<double>();
  s.updated = true;
  return s;
}

}  // namespace patch::train
