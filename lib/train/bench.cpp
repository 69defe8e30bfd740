#include "train/bench.h"

#include <optional>
#include <vector>

#include "core/cuda_graph.h"
#include "core/error.h"
#include "core/tensor_utils.h"
#include "dist/dist.h"
#include "model/bench.h"
#include "model/decoder.h"
#include "sparsity/budget.h"
#include "sparsity/mask_set.h"
#include "sparsity/prior.h"
#include "train/optimizer.h"

namespace patch::train {

nlohmann::json bench_mask_step(const io::ModelConfig& shape, const MaskBenchOptions& o) {
  model::DecoderOptions mo;
  mo.device = o.device;
  mo.dtype = o.dtype;
  mo.checkpointing = o.checkpointing;
  model::Decoder decoder = model::Decoder::random(shape, mo);

  auto state = std::make_shared<sparsity::SamplerState>();
  sparsity::MaskSetOptions so;
  so.mask.mode = sparsity::parse_mask_mode(o.mode);
  so.mask.device = o.device;
  so.mask.fused = o.fused;
  so.mask.compact = o.compact;
  so.tile_rows = o.tile_rows;
  so.tile_cols = o.tile_cols;
  sparsity::MaskSet masks(so, state);
  std::vector<std::pair<std::string, at::Tensor>> weights;
  for (auto* lin : decoder.linears()) weights.emplace_back(lin->name(), lin->weight());
  masks.add_layers(weights, [&](const std::string& name, const std::shared_ptr<sparsity::LinearMask>& m) {
    decoder.linear(name)->set_provider(m);
  });
  if (so.mask.mode == sparsity::MaskMode::kTile)
    sparsity::apply_prior(masks, sparsity::magnitude_priors(masks, o.target_sparsity), o.target_sparsity,
                          sparsity::BudgetKind::kGlobal, {});
  MaskOptimizer opt(masks, {}, o.compact);

  const at::Tensor ids =
      at::randint(shape.vocab_size, {o.batch, o.seq}, at::TensorOptions().dtype(at::kLong).device(o.device));
  const int world = o.group ? o.group->world() : 1;
  std::optional<dist::GradReducer> reducer;
  if (world > 1) reducer.emplace(*o.group, opt.params_in_backward_order());
  std::optional<core::CudaGraph> graph;
  if (o.cuda_graph) {
    if (world > 1) throw core::ConfigError("train.cuda_graph: needs one process (dist.nproc=1)");
    graph.emplace(o.device);
    opt.use_device_scalars();
  }
  int64_t step = 0;
  auto backward = [&] {
    decoder.loss(ids).backward();
    if (reducer) reducer->finish();
    at::Tensor reg = sparsity::Budget{o.target_sparsity, sparsity::BudgetKind::kGlobal}.penalty(masks).second * 10.0;
    if (reg.requires_grad()) reg.backward();  // maskllm has no tile logits to pull
  };
  auto run_step = [&] {
    state->step = step++;
    opt.begin_step(1e-3);
    if (graph) {
      graph->run([&] {
        backward();
        opt.finish_step_on_device(1.0);
      });
      return;
    }
    if (reducer) reducer->arm();
    backward();
    opt.finish_step(1e-3, 1.0);
  };
  const auto ms =
      core::time_steps(run_step, o.device, o.warmup, o.iters, /*graph_step=*/graph.has_value());
  const double median = ms[ms.size() / 2];
  nlohmann::json j = {{"mode", o.mode},
          {"median_ms", median},
          {"min_ms", ms.front()},
          {"tokens_per_s", static_cast<double>(world * o.batch * o.seq) / (median / 1e3)},
          {"ranks", world},
          {"backend", o.group ? o.group->backend() : std::string("none")},
          {"reduce_buckets", reducer ? reducer->stats().buckets : 0},
          {"reduce_overlapped", reducer ? reducer->stats().launched_in_backward : 0},
          {"peak_gib", core::peak_memory_gib(o.device)},
          {"reserved_gib", core::reserved_memory_gib(o.device)},
          {"batch", o.batch},
          {"seq", o.seq},
          {"tile", {o.tile_rows, o.tile_cols}},
          {"checkpointing", o.checkpointing},
          {"cuda_graph", o.cuda_graph},
          {"kernel", o.fused ? "fused" : "reference"},
          {"state", o.compact ? "compact" : "full"},
          {"dtype", core::dtype_name(o.dtype)},
          {"device", o.device.str()},
          {"masked_layers", masks.size()},
          {"iters", o.iters}};
  if (o.profile) j["profile"] = model::profile_kernels(run_step, o.device);
  return j;
}

}  // namespace patch::train
