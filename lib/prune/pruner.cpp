#include "prune/pruner.h"

#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <functional>

#include "core/strings.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/signals.h"
#include "core/paths.h"
#include "data/corpus.h"
#include "data/dataset.h"
#include "io/safetensors.h"
#include "maskfile/apply.h"
#include "sparsity/linear_mask.h"
#include "sparsity/mask_set.h"
#include "sparsity/patterns.h"

namespace patch::prune {
namespace {


// W * keep with keep held as bits (1/16 of a bf16 weight), so that a pruned
// model costs little more memory than the dense one.
class KeepBits : public model::WeightProvider {
 public:
  explicit KeepBits(const at::Tensor& keep) : in_(keep.size(1)) {
    const int64_t pad = (8 - in_ % 8) % 8;
    auto k = keep.to(at::kByte);
    bits_ = {"", keep.size(0), in_ + pad, maskfile::pack_bits(pad ? at::constant_pad_nd(k, {0, pad}) : k)};
  }
  at::Tensor effective_weight(const at::Tensor& w) override {
    return w * bits_.mask(w.scalar_type()).narrow(1, 0, in_);
  }

 private:
  int64_t in_;
  maskfile::BitmaskLayer bits_;
};

struct LayerSpec {
  model::LinearImpl* lin = nullptr;
  int64_t block = -1;
  sparsity::TileGrid grid;
  LayerTarget target;
};

// Called once per pruned layer with its keep mask (bool [out, in], on the
// model's device) and, for SparseGPT, the full result.
using Sink = std::function<void(const LayerSpec&, const at::Tensor& keep, const SparseGPTResult*)>;

// q/k/v see the same input, as do gate/up: one set of statistics serves each group.
std::string stats_key(const std::string& name) {
  static const std::pair<const char*, const char*> kShared[] = {
      {".self_attn.q_proj", ".self_attn.qkv"}, {".self_attn.k_proj", ".self_attn.qkv"},
      {".self_attn.v_proj", ".self_attn.qkv"}, {".mlp.gate_proj", ".mlp.gate_up"},
      {".mlp.up_proj", ".mlp.gate_up"}};
  for (const auto& [from, to] : kShared)
    if (core::ends_with(name, from)) return name.substr(0, name.size() - std::string(from).size()) + to;
  return name;
}

std::vector<LayerSpec> select_layers(model::Decoder& decoder, const PruneOptions& o) {
  std::vector<LayerSpec> specs;
  std::vector<std::pair<int64_t, int64_t>> shapes;
  for (auto* lin : decoder.linears()) shapes.emplace_back(lin->weight().size(0), lin->weight().size(1));
  sparsity::check_tile_fits(o.tile_rows, o.tile_cols, shapes);
  for (auto* lin : decoder.linears()) {
    const auto& name = lin->name();
    bool in = false;
    for (const auto& g : o.include) in = in || sparsity::glob_match(g, name);
    for (const auto& g : o.exclude) in = in && !sparsity::glob_match(g, name);
    if (!in) continue;
    const auto& w = lin->weight();
    specs.push_back({lin, model::Decoder::block_index(name),
                     sparsity::TileGrid(w.size(0), w.size(1), o.tile_rows, o.tile_cols), {}});
  }
  if (specs.empty()) throw core::ConfigError("mask.include: the patterns select no linear layer of the model");
  return specs;
}

void prune_layer(const LayerSpec& spec, const InputStats* stats, const PruneOptions& o, bool update,
                 const Sink& sink) {
  const auto& w = spec.lin->weight();
  at::Tensor keep;
  SparseGPTResult sg;
  const SparseGPTResult* sg_ptr = nullptr;
  switch (o.method) {
    case Method::kMagnitude:
      keep = keep_from_score(magnitude_score(w), spec.target, /*per_row=*/false);
      break;
    case Method::kWanda:
      keep = keep_from_score(wanda_score(w, *stats), spec.target, /*per_row=*/true);
      break;
    case Method::kSparseGPT: {
      SparseGPTOptions so = o.sparsegpt;
      so.update_weights = update;
      sg = sparsegpt(w, stats->hessian, spec.target, so, spec.lin->name());
      keep = sg.keep;
      sg_ptr = &sg;
      break;
    }
  }
  if (sg.weight.defined())
    spec.lin->set_provider(std::make_shared<maskfile::FixedWeightProvider>(sg.weight.to(w.scalar_type())));
  else
    spec.lin->set_provider(std::make_shared<KeepBits>(keep));
  sink(spec, keep, sg_ptr);
}

// One block-by-block pass: every spec's layer is pruned to its target, in
// order, and keeps its pruned weight as provider.
void run_pass(model::Decoder& decoder, const at::Tensor& calib, const std::vector<LayerSpec>& specs,
              const PruneOptions& o, bool update, const std::string& label, const Sink& sink) {
  at::NoGradGuard no_grad;
  for (const auto& s : specs) s.lin->set_provider(nullptr);
  if (o.method == Method::kMagnitude) {
    for (const auto& s : specs) prune_layer(s, nullptr, o, update, sink);
    return;
  }
  core::check(calib.defined() && calib.dim() == 2 && calib.size(0) > 0, "prune",
              "calibration token ids [n, seq] are required by wanda and sparsegpt");
  const auto device = decoder.options().device;
  const auto stats_opts = at::TensorOptions().device(device).dtype(
      decoder.options().dtype == at::kDouble ? at::kDouble : at::kFloat);
  std::vector<at::Tensor> hidden;
  for (int64_t b = 0; b < calib.size(0); b += o.micro_batch)
    hidden.push_back(decoder.embed(calib.slice(0, b, std::min(b + o.micro_batch, calib.size(0))).to(device)));

  int64_t last_block = -1;
  for (const auto& s : specs) last_block = std::max(last_block, s.block);
  core::Progress progress(label, static_cast<long>(last_block + 1));
  for (int64_t blk = 0; blk <= last_block; ++blk) {
    std::vector<const LayerSpec*> here;
    for (const auto& s : specs)
      if (s.block == blk) here.push_back(&s);
    if (!here.empty()) {
      std::map<std::string, InputStats> stats;
      for (const auto* s : here) {
        const auto key = stats_key(s->lin->name());
        if (stats.count(key)) continue;
        auto& st = stats.emplace(key, InputStats(s->lin->weight().size(1), o.method == Method::kSparseGPT, stats_opts))
                       .first->second;
        s->lin->set_input_observer([&st](const at::Tensor& x) { st.add(x); });
      }
      for (const auto& h : hidden) {
        core::throw_if_stopped("calibration");
        decoder.run_block(blk, h);
      }
      for (const auto* s : here) s->lin->set_input_observer({});
      for (const auto* s : here) prune_layer(*s, &stats.at(stats_key(s->lin->name())), o, update, sink);
    }
    if (blk < last_block)
      for (auto& h : hidden) {
        core::throw_if_stopped("calibration");
        h = decoder.run_block(blk, h);
      }
    progress.update(static_cast<long>(blk + 1));
  }
  progress.finish();
}

at::Tensor survivors(const sparsity::TileGrid& grid, const at::Tensor& keep) {
  auto kept = grid.reduce_sum(keep.to(at::kFloat));
  return (kept / grid.counts().to(kept.device(), at::kFloat)).cpu();
}

// Per tile, the survivor fraction of an unstructured prune at the target.
std::vector<sparsity::TileScores> tile_scores(model::Decoder& decoder, const at::Tensor& calib,
                                              std::vector<LayerSpec> specs, const PruneOptions& o) {
  std::vector<sparsity::TileScores> scores;
  for (auto& s : specs) s.target = {Structure::kUnstructured, o.target_sparsity, s.grid, {}, {}};
  run_pass(decoder, calib, specs, o, /*update=*/false, "prune: tile scores",
           [&](const LayerSpec& s, const at::Tensor& keep, const SparseGPTResult*) {
             scores.push_back({s.grid, survivors(s.grid, keep), s.block});
           });
  return scores;
}

// The 2:4 pattern of a hybrid/2:4 keep mask; groups in dense tiles (all kept)
// take the best pattern by |W|, as the format asks for a valid index everywhere.
at::Tensor patterns_from_keep(const LayerSpec& s, const at::Tensor& keep) {
  auto dense_el = s.grid.expand(s.target.tile_dense.to(keep.device(), at::kFloat)).ne(0);
  auto fallback = sparsity::expand_patterns(sparsity::best_patterns(magnitude_score(s.lin->weight()))).to(at::kBool);
  return sparsity::patterns_of(at::where(dense_el, fallback, keep)).cpu();
}

}  // namespace

at::Tensor calibration_ids(const data::TokenStream& tokens, const CalibrationOptions& opts) {
  core::check(opts.samples > 0 && opts.seq_len > 1, "calibration",
              core::str("need samples > 0 and seq_len > 1, got ", opts.samples, " x ", opts.seq_len));
  data::BlockDataset ds(tokens, opts.seq_len);
  if (ds.num_blocks() == 0)
    throw core::Error(core::str("calibration: the data holds ", tokens.size(), " tokens, fewer than one window of ",
                          opts.seq_len + 1));
  std::vector<int64_t> all(static_cast<size_t>(ds.num_blocks()));
  for (int64_t i = 0; i < ds.num_blocks(); ++i) all[static_cast<size_t>(i)] = i;
  auto order = data::epoch_order(all, opts.seed, 0);
  if (ds.num_blocks() < opts.samples)
    core::log::warn(core::str("calibration: only ", ds.num_blocks(), " windows of ", opts.seq_len, " tokens (asked for ",
                        opts.samples, ")"));
  order.resize(static_cast<size_t>(std::min(opts.samples, ds.num_blocks())));
  return ds.blocks(order).narrow(1, 0, opts.seq_len).contiguous();
}

void require_calibration_data(const config::Config& cfg) {
  if (cfg.get_string_list("data.train").empty())
    throw core::ConfigError("data.train: wanda and sparsegpt need calibration text (use --data FILE)");
}

at::Tensor calibration_from_config(const config::Config& cfg, const text::Tokenizer& tok) {
  require_calibration_data(cfg);
  auto files = cfg.get_string_list("data.train");
  const auto co = calibration_options(cfg);
  auto calib = calibration_ids(data::load_tokens(core::resolve_path(files.front()), tok, data::data_options(cfg)), co);
  core::log::info(core::str("calibration: ", calib.size(0), " sequences of ", calib.size(1), " tokens from ",
                            files.front()));
  return calib;
}

namespace {

// The layers of a given mask file, each with its mask as the fixed target.
std::vector<LayerSpec> fixed_layers(model::Decoder& decoder, const maskfile::MaskFile& file) {
  std::vector<LayerSpec> specs;
  const std::string where = file.path.empty() ? std::string("model.masks") : file.path;
  auto add = [&](const std::string& name, const at::Tensor& keep, LayerTarget target) {
    model::LinearImpl* lin = decoder.linear(name);
    if (!lin) throw core::Error(core::str(where, ": layer '", name, "' is not a linear layer of the model"));
    const auto& w = lin->weight();
    if (keep.size(0) != w.size(0) || keep.size(1) != w.size(1))
      throw core::Error(core::str(where, ": layer '", name, "' has a mask [", keep.size(0), ", ", keep.size(1),
                                  "] for a weight [", w.size(0), ", ", w.size(1), "]"));
    target.fixed_keep = keep.to(w.device(), at::kBool);
    specs.push_back({lin, model::Decoder::block_index(name), target.grid, target});
  };
  for (const auto& l : file.layers) add(l.name, l.mask(at::kByte), {Structure::kHybrid, 0.5, l.grid, l.tile_dense, {}});
  for (const auto& b : file.bitmasks) {
    sparsity::TileGrid grid(b.out, b.in, b.out, b.in);
    add(b.name, b.mask(at::kByte), {Structure::kUnstructured, 0.0, grid, {}, {}});
  }
  // Block order, as the pass goes.
  std::stable_sort(specs.begin(), specs.end(), [](const LayerSpec& a, const LayerSpec& b) { return a.block < b.block; });
  return specs;
}

// SparseGPT's update of the kept weights under the file's masks, block by block.
PruneResult reconstruct(model::Decoder& decoder, const at::Tensor& calib, const PruneOptions& o) {
  core::check(o.method == Method::kSparseGPT && o.sparsegpt.update_weights, "prune",
              "reconstruction under given masks is SparseGPT's weight update (prune.method=sparsegpt, "
              "prune.update_weights=true)");
  PruneResult result;
  result.masks = *o.fixed_masks;
  result.calibration_passes = 1;
  run_pass(decoder, calib, fixed_layers(decoder, *o.fixed_masks), o, /*update=*/true, "prune: reconstruct",
           [&](const LayerSpec& s, const at::Tensor&, const SparseGPTResult* sg) {
             result.percdamp[s.lin->name()] = sg->percdamp;
             result.weights[s.lin->name() + ".weight"] = sg->weight.cpu();
           });
  return result;
}

}  // namespace

PruneResult prune_model(model::Decoder& decoder, const at::Tensor& calib, const PruneOptions& o) {
  if (o.fixed_masks) return reconstruct(decoder, calib, o);
  auto specs = select_layers(decoder, o);
  PruneResult result;
  auto& file = result.masks;
  file.meta.mode = "oneshot";
  file.meta.method = method_name(o.method);
  file.meta.tile_rows = o.tile_rows;
  file.meta.tile_cols = o.tile_cols;
  file.meta.target_sparsity = o.structure == Structure::k24 ? 0.5 : o.target_sparsity;
  file.meta.structure = o.structure == Structure::kUnstructured ? "unstructured" : "hybrid";
  const bool update = o.method == Method::kSparseGPT && o.sparsegpt.update_weights;

  for (auto& s : specs) {
    if (o.structure == Structure::kUnstructured) {
      core::check(s.grid.in() % 8 == 0, s.lin->name(), "unstructured masks need in_features a multiple of 8");
      s.target = {Structure::kUnstructured, o.target_sparsity, s.grid, {}, {}};
    } else {
      s.target = {o.structure, 0.5, s.grid, at::zeros({s.grid.rows(), s.grid.cols()}, at::kByte), {}};
    }
  }
  if (o.structure == Structure::kHybrid) {
    const bool calibrated = o.method != Method::kMagnitude;
    auto dense = sparsity::select_dense_tiles(tile_scores(decoder, calib, specs, o), o.target_sparsity, o.budget);
    for (size_t i = 0; i < specs.size(); ++i) specs[i].target.tile_dense = dense[i];
    result.calibration_passes += calibrated ? 1 : 0;
  }
  result.calibration_passes += o.method != Method::kMagnitude ? 1 : 0;

  run_pass(decoder, calib, specs, o, update, "prune: " + method_name(o.method),
           [&](const LayerSpec& s, const at::Tensor& keep, const SparseGPTResult* sg) {
             const auto& name = s.lin->name();
             if (o.structure == Structure::kUnstructured) {
               file.bitmasks.push_back({name, s.grid.out(), s.grid.in(), maskfile::pack_bits(keep).cpu()});
             } else {
               file.layers.push_back({name, s.grid, s.block, s.target.tile_dense.cpu(), patterns_from_keep(s, keep)});
             }
             if (sg) result.percdamp[name] = sg->percdamp;
             if (sg && sg->weight.defined()) result.weights[name + ".weight"] = sg->weight.cpu();
           });
  file.meta.achieved_sparsity = file.sparsity();
  return result;
}

std::map<std::string, sparsity::Prior> oneshot_priors(model::Decoder& decoder, const at::Tensor& calib,
                                                      const PruneOptions& o) {
  auto specs = select_layers(decoder, o);
  std::map<std::string, sparsity::Prior> priors;
  auto scores = tile_scores(decoder, calib, specs, o);
  for (auto& s : specs) s.target = {Structure::k24, 0.5, s.grid, at::zeros({s.grid.rows(), s.grid.cols()}, at::kByte), {}};
  size_t i = 0;
  run_pass(decoder, calib, specs, o, /*update=*/false, "prior: 2:4 " + method_name(o.method),
           [&](const LayerSpec& s, const at::Tensor& keep, const SparseGPTResult*) {
             priors[s.lin->name()] = {patterns_from_keep(s, keep), scores[i++].score};
           });
  for (const auto& s : specs) s.lin->set_provider(nullptr);
  return priors;
}

void save_priors(const std::string& path, const std::map<std::string, sparsity::Prior>& priors) {
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (const auto& [name, p] : priors) {
    tensors.emplace_back(name + ".pattern", p.pattern.to(at::kCPU, at::kByte));
    tensors.emplace_back(name + ".tile_score", p.tile_score.to(at::kCPU, at::kFloat));
  }
  io::write_safetensors(path, tensors, {{"format", "patch-priors"}});
}

std::map<std::string, sparsity::Prior> load_priors(const std::string& path) {
  io::SafetensorsFile f(path);
  std::map<std::string, sparsity::Prior> priors;
  const std::string suffix = ".pattern";
  for (const auto& e : f.entries()) {
    if (e.name.size() <= suffix.size() || e.name.compare(e.name.size() - suffix.size(), suffix.size(), suffix) != 0)
      continue;
    const std::string name = e.name.substr(0, e.name.size() - suffix.size());
    core::check(f.contains(name + ".tile_score"), path, core::str("no tile_score for layer '", name, "'"));
    priors[name] = {f.tensor(e.name).clone(), f.tensor(name + ".tile_score").clone()};
  }
  return priors;
}

PruneOptions prune_options(const config::Config& cfg) {
  PruneOptions o;
  o.method = parse_method(cfg.get_string("prune.method"));
  o.structure = parse_structure(cfg.get_string("prune.pattern"));
  o.target_sparsity = cfg.get_float("mask.target_sparsity");
  auto tile = cfg.get_int_list("mask.tile");
  o.tile_rows = tile[0];
  o.tile_cols = tile[1];
  o.budget = sparsity::parse_budget(cfg.get_string("mask.budget"));
  o.include = cfg.get_string_list("mask.include");
  o.exclude = cfg.get_string_list("mask.exclude");
  o.sparsegpt.percdamp = cfg.get_float("prune.percdamp");
  o.sparsegpt.blocksize = cfg.get_int("prune.blocksize");
  o.sparsegpt.update_weights = cfg.get_bool("prune.update_weights");
  o.sparsegpt.refine_iters = cfg.get_int("prune.refine_iters");
  o.micro_batch = cfg.get_int("prune.micro_batch");
  if (o.sparsegpt.blocksize % 4 != 0)
    throw core::ConfigError(core::str("prune.blocksize: ", o.sparsegpt.blocksize, " is not a multiple of 4"));
  return o;
}

CalibrationOptions calibration_options(const config::Config& cfg) {
  return {cfg.get_int("prune.calib_samples"), cfg.get_int("prune.calib_seq_len"),
          static_cast<uint64_t>(cfg.get_int("prune.seed"))};
}

}  // namespace patch::prune
