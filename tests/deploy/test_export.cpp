// Pruned checkpoint export: the input's layout with exactly the masked weights
// zeroed, and a GGUF input turned into a checkpoint that transformers runs
// like our masked model.
#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <nlohmann/json.hpp>

#include "catch.h"
#include "core/atomic_file.h"
#include "deploy/export.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "maskfile/apply.h"
#include "model/decoder.h"
#include "prune/pruner.h"
#include "test_util.h"

using namespace patch;
namespace fs = std::filesystem;

namespace {

// One-shot magnitude masks (no calibration needed) for every linear of `path`.
maskfile::MaskFile magnitude_masks(const std::string& path, prune::Structure s, int64_t tile) {
  auto ckpt = io::load_checkpoint(path);
  model::Decoder d(ckpt, model::DecoderOptions{});
  prune::PruneOptions o;
  o.method = prune::Method::kMagnitude;
  o.structure = s;
  o.target_sparsity = 0.35;
  o.tile_rows = o.tile_cols = tile;
  return prune::prune_model(d, {}, o).masks;
}

}  // namespace

TEST_CASE("export keeps the checkpoint's layout and zeros exactly the masked weights", "[deploy]") {
  test::TempDir dir;
  const std::string src = test::data_path("models/tinystories-656k");
  for (auto s : {prune::Structure::kHybrid, prune::Structure::kUnstructured}) {
    INFO(prune::structure_name(s));
    auto masks = magnitude_masks(src, s, 32);
    const std::string out = dir.file(prune::structure_name(s));
    auto ckpt = io::load_checkpoint(src);
    deploy::export_checkpoint(ckpt, masks, {}, out);
    CHECK(fs::exists(out + "/tokenizer.json"));
    CHECK(fs::exists(out + "/generation_config.json"));
    CHECK_FALSE(fs::exists(out + ".partial"));
    auto config = nlohmann::json::parse(core::read_file(out + "/config.json"));
    CHECK(config["patch_masks"] == "masks.safetensors");
    CHECK(maskfile::read_mask_file(out + "/masks.safetensors").sparsity() == Approx(masks.sparsity()));

    io::SafetensorsFile a(src + "/model.safetensors"), b(out + "/model.safetensors");
    REQUIRE(a.entries().size() == b.entries().size());
    int64_t masked = 0;
    for (size_t i = 0; i < a.entries().size(); ++i) {
      const auto& ea = a.entries()[i];
      const auto& eb = b.entries()[i];
      INFO(ea.name);
      CHECK(ea.name == eb.name);
      CHECK(ea.dtype == eb.dtype);
      CHECK(ea.shape == eb.shape);
      const auto wa = a.tensor(ea.name), wb = b.tensor(eb.name);
      const std::string layer = ea.name.substr(0, ea.name.size() - std::string(".weight").size());
      auto m = maskfile::layer_mask(masks, layer, at::kBool);
      if (m.defined() && ea.name.size() > 7 && ea.name.compare(ea.name.size() - 7, 7, ".weight") == 0) {
        ++masked;
        CHECK(wb.masked_select(m.logical_not()).abs().max().item<float>() == 0.0f);
        CHECK(wb.masked_select(m).equal(wa.masked_select(m)));
      } else {
        CHECK(wa.equal(wb));
      }
    }
    CHECK(masked == 14);
  }
}

TEST_CASE("a GGUF input exports to a checkpoint that transformers runs like our masked model", "[deploy][python]") {
  test::TempDir dir;
  const std::string gguf = test::data_path("models/stories260K/stories260K.gguf");
  auto masks = magnitude_masks(gguf, prune::Structure::kHybrid, 16);
  auto ckpt = io::load_checkpoint(gguf);
  deploy::export_checkpoint(ckpt, masks, {}, dir.file("out"));

  const std::vector<int64_t> ids = {1, 403, 407, 261, 378, 395, 288, 16, 65, 300};
  auto ids_t = at::tensor(ids, at::kLong).unsqueeze(0);
  at::NoGradGuard ng;
  model::Decoder ours(ckpt, model::DecoderOptions{});
  maskfile::apply_masks(ours, masks);
  auto expect = ours.forward(ids_t)[0];
  // Our reader sees the export as the masked model.
  model::Decoder back(io::load_checkpoint(dir.file("out")), model::DecoderOptions{});
  CHECK(at::allclose(back.forward(ids_t)[0], expect, 1e-5, 1e-5));
  // And so does transformers.
  std::string list;
  for (auto i : ids) list += (list.empty() ? "" : ",") + std::to_string(i);
  auto r = test::run_command(test::env_or("PATCH_PYTHON", "python3") + " " + test::source_dir() +
                             "/scripts/hf_logits.py --model " + dir.file("out") + " --ids " + list + " --out " +
                             dir.file("hf.json"));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto j = nlohmann::json::parse(core::read_file(dir.file("hf.json")))["logits"];
  auto hf = at::empty({static_cast<int64_t>(j.size()), static_cast<int64_t>(j[0].size())}, at::kFloat);
  for (size_t t = 0; t < j.size(); ++t)
    for (size_t v = 0; v < j[t].size(); ++v) hf[t][v] = j[t][v].get<float>();
  CHECK((hf - expect).abs().max().item<double>() < 1e-4);
}

TEST_CASE("sharded and bfloat16 checkpoints export shard for shard in their dtype", "[deploy]") {
  for (const std::string name : {"llama_sharded", "llama_bf16", "qwen2"}) {
    INFO(name);
    test::TempDir dir;
    const std::string src = test::fixtures_dir() + "/model/" + name;
    auto masks = magnitude_masks(src, prune::Structure::k24, 16);
    auto ckpt = io::load_checkpoint(src);
    deploy::export_checkpoint(ckpt, masks, {}, dir.file("out"));
    std::set<std::string> in_files, out_files;
    for (const auto& e : fs::directory_iterator(src)) in_files.insert(e.path().filename().string());
    for (const auto& e : fs::directory_iterator(dir.file("out"))) out_files.insert(e.path().filename().string());
    in_files.insert("masks.safetensors");
    CHECK(in_files == out_files);
    if (name == "llama_sharded") {
      CHECK(core::read_file(src + "/model.safetensors.index.json") ==
            core::read_file(dir.file("out/model.safetensors.index.json")));
    }
    auto back = io::load_checkpoint(dir.file("out"));
    CHECK(back.tensor_file.size() == ckpt.tensor_file.size());
    for (const auto& [tname, t] : ckpt.tensors) {
      INFO(tname);
      const auto& u = back.tensors.at(tname);
      CHECK(u.scalar_type() == t.scalar_type());
      CHECK(fs::path(back.tensor_file.at(tname)).filename() == fs::path(ckpt.tensor_file.at(tname)).filename());
      auto m = maskfile::layer_mask(masks, tname.substr(0, tname.size() - 7), t.scalar_type());
      CHECK(u.equal(m.defined() && tname.size() > 7 ? t * m : t));
    }
  }
}
