#include "train/train_options.h"

#include <string>

#include "core/error.h"
#include "sparsity/linear_mask.h"

namespace patch::train {

using core::str;

namespace {

sparsity::MaskSetOptions mask_set_options(const config::Config& cfg, at::Device device) {
  sparsity::MaskSetOptions mo;
  mo.mask.mode = sparsity::parse_mask_mode(cfg.get_string("mask.mode"));
  mo.mask.init_std = cfg.get_float("mask.init_std");
  mo.mask.seed = static_cast<uint64_t>(cfg.get_int("train.seed"));
  mo.mask.device = device;
  mo.mask.fused = cfg.get_string("mask.kernel") == "fused";
  mo.mask.compact = cfg.get_string("train.state") == "compact";
  const auto tile = cfg.get_int_list("mask.tile");
  mo.tile_rows = tile[0];
  mo.tile_cols = tile[1];
  mo.include = cfg.get_string_list("mask.include");
  mo.exclude = cfg.get_string_list("mask.exclude");
  return mo;
}

sparsity::SamplerSchedule schedule_options(const config::Config& cfg) {
  const auto tau24 = cfg.get_float_list("mask.tau_24"), sc24 = cfg.get_float_list("mask.scale_24");
  const auto taut = cfg.get_float_list("mask.tau_tile"), sct = cfg.get_float_list("mask.scale_tile");
  return {tau24[0], tau24[1], sc24[0], sc24[1], taut[0], taut[1], sct[0], sct[1],
          sparsity::parse_anneal(cfg.get_string("mask.anneal"))};
}

}  // namespace

TrainOptions train_options(const config::Config& cfg, at::Device device) {
  TrainOptions t;
  StepOptions& s = t.step;
  s.masks = mask_set_options(cfg, device);
  s.schedule = schedule_options(cfg);
  s.hard_24 = cfg.get_bool("mask.hard_24");
  s.hard_tile = cfg.get_bool("mask.hard_tile");
  s.budget = {cfg.get_float("mask.target_sparsity"), sparsity::parse_budget(cfg.get_string("mask.budget"))};
  s.steps = cfg.get_int("train.steps");
  s.micro_batch = cfg.get_int("train.micro_batch");
  s.global_batch = cfg.get_int("train.global_batch");
  s.lr = cfg.get_float("train.lr");
  s.min_lr_ratio = cfg.get_float("train.min_lr_ratio");
  s.warmup_steps = cfg.get_int("train.warmup_steps");
  s.grad_clip = cfg.get_float("train.grad_clip");
  s.lambda_sparsity = cfg.get_float("train.lambda_sparsity");
  s.lambda_weight = cfg.get_float("train.lambda_weight");
  s.distill = cfg.get_string("train.loss") == "kd";
  const auto betas = cfg.get_float_list("train.betas");
  s.adamw = {betas[0], betas[1], 1e-8, cfg.get_float("train.weight_decay")};
  s.cuda_graph = cfg.get_bool("train.cuda_graph");
  s.nproc = cfg.get_int("dist.nproc");
  t.seed = static_cast<uint64_t>(cfg.get_int("train.seed"));
  t.eval_every = cfg.get_int("train.eval_every");
  t.eval_blocks = cfg.get_int("train.eval_blocks");
  t.checkpoint_every = cfg.get_int("train.checkpoint_every");
  t.log_every = cfg.get_int("train.log_every");
  return t;
}

void check_step_options(const StepOptions& o, int world) {
  if (o.compact()) {
    // The 2:4 logits are updated inside the backward, once per backward pass.
    if (!o.masks.mask.fused) throw core::ConfigError("train.state: compact state needs mask.kernel=fused");
    if (o.global_batch != o.micro_batch)
      throw core::ConfigError(str("train.state: compact state updates inside the backward, so it needs one "
                                  "micro-batch per step (train.global_batch = train.micro_batch), got ",
                                  o.global_batch, " and ", o.micro_batch));
    if (o.lambda_weight > 0)
      throw core::ConfigError("train.state: compact state does not support train.lambda_weight > 0");
  }
  if (o.cuda_graph) {
    // Each condition keeps the step free of host reads and per-step host values.
    const auto need = [](bool ok, const std::string& what) {
      if (!ok) throw core::ConfigError("train.cuda_graph: needs " + what);
    };
    need(world <= 1 && o.nproc <= 1, "one process (dist.nproc=1)");
    need(o.masks.mask.fused, "mask.kernel=fused");
    need(o.lambda_weight == 0.0, "train.lambda_weight=0 (its factor changes every step)");
    need(o.masks.mask.device.is_cuda(), "model.device=cuda");
  }
  if (world <= 1) return;
  if (o.micro_batches() % world != 0)
    throw core::ConfigError(str("train.global_batch: ", o.micro_batches(), " micro-batches per step (",
                                o.global_batch, " / ", o.micro_batch, ") do not split evenly over ", world,
                                " ranks"));
  if (o.compact())
    throw core::ConfigError("train.state: compact state updates the 2:4 logits inside each rank's backward, "
                            "before gradients can be summed over ranks; use train.state=full with several ranks");
}

}  // namespace patch::train
