#include "train/bench.h"

#include <vector>

#include "core/tensor_utils.h"
#include "dist/dist.h"
#include "model/bench.h"
#include "model/decoder.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "sparsity/prior.h"
#include "train/mask_learner.h"

namespace patch::train {

StepOptions bench_step_options(StepOptions step, int64_t batch, int world) {
  step.micro_batch = batch;
  step.global_batch = batch * world;
  check_step_options(step, world);
  return step;
}

nlohmann::json bench_mask_step(const io::ModelConfig& shape, const MaskBenchOptions& o) {
  const at::Device device = o.step.masks.mask.device;
  model::DecoderOptions mo;
  mo.device = device;
  mo.dtype = o.dtype;
  mo.checkpointing = o.checkpointing;
  model::Decoder decoder = model::Decoder::random(shape, mo);

  const int world = o.group ? o.group->world() : 1;
  const StepOptions so = bench_step_options(o.step, o.batch, world);
  MaskLearner learner(decoder, so, o.group);
  if (so.masks.mask.mode == sparsity::MaskMode::kTile) {
    const double target = so.budget.target_sparsity;
    sparsity::apply_prior(learner.masks(), sparsity::magnitude_priors(learner.masks(), target), target,
                          so.budget.kind, {});
  }
  const std::vector<at::Tensor> ids = {
      at::randint(shape.vocab_size, {o.batch, o.seq}, at::TensorOptions().dtype(at::kLong).device(device))};
  int64_t step = 0;
  auto run_step = [&] { learner.step(step++ % so.steps, ids); };
  const auto ms = core::time_steps(run_step, device, o.warmup, o.iters, /*graph_step=*/so.cuda_graph);
  const double median = ms[ms.size() / 2];
  const auto tile = std::vector<int64_t>{so.masks.tile_rows, so.masks.tile_cols};
  nlohmann::json j = {{"mode", sparsity::mask_mode_name(so.masks.mask.mode)},
                      {"median_ms", median},
                      {"min_ms", ms.front()},
                      {"tokens_per_s", static_cast<double>(world * o.batch * o.seq) / (median / 1e3)},
                      {"ranks", world},
                      {"backend", o.group ? o.group->backend() : std::string("none")},
                      {"reduce_buckets", learner.reduce_stats().buckets},
                      {"reduce_overlapped", learner.reduce_stats().launched_in_backward},
                      {"peak_gib", core::peak_memory_gib(device)},
                      {"reserved_gib", core::reserved_memory_gib(device)},
                      {"batch", o.batch},
                      {"seq", o.seq},
                      {"tile", tile},
                      {"checkpointing", o.checkpointing},
                      {"cuda_graph", so.cuda_graph},
                      {"kernel", so.masks.mask.fused ? "fused" : "reference"},
                      {"state", so.compact() ? "compact" : "full"},
                      {"loss", so.distill ? "kd" : "ce"},
                      {"lambda_weight", so.lambda_weight},
                      {"dtype", core::dtype_name(o.dtype)},
                      {"device", device.str()},
                      {"masked_layers", learner.masks().size()},
                      {"iters", o.iters}};
  if (o.profile) j["profile"] = model::profile_kernels(run_step, device);
  return j;
}

}  // namespace patch::train
