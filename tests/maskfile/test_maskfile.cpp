// masks.safetensors: round trip, interoperability with the Python safetensors
// library (an independent reader and writer), and rejection of broken files.
#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "catch.h"
#include "core/error.h"
#include "io/safetensors.h"
#include "maskfile/mask_file.h"
#include "sparsity/mask_set.h"
#include "test_util.h"

using namespace patch;
using maskfile::MaskFile;

namespace {

const int kRef[6][2] = {{0, 1}, {0, 2}, {0, 3}, {1, 2}, {1, 3}, {2, 3}};

sparsity::Hardened toy_hardened(double target) {
  sparsity::MaskSetOptions o;
  o.tile_rows = 4;
  o.tile_cols = 8;
  o.mask.seed = 5;
  sparsity::MaskSet set(o, std::make_shared<sparsity::SamplerState>());
  set.add_layers({{"model.layers.0.self_attn.q_proj", at::randn({12, 24})},
                  {"model.layers.0.mlp.up_proj", at::randn({10, 20})},
                  {"model.layers.1.mlp.down_proj", at::randn({20, 12})}});
  return sparsity::harden(set, target, sparsity::BudgetKind::kGlobal);
}

// The [out, in] mask by explicit loops over the file's tensors.
at::Tensor brute_mask(const maskfile::LayerMask& l) {
  const auto& g = l.grid;
  auto m = at::zeros({g.out(), g.in()}, at::kFloat);
  for (int64_t i = 0; i < g.out(); ++i)
    for (int64_t j = 0; j < g.in(); ++j) {
      const int k = l.pattern[i][j / 4].item<int>();
      const bool dense = l.tile_dense[i / g.tile_rows()][j / g.tile_cols()].item<int>() == 1;
      m[i][j] = (dense || kRef[k][0] == j % 4 || kRef[k][1] == j % 4) ? 1.0f : 0.0f;
    }
  return m;
}

std::string read_error(const std::string& path) {
  try {
    maskfile::read_mask_file(path);
  } catch (const core::Error& e) {
    return e.what();
  }
  return "";
}

std::map<std::string, std::string> good_meta() {
  return {{"format", "patch-masks"}, {"format_version", "1"}, {"tile", "4x8"}, {"mode", "joint"}};
}

std::string oracle(const std::string& cmd, const std::string& path) {
  auto r = test::run_command(test::env_or("PATCH_PYTHON", "python3") + " " + test::source_dir() +
                             "/scripts/maskfile_oracle.py " + cmd + " " + path);
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  return r.out;
}

}  // namespace

TEST_CASE("mask file round trip", "[maskfile]") {
  test::TempDir dir;
  auto h = toy_hardened(0.3);
  maskfile::MaskFileMeta meta;
  meta.model_config_hash = "abc123";
  meta.model_source = "/models/toy";
  meta.training_config = R"({"mask":{"mode":"joint"}})";
  auto f = maskfile::from_hardened(h, meta);
  maskfile::write_mask_file(dir.file("masks.safetensors"), f);
  auto g = maskfile::read_mask_file(dir.file("masks.safetensors"));
  CHECK(g.meta.mode == "joint");
  CHECK(g.meta.tile_rows == 4);
  CHECK(g.meta.tile_cols == 8);
  CHECK(g.meta.target_sparsity == Approx(0.3));
  CHECK(g.meta.achieved_sparsity == Approx(h.achieved_sparsity()));
  CHECK(g.meta.model_config_hash == "abc123");
  CHECK(g.meta.model_source == "/models/toy");
  CHECK(g.meta.training_config == meta.training_config);
  CHECK(g.meta.created_by.rfind("patch-train ", 0) == 0);
  REQUIRE(g.layers.size() == 3);
  for (size_t i = 0; i < 3; ++i) {
    CHECK(g.layers[i].name == h.layers[i].name);
    CHECK(g.layers[i].grid == h.layers[i].grid);
    CHECK(g.layers[i].block == h.layers[i].block);
    CHECK(g.layers[i].tile_dense.equal(h.layers[i].tile_dense));
    CHECK(g.layers[i].pattern.equal(h.layers[i].pattern));
    CHECK(g.layers[i].mask().equal(h.layers[i].mask()));
    CHECK(g.layers[i].mask().equal(brute_mask(g.layers[i])));
    CHECK(g.layers[i].mask(at::kBool).equal(brute_mask(g.layers[i]).to(at::kBool)));
  }
  CHECK(g.sparsity() == Approx(h.achieved_sparsity()));
  CHECK(g.find("model.layers.0.mlp.up_proj") != nullptr);
  CHECK_NOTHROW(maskfile::check_layer_shape(g, g.layers[1], 10, 20));
  CHECK_THROWS_AS(maskfile::check_layer_shape(g, g.layers[1], 10, 24), core::Error);
  auto priors = maskfile::priors_from_file(g);
  CHECK(priors.at("model.layers.0.mlp.up_proj").tile_score.equal(g.layers[1].tile_dense.to(at::kFloat)));
}

TEST_CASE("Python safetensors reads our mask file", "[maskfile][python]") {
  test::TempDir dir;
  auto h = toy_hardened(0.2);
  maskfile::write_mask_file(dir.file("masks.safetensors"), maskfile::from_hardened(h));
  auto j = nlohmann::json::parse(oracle("read", dir.file("masks.safetensors")));
  CHECK(j["metadata"]["format"] == "patch-masks");
  CHECK(j["metadata"]["format_version"] == "1");
  CHECK(j["metadata"]["tile"] == "4x8");
  CHECK(j["metadata"]["mode"] == "joint");
  CHECK(std::stod(j["metadata"]["achieved_sparsity"].get<std::string>()) == Approx(h.achieved_sparsity()));
  int64_t zeros = 0;
  for (const auto& l : h.layers) {
    const auto& pl = j["layers"][l.name];
    CHECK(pl["dtype"][0] == "uint8");
    CHECK(pl["dtype"][1] == "uint8");
    auto mask = l.mask();
    for (int64_t i = 0; i < l.grid.out(); ++i) {
      std::string row;
      for (int64_t c = 0; c < l.grid.in(); ++c) row += mask[i][c].item<float>() == 1.0f ? '1' : '0';
      CHECK(pl["mask"][i].get<std::string>() == row);
    }
    zeros += pl["zeros"].get<int64_t>();
  }
  CHECK(static_cast<double>(zeros) / h.total_weights() == Approx(h.achieved_sparsity()));
}

TEST_CASE("a mask file written by Python loads", "[maskfile][python]") {
  test::TempDir dir;
  oracle("write", dir.file("py.safetensors"));
  auto f = maskfile::read_mask_file(dir.file("py.safetensors"));
  REQUIRE(f.layers.size() == 1);
  const auto& l = f.layers[0];
  CHECK(l.name == "model.layers.0.mlp.up_proj");
  CHECK(l.grid == sparsity::TileGrid(6, 16, 4, 8));
  for (int64_t i = 0; i < 6; ++i)
    for (int64_t grp = 0; grp < 4; ++grp) CHECK(l.pattern[i][grp].item<int>() == (i * 4 + grp) % 6);
  CHECK(l.mask().equal(brute_mask(l)));
  CHECK(f.meta.model_source == "python");
}

TEST_CASE("broken mask files are rejected with one-line errors", "[maskfile]") {
  test::TempDir dir;
  const std::string layer = "model.layers.0.mlp.up_proj";
  auto pattern = at::zeros({6, 4}, at::kByte);
  auto tiles = at::zeros({2, 2}, at::kByte);
  auto write = [&](const std::string& name, std::vector<std::pair<std::string, at::Tensor>> t,
                   std::map<std::string, std::string> md) {
    io::write_safetensors(dir.file(name), t, md);
    return dir.file(name);
  };
  auto bad_pattern = pattern.clone();
  bad_pattern[3][1] = 7;
  auto e = read_error(write("p7", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", bad_pattern}}, good_meta()));
  CHECK(e.find("index 7") != std::string::npos);
  CHECK(e.find(layer) != std::string::npos);
  CHECK(e.find('\n') == std::string::npos);

  e = read_error(write("shape", {{layer + ".tile_dense", at::zeros({3, 2}, at::kByte)}, {layer + ".pattern_2_4", pattern}},
                       good_meta()));
  CHECK(e.find("tile_dense has shape") != std::string::npos);

  auto md = good_meta();
  md.erase("format");
  e = read_error(write("nometa", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", pattern}}, md));
  CHECK(e.find("missing metadata key 'format'") != std::string::npos);
  CHECK(!read_error(write("nothing", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", pattern}}, {})).empty());

  md = good_meta();
  md["format_version"] = "2";
  CHECK(read_error(write("v2", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", pattern}}, md))
            .find("format_version") != std::string::npos);
  md = good_meta();
  md["tile"] = "4x6";
  CHECK(!read_error(write("tile", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", pattern}}, md)).empty());
  CHECK(read_error(write("half", {{layer + ".tile_dense", tiles}}, good_meta())).find("missing") != std::string::npos);
  CHECK(read_error(write("extra", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", pattern}, {"x.weight", tiles}},
                         good_meta()))
            .find("unexpected tensor 'x.weight'") != std::string::npos);
  CHECK(read_error(write("i32", {{layer + ".tile_dense", tiles}, {layer + ".pattern_2_4", pattern.to(at::kInt)}},
                         good_meta()))
            .find("uint8") != std::string::npos);
  auto dense2 = tiles.clone();
  dense2[0][0] = 2;
  CHECK(read_error(write("d2", {{layer + ".tile_dense", dense2}, {layer + ".pattern_2_4", pattern}}, good_meta()))
            .find("tile_dense holds 2") != std::string::npos);

  // The writer refuses what the reader would.
  MaskFile f;
  f.meta.tile_rows = 4;
  f.meta.tile_cols = 8;
  f.layers.push_back({layer, sparsity::TileGrid(6, 16, 4, 8), 0, tiles, bad_pattern});
  CHECK_THROWS_AS(maskfile::write_mask_file(dir.file("w.safetensors"), f), core::Error);
}

TEST_CASE("unstructured bitmask files round trip and Python unpacks them", "[maskfile][python]") {
  test::TempDir dir;
  at::manual_seed(3);
  auto keep = at::rand({5, 24}) > 0.4;
  MaskFile f;
  f.meta.mode = "oneshot";
  f.meta.method = "wanda";
  f.meta.structure = "unstructured";
  f.bitmasks.push_back({"model.layers.0.mlp.up_proj", 5, 24, maskfile::pack_bits(keep)});
  CHECK(f.bitmasks[0].bits.sizes() == at::IntArrayRef({5, 3}));
  CHECK(f.bitmasks[0].mask(at::kBool).equal(keep));
  const std::string path = dir.file("u.safetensors");
  maskfile::write_mask_file(path, f);
  auto g = maskfile::read_mask_file(path);
  REQUIRE(g.bitmasks.size() == 1);
  CHECK(g.layers.empty());
  CHECK(g.meta.method == "wanda");
  CHECK(maskfile::layer_mask(g, "model.layers.0.mlp.up_proj", at::kBool).equal(keep));
  CHECK(g.sparsity() == Approx(1.0 - keep.to(at::kDouble).mean().item<double>()));
  CHECK_THROWS_AS(maskfile::priors_from_file(g), core::Error);

  auto j = nlohmann::json::parse(oracle("read", path));
  CHECK(j["metadata"]["structure"] == "unstructured");
  const auto& pl = j["layers"]["model.layers.0.mlp.up_proj"];
  for (int64_t i = 0; i < 5; ++i) {
    std::string row;
    for (int64_t c = 0; c < 24; ++c) row += keep[i][c].item<bool>() ? '1' : '0';
    CHECK(pl["mask"][i].get<std::string>() == row);
  }

  // A hybrid tensor in an unstructured file, and unstructured from a learned mode.
  io::write_safetensors(dir.file("bad.safetensors"), {{"a.tile_dense", at::zeros({1, 1}, at::kByte)}},
                        {{"format", "patch-masks"}, {"format_version", "1"}, {"tile", "4x8"},
                         {"mode", "oneshot"}, {"structure", "unstructured"}});
  CHECK(read_error(dir.file("bad.safetensors")).find("unexpected tensor 'a.tile_dense'") != std::string::npos);
  f.meta.mode = "joint";
  CHECK_THROWS_AS(maskfile::write_mask_file(dir.file("j.safetensors"), f), core::Error);
}
