// The end-to-end fine-tune of the kept weights (train::finetune_kept_weights).
// Oracle: AdamW's first step from zero moments moves every parameter by
// lr * g / (|g| + eps), i.e. lr against the sign of its gradient; the
// gradient of the LM loss with respect to W' is taken here by autograd through
// the masked model (the decoder's loss is checked against transformers
// elsewhere). Removed weights have no gradient and stay exactly zero. Over many
// steps: scripts/finetune_reference.py, the same fine-tune written in plain
// PyTorch on the transformers model (torch.optim.AdamW, parametrized masks).
#include <ATen/ATen.h>

#include <fstream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "catch.h"
#include "config/config.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "maskfile/apply.h"
#include "model/decoder.h"
#include "prune/pruner.h"
#include "text/tokenizer.h"
#include "test_util.h"
#include "train/finetune.h"

using namespace patch;

namespace {

// W' ⊙ M with W' a leaf that collects the gradient.
class Masked : public model::WeightProvider {
 public:
  Masked(at::Tensor p, at::Tensor k) : p_(std::move(p)), k_(std::move(k)) {}
  at::Tensor effective_weight(const at::Tensor& w) override { return (p_ * k_).to(w.scalar_type()); }

 private:
  at::Tensor p_, k_;
};

const std::string kToy = "models/tinystories-656k";

// TinyStories-656K in float32 on the CPU, without recomputation.
model::Decoder toy_decoder() {
  model::DecoderOptions dopts;
  dopts.dtype = at::kFloat;
  dopts.checkpointing = false;
  return model::Decoder(io::load_checkpoint(test::data_path(kToy), at::kFloat), dopts);
}

// Magnitude masks of `structure` (hybrid: at 35%) with 32x32 tiles.
maskfile::MaskFile magnitude_masks(model::Decoder& decoder, prune::Structure structure) {
  prune::PruneOptions po;
  po.method = prune::Method::kMagnitude;
  po.structure = structure;
  po.target_sparsity = 0.35;
  po.tile_rows = po.tile_cols = 32;
  return prune::prune_model(decoder, {}, po).masks;
}

}  // namespace

TEST_CASE("finetune: one step is AdamW's first step on the masked model's gradient, removed weights stay zero",
          "[train]") {
  model::Decoder decoder = toy_decoder();
  const auto masks = magnitude_masks(decoder, prune::Structure::k24);
  REQUIRE(masks.layers.size() == decoder.linears().size());  // every linear of the blocks

  const auto ids = at::randint(decoder.config().vocab_size, {2, 32}, at::TensorOptions().dtype(at::kLong));
  // The gradient at the starting point W ⊙ M, by autograd on an independent provider.
  std::map<std::string, at::Tensor> leaf, keep;
  for (const auto& l : masks.layers) {
    auto* lin = decoder.linear(l.name);
    keep[l.name] = l.mask(at::kFloat);
    leaf[l.name] = (lin->weight() * keep[l.name]).detach().requires_grad_(true);
    lin->set_provider(std::make_shared<Masked>(leaf[l.name], keep[l.name]));
  }
  decoder.loss(ids).backward();

  const double lr = 1e-3;
  const auto r = train::finetune_kept_weights(decoder, masks, {}, ids, {1, 2, lr, 0});
  REQUIRE(r.losses.size() == 1);
  int64_t moved = 0;
  for (const auto& l : masks.layers) {
    INFO(l.name);
    const auto& w1 = r.weights.at(l.name + ".weight");
    const auto w0 = leaf[l.name].detach();
    const auto g = leaf[l.name].grad() * keep[l.name];
    // Removed weights: exactly zero.
    CHECK(at::equal(w1 * (1 - keep[l.name]), at::zeros_like(w1)));
    // Kept weights with a gradient: moved by lr * g / (|g| + eps), about lr
    // against its sign (fp32 rounding of the weights: a few 1e-7).
    const auto big = (g.abs() > 1e-5) * keep[l.name];
    const auto step = (w1 - w0) * big;
    const auto want = -lr * g / (g.abs() + 1e-8) * big;
    CHECK((step - want).abs().max().item<double>() < 5e-7);
    moved += big.sum().item<int64_t>();
  }
  CHECK(moved > 1000);
}

TEST_CASE("finetune: many steps equal a plain PyTorch AdamW fine-tune of the masked model in transformers",
          "[train]") {
  model::Decoder decoder = toy_decoder();
  // A hybrid mask: dense tiles and 2:4 tiles in the same layers.
  const auto masks = magnitude_masks(decoder, prune::Structure::kHybrid);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  const auto ids = at::randint(decoder.config().vocab_size, {4, 32}, gen, at::TensorOptions().dtype(at::kLong));
  // Every step takes all four windows, so the batches do not depend on the order.
  const train::FinetuneOptions o{20, 4, 1e-3, 0};
  const auto r = train::finetune_kept_weights(decoder, masks, {}, ids, o);

  test::TempDir dir;
  const std::string in = dir.file("in.safetensors"), ref = dir.file("ref.safetensors");
  std::vector<std::pair<std::string, at::Tensor>> tensors = {{"ids", ids}};
  for (const auto& l : masks.layers) tensors.emplace_back(l.name + ".keep", l.mask(at::kFloat));
  io::write_safetensors(in, tensors,
                        {{"format", "patch-finetune-input"},
                         {"model", "\"" + test::data_path(kToy) + "\""},
                         {"steps", std::to_string(o.steps)},
                         {"lr", "0.001"},
                         {"warmup", "2"}});  // steps / 10, as finetune_kept_weights warms up
  const auto run = test::run_command(test::env_or("PATCH_PYTHON", "python3") + " " + test::source_dir() +
                                     "/scripts/finetune_reference.py --in " + in + " --out " + ref);
  INFO(run.out + run.err);
  REQUIRE(run.exit_code == 0);
  const io::SafetensorsFile f(ref);
  const auto losses = f.tensor("losses").to(at::kDouble);
  REQUIRE(losses.numel() == o.steps);
  for (int64_t s = 0; s < o.steps; ++s) {
    INFO("step " << s);
    CHECK(r.losses[static_cast<size_t>(s)] == Approx(losses[s].item<double>()).epsilon(1e-5));
  }
  // The weights after 20 steps: AdamW moves each kept weight by about lr per step,
  // so they differ from the start by up to 0.02; fp32 paths of two libraries agree far closer.
  double worst = 0, moved = 0;
  for (const auto& l : masks.layers) {
    const auto mine = r.weights.at(l.name + ".weight");
    const auto theirs = f.tensor(l.name + ".weight").to(at::kFloat);
    worst = std::max(worst, (mine - theirs).abs().max().item<double>());
    moved = std::max(moved, (mine - decoder.linear(l.name)->weight() * l.mask(at::kFloat)).abs().max().item<double>());
  }
  INFO("largest difference " << worst << ", largest move " << moved);
  CHECK(moved > 5e-3);
  CHECK(worst < 1e-4);
}

// A fine-tune cycled over the windows of one file learns them by heart; its
// windows come from every data.train file, and none twice while they last.
TEST_CASE("finetune: its windows come from every data.train file, none twice while the text lasts", "[train]") {
  test::TempDir dir;
  const auto tok = text::load_tokenizer_for(test::data_path(kToy));
  // Two files of different words, each line its own numbers: no two windows alike.
  std::vector<std::string> files;
  std::vector<std::set<int64_t>> ids;  // each file's tokens
  for (const std::string word : {"cat", "dog"}) {
    std::string text;
    for (int i = 0; i < 60; ++i) text += "The " + word + " saw " + std::to_string(i * 7919 % 1000) + " birds.\n";
    files.push_back(dir.file(word + ".txt"));
    std::ofstream(files.back()) << text;
    const auto enc = tok->encode(text, false);
    ids.emplace_back(enc.begin(), enc.end());
  }
  // Tokens of one file only.
  std::vector<std::set<int64_t>> own(2);
  for (int f = 0; f < 2; ++f)
    for (int64_t id : ids[static_cast<size_t>(f)])
      if (!ids[static_cast<size_t>(1 - f)].count(id)) own[static_cast<size_t>(f)].insert(id);
  REQUIRE(!own[0].empty());
  REQUIRE(!own[1].empty());
  config::Overrides ov;
  ov.values = {{"data.train", config::Json(files)},
               {"data.cache_dir", config::Json(dir.file("cache"))},
               {"prune.calib_seq_len", config::Json(16)}};
  const config::Config cfg = config::resolve(std::nullopt, ov, "help");

  const at::Tensor all = train::finetune_windows(cfg, *tok, 1000000);  // more than there are: each once
  REQUIRE(all.size(1) == 16);
  std::set<std::vector<int64_t>> distinct;
  bool saw[2] = {false, false};
  for (int64_t r = 0; r < all.size(0); ++r) {
    const at::Tensor row = all[r].contiguous();
    const std::vector<int64_t> v(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
    distinct.insert(v);
    for (int64_t id : v)
      for (int f = 0; f < 2; ++f) saw[f] = saw[f] || own[static_cast<size_t>(f)].count(id) > 0;
  }
  CHECK(saw[0]);
  CHECK(saw[1]);  // the second file too
  CHECK(static_cast<int64_t>(distinct.size()) == all.size(0));

  const at::Tensor some = train::finetune_windows(cfg, *tok, 10);
  CHECK(some.size(0) == 10);
  CHECK(at::equal(some, train::finetune_windows(cfg, *tok, 10)));  // seeded

  config::Config none = cfg;
  none.set("data.train", config::Json::array());
  CHECK_THROWS_WITH(train::finetune_windows(none, *tok, 10), Catch::Contains("data.train"));
}
