#include "train/finetune.h"

#include <c10/core/GradMode.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <random>
#include <sstream>
#include <utility>

#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/signals.h"
#include "data/corpus.h"
#include "data/dataset.h"
#include "io/safetensors.h"
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

constexpr const char* kStateFormat = "patch-finetune-state";

// Where a fine-tune stands between two steps.
struct FinetuneState {
  int64_t step = 0;  // steps done
  std::vector<double> losses;
  std::vector<int64_t> order;  // the sequences left of the current pass, taken from the back
  std::mt19937_64 rng;
};

void save_state(const FinetuneOptions& o, const std::vector<std::pair<std::string, at::Tensor>>& params,
                const AdamW& opt, const FinetuneState& st) {
  std::vector<std::pair<std::string, at::Tensor>> t;
  for (const auto& [name, p] : params) t.emplace_back(name, p.detach());
  for (const auto& e : opt.state()) t.push_back(e);
  t.emplace_back("losses", at::tensor(st.losses, at::kDouble));
  // The order, with a leading -1 so that an empty one is still a tensor of one element.
  std::vector<int64_t> order = {-1};
  order.insert(order.end(), st.order.begin(), st.order.end());
  t.emplace_back("order", at::tensor(order, at::kLong));
  std::ostringstream rng;
  rng << st.rng;
  io::write_safetensors(o.checkpoint, t,
                        {{"format", kStateFormat},
                         {"step", std::to_string(st.step)},
                         {"steps", std::to_string(o.steps)},
                         {"rng", rng.str()},
                         {"config", o.config}});
}

// The state of o.checkpoint into `params`, `opt` and `st`.
void load_state(const FinetuneOptions& o, const std::vector<std::pair<std::string, at::Tensor>>& params, AdamW& opt,
                FinetuneState& st) {
  const io::SafetensorsFile f(o.checkpoint);
  const auto& meta = f.metadata();
  auto value = [&](const char* key) {
    const auto it = meta.find(key);
    if (it == meta.end() || (std::string(key) == "format" && it->second != kStateFormat))
      throw core::Error(core::str(o.checkpoint, ": not a fine-tune checkpoint (no '", key, "')"));
    return it->second;
  };
  value("format");
  if (std::stoll(value("steps")) != o.steps)
    throw core::ConfigError(core::str("prune.finetune_steps: ", o.steps, " differs from ", value("steps"),
                                      " in the checkpoint ", o.checkpoint,
                                      "; a resumed run must be the same run (start a new one, or --overwrite)"));
  c10::NoGradGuard no_grad;
  std::map<std::string, at::Tensor> moments;
  for (const auto& [name, p] : params) {
    for (const char* suffix : {"", ".exp_avg", ".exp_avg_sq"}) {
      const std::string key = name + suffix;
      if (!f.contains(key)) throw core::Error(core::str(o.checkpoint, ": '", key, "' is missing"));
      const at::Tensor t = f.tensor(key);
      if (t.sizes() != p.sizes())
        throw core::Error(core::str(o.checkpoint, ": '", key, "' is ", t.sizes(), ", expected ", p.sizes()));
      if (*suffix == '\0') p.detach().copy_(t);
      else moments[key] = t;
    }
  }
  st.step = std::stoll(value("step"));
  opt.load_state(moments, st.step);
  const at::Tensor losses = f.tensor("losses").to(at::kDouble).contiguous();
  st.losses.assign(losses.data_ptr<double>(), losses.data_ptr<double>() + losses.numel());
  const at::Tensor order = f.tensor("order").to(at::kLong).contiguous();
  st.order.assign(order.data_ptr<int64_t>() + 1, order.data_ptr<int64_t>() + order.numel());
  std::istringstream rng(value("rng"));
  rng >> st.rng;
  if (static_cast<int64_t>(st.losses.size()) != st.step || !rng)
    throw core::Error(core::str(o.checkpoint, ": inconsistent fine-tune state"));
}

// Every masked layer's keep mask [out, in] (1 kept, 0 removed) as float32.
std::vector<std::pair<std::string, at::Tensor>> keep_masks(const maskfile::MaskFile& masks) {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& l : masks.layers) out.emplace_back(l.name, l.mask(at::kFloat));
  for (const auto& b : masks.bitmasks) out.emplace_back(b.name, b.mask(at::kFloat));
  return out;
}

}  // namespace

FinetuneOptions finetune_options(const config::Config& cfg) {
  FinetuneOptions o;
  o.steps = cfg.get_int("prune.finetune_steps");
  o.micro_batch = cfg.get_int("prune.micro_batch");
  o.lr = cfg.get_float("prune.finetune_lr");
  o.seed = static_cast<uint64_t>(cfg.get_int("prune.seed"));
  o.checkpoint_every = cfg.get_int("prune.finetune_checkpoint_every");
  o.config = cfg.tree().dump();
  return o;
}

const std::vector<std::string>& finetune_mutable_keys() {
  static const std::vector<std::string> keys = {"model.device", "model.checkpointing", "data.cache_dir",
                                                "mask.prior_cache", "prune.finetune_checkpoint_every"};
  return keys;
}

void require_finetune_data(const config::Config& cfg) {
  if (cfg.get_string_list("data.train").empty())
    throw core::ConfigError("data.train: the fine-tune (prune.finetune_steps) trains on text; give data.train "
                            "(--data FILE)");
}

at::Tensor finetune_windows(const config::Config& cfg, const text::Tokenizer& tok, int64_t count) {
  require_finetune_data(cfg);
  const int64_t seq = cfg.get_int("prune.calib_seq_len");
  // Windows of seq tokens: blocks of seq - 1 (BlockDataset's blocks hold one more).
  const data::BlockDataset ds(data::load_config_tokens(cfg, "data.train", tok, cfg.get_int("data.max_tokens")),
                              seq - 1);
  if (ds.num_blocks() == 0)
    throw core::Error(core::str("data.train: fewer tokens than one fine-tune window of prune.calib_seq_len = ", seq));
  std::vector<int64_t> all(static_cast<size_t>(ds.num_blocks()));
  for (int64_t i = 0; i < ds.num_blocks(); ++i) all[static_cast<size_t>(i)] = i;
  std::vector<int64_t> order = data::epoch_order(all, static_cast<uint64_t>(cfg.get_int("prune.seed")), 0);
  order.resize(static_cast<size_t>(std::min(count, ds.num_blocks())));
  const double epochs = static_cast<double>(count) / static_cast<double>(order.size());
  const size_t files = cfg.get_string_list("data.train").size();
  core::log::info(core::str("fine-tune: ", order.size(), " windows of ", seq, " tokens from data.train (", files,
                            files == 1 ? " file)" : " files)",
                            epochs > 1 ? core::str(", each seen ", epochs, " times") : std::string()));
  if (epochs > 2)
    core::log::warn(core::str("fine-tune: data.train holds ", ds.num_blocks(), " windows for ", count,
                              " (prune.finetune_steps x prune.micro_batch): more text, or fewer steps, keeps it "
                              "from learning them by heart"));
  return ds.blocks(order);
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
  FinetuneState st;
  st.rng.seed(o.seed);
  const bool checkpoints = !o.checkpoint.empty();
  if (checkpoints && o.resume && std::filesystem::exists(o.checkpoint)) {
    load_state(o, params, opt, st);
    core::log::info(core::str("finetune: resumed at step ", st.step, " of ", o.steps, " from ", o.checkpoint));
  }
  const int64_t warmup = std::max<int64_t>(1, o.steps / 10);
  core::Progress progress("finetune", static_cast<long>(o.steps));
  while (st.step < o.steps) {
    core::throw_if_stopped("finetune");
    std::vector<int64_t> rows;
    while (static_cast<int64_t>(rows.size()) < std::min(o.micro_batch, ids.size(0))) {
      if (st.order.empty()) {
        st.order.resize(static_cast<size_t>(ids.size(0)));
        for (int64_t i = 0; i < ids.size(0); ++i) st.order[static_cast<size_t>(i)] = i;
        std::shuffle(st.order.begin(), st.order.end(), st.rng);
      }
      rows.push_back(st.order.back());
      st.order.pop_back();
    }
    const auto batch = ids.index_select(0, at::tensor(rows, at::kLong)).to(device);
    at::Tensor loss = decoder.loss(batch);
    loss.backward();
    const double lr = o.lr * std::min(1.0, static_cast<double>(st.step + 1) / static_cast<double>(warmup));
    opt.step(lr);
    opt.zero_grad();
    st.losses.push_back(loss.item<double>());
    ++st.step;
    // Before the progress update, which throws once a signal came.
    const bool stopping = core::stop_signal() != 0;
    if (checkpoints && st.step < o.steps &&
        (stopping || (o.checkpoint_every > 0 && st.step % o.checkpoint_every == 0)))
      save_state(o, params, opt, st);
    progress.update(static_cast<long>(st.step), 0, core::str("loss ", st.losses.back()));
  }
  progress.finish();
  FinetuneResult r;
  r.losses = st.losses;
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
