// Packed hybrid format and the deployment matmul. Oracles: the mask definition
// (sparsity::build_mask) for what a packed layer holds, the PTX ISA's fragment
// layouts (decode_format_weight) for the decode blocks, and at::linear on the
// masked weight for every kernel's output.
#include <ATen/ATen.h>
#if PATCH_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#endif
#if PATCH_WITH_CUTLASS
#include "deploy/cutlass_hybrid_gemm.h"
#include "deploy/cutlass_sparse_gemm.h"
#endif

#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "catch.h"
#include "core/atomic_file.h"
#include "deploy/bench.h"
#include "deploy/expand_schedule.h"
#include "deploy/hybrid_linear.h"
#include "deploy/hybrid_split_plan.h"
#include "deploy/packed.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "maskfile/mask_file.h"
#include "model/decoder.h"
#include "prune/pruner.h"
#include "test_util.h"

using namespace patch;

namespace {

struct Case {
  int64_t out, in, tile_rows, tile_cols;
  double sparsity;
};

// A random bf16 weight and a random hybrid mask of the given sparse-tile share.
std::pair<at::Tensor, maskfile::LayerMask> random_layer(const Case& c, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  const sparsity::TileGrid grid(c.out, c.in, c.tile_rows, c.tile_cols);
  auto w = at::randn({c.out, c.in}, gen, at::kFloat).to(at::kBFloat16);
  return {w, deploy::random_layer_mask("model.layers.0.mlp.up_proj", grid, c.sparsity, gen)};
}

at::Tensor masked(const at::Tensor& w, const maskfile::LayerMask& m) {
  return w * m.mask(at::kBFloat16);
}

// The bf16 bits of a contiguous bf16 CPU tensor, and the tile map of a mask (1: dense).
std::vector<uint16_t> bf16_bits(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const auto* p = reinterpret_cast<const uint16_t*>(c.data_ptr<at::BFloat16>());
  return std::vector<uint16_t>(p, p + c.numel());
}
std::vector<uint8_t> tile_map(const maskfile::LayerMask& m) {
  const at::Tensor td = m.tile_dense.contiguous().to(at::kByte);
  return std::vector<uint8_t>(td.data_ptr<uint8_t>(), td.data_ptr<uint8_t>() + td.numel());
}

// The message read_packed throws for `path` ("" when it does not throw).
std::string read_error(const std::string& path) {
  try {
    deploy::read_packed(path);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// Runs `eval` (a command line ending in options) once with dir's
// out/packed.safetensors and once with its masks.safetensors; returns the two
// eval.json, packed first.
std::pair<nlohmann::json, nlohmann::json> eval_packed_and_masked(const std::string& eval,
                                                                 const test::TempDir& dir) {
  auto via_packed = test::run_command(eval + "--packed '" + dir.file("out/packed.safetensors") +
                                      "' --out '" + dir.file("eval-packed") + "'");
  INFO(via_packed.err);
  REQUIRE(via_packed.exit_code == 0);
  auto via_masks = test::run_command(eval + "--masks '" + dir.file("masks.safetensors") +
                                     "' --out '" + dir.file("eval-masks") + "'");
  INFO(via_masks.err);
  REQUIRE(via_masks.exit_code == 0);
  return {nlohmann::json::parse(core::read_file(dir.file("eval-packed/eval.json"))),
          nlohmann::json::parse(core::read_file(dir.file("eval-masks/eval.json")))};
}

// Magnitude hybrid masks at 35% with square tiles of `tile`, for a checkpoint.
maskfile::MaskFile magnitude_masks(const io::Checkpoint& ckpt, int64_t tile) {
  model::Decoder d(ckpt, model::DecoderOptions{});
  prune::PruneOptions o;
  o.method = prune::Method::kMagnitude;
  o.structure = prune::Structure::kHybrid;
  o.target_sparsity = 0.35;
  o.tile_rows = o.tile_cols = tile;
  return prune::prune_model(d, {}, o).masks;
}

}  // namespace

TEST_CASE("a packed layer holds exactly W times M in 9/16 of the bytes for 2:4 tiles", "[deploy]") {
  for (const Case& c : {Case{64, 128, 32, 64, 0.35}, Case{100, 200, 32, 48, 0.25},
                        Case{48, 96, 16, 32, 0.5}, Case{48, 96, 16, 32, 0.0}}) {
    INFO(c.out << "x" << c.in << " tiles " << c.tile_rows << "x" << c.tile_cols << " sparsity "
               << c.sparsity);
    auto [w, m] = random_layer(c, 7);
    const auto p = deploy::pack_layer(w, m);
    CHECK(at::equal(deploy::unpack_layer(p), masked(w, m)));
    // Sizes follow from the tile map: every weight of a dense tile, half of a
    // sparse tile's weights plus a nibble per group.
    const int64_t dense_weights = m.dense_weights(),
                  sparse_weights = m.grid.numel() - dense_weights;
    CHECK(p.dense.numel() == dense_weights);
    CHECK(p.values.numel() == sparse_weights / 2);
    CHECK(p.indices.numel() == (sparse_weights / 4 + 1) / 2);
    CHECK(p.bytes() <= 2 * dense_weights + sparse_weights * 9 / 8 + 1);
    CHECK(p.sparsity() == Approx(static_cast<double>(m.zero_weights()) / m.grid.numel()));
    CHECK(p.sparse_tile_fraction() ==
          Approx(1.0 - m.tile_dense.to(at::kDouble).mean().item<double>()));
    // The positions are the mask's kept positions.
    const auto nib = deploy::group_nibbles(p).to(at::kLong);
    auto kept = at::zeros({c.out, c.in / 4, 4}, at::kLong);
    kept.scatter_(2, nib.bitwise_and(3).unsqueeze(2), 1)
        .scatter_(2, nib.bitwise_right_shift(2).unsqueeze(2), 1);
    const auto sparse_tile = m.grid.expand(1 - m.tile_dense.to(at::kFloat)).to(at::kBool);
    const auto mask = m.mask(at::kLong);
    CHECK(at::equal(kept.view({c.out, c.in}).masked_select(sparse_tile),
                    mask.masked_select(sparse_tile)));
  }
}

TEST_CASE("packed files round-trip and bad ones are refused with the layer named", "[deploy]") {
  test::TempDir dir;
  auto [w, m] = random_layer({64, 128, 32, 64, 0.45}, 3);
  deploy::PackedModel model;
  model.tile_rows = 32;
  model.tile_cols = 64;
  model.layers.push_back(deploy::pack_layer(w, m));
  const std::string path = dir.file("packed.safetensors");
  deploy::write_packed(path, model);
  const auto back = deploy::read_packed(path);
  REQUIRE(back.layers.size() == 1);
  CHECK(back.layers[0].name == m.name);
  CHECK(at::equal(deploy::unpack_layer(back.layers[0]), masked(w, m)));
  CHECK(back.sparsity() == Approx(model.sparsity()));

  // A group whose two positions coincide is not 2:4.
  auto bad = model;
  bad.layers[0].indices = model.layers[0].indices.clone();
  bad.layers[0].indices[0] = 0x55;  // positions (1, 1) in both nibbles
  deploy::write_packed(dir.file("bad.safetensors"), bad);
  const auto err = read_error(dir.file("bad.safetensors"));
  CHECK(err.find(m.name) != std::string::npos);
  CHECK(err.find("2:4 positions") != std::string::npos);
  // A values tensor of the wrong length.
  bad = model;
  bad.layers[0].values = model.layers[0].values.slice(0, 1);
  deploy::write_packed(dir.file("short.safetensors"), bad);
  CHECK(read_error(dir.file("short.safetensors")).find("expected") != std::string::npos);
  // Not a packed file at all.
  io::write_safetensors(dir.file("other.safetensors"), {{"x", at::zeros({2})}});
  CHECK(read_error(dir.file("other.safetensors")).find("patch-packed") != std::string::npos);
}

TEST_CASE("the decode blocks read back by the PTX fragment layouts give W times M", "[deploy]") {
  for (const Case& c :
       {Case{64, 256, 32, 64, 0.35}, Case{48, 96, 32, 64, 0.5}, Case{128, 128, 128, 128, 0.45}}) {
    INFO(c.out << "x" << c.in << " tiles " << c.tile_rows << "x" << c.tile_cols);
    auto [w, m] = random_layer(c, 11);
    const auto p = deploy::pack_layer(w, m);
    REQUIRE(deploy::decode_supported(p.grid));
    const auto f = deploy::build_decode_format(p);
    // 1024 bytes per dense 16x32 block, 576 per sparse one.
    const int64_t dense_blocks = m.dense_weights() / 512,
                  sparse_blocks = m.grid.numel() / 512 - dense_blocks;
    CHECK(f.blocks.numel() == dense_blocks * 1024 + sparse_blocks * 576);
    CHECK(at::equal(deploy::decode_format_weight(f, p.grid), masked(w, m)));
  }
  CHECK_FALSE(deploy::decode_supported(sparsity::TileGrid(40, 96, 16, 32)));
  // The decode kernel holds a tile row's tile offsets in shared memory.
  const int64_t most = deploy::kMaxTileColumns;
  CHECK(deploy::decode_supported(sparsity::TileGrid(64, 32 * most, 64, 32)));
  CHECK_FALSE(deploy::decode_supported(sparsity::TileGrid(64, 32 * (most + 1), 64, 32)));
  CHECK_FALSE(deploy::sparse_supported(sparsity::TileGrid(96, 128, 32, 32)));
  CHECK(deploy::sparse_supported(sparsity::TileGrid(128, 256, 64, 32)));
}

TEST_CASE("the expansion schedule expands each layer's weight ahead once it knows the order", "[deploy]") {
  deploy::ExpandSchedule s;
  int layer[4];
  for (auto& l : layer) s.add(&l);
  // Runs `order`, checking that every weight is in its buffer when used and never
  // overwritten while a layer reads it; returns how many were expanded ahead.
  std::array<const void*, 2> held{};
  auto run = [&](const std::vector<int>& order) {
    int ahead = 0;
    for (int i : order) {
      const auto plan = s.acquire(&layer[i]);
      if (plan.expand) held[plan.buffer] = &layer[i];
      CHECK(held[plan.buffer] == &layer[i]);
      ahead += plan.expand ? 0 : 1;
      if (plan.ahead) held[1 - plan.buffer] = plan.ahead;  // into the buffer the layer does not read
      s.release();
    }
    return ahead;
  };
  // The order they were added in: all but the first ahead, then the first too
  // once the last knows it comes next.
  CHECK(run({0, 1, 2, 3}) == 3);
  CHECK(run({0, 1, 2, 3}) == 3);  // the first: the last learned it only now
  CHECK(run({0, 1, 2, 3}) == 4);
  CHECK(s.prefetched(&layer[0]) == 1);
  CHECK(s.prefetched(&layer[3]) == 3);
  // Another order is learned in one pass.
  CHECK(run({0, 2, 1, 3}) < 4);
  CHECK(run({0, 2, 1, 3}) == 4);
  // Two layers in turn: both stay in their buffers, nothing to expand.
  run({1, 2});
  CHECK(run({1, 2, 1, 2}) == 4);
  // A layer removed: no layer expands it ahead any more; the others learn
  // their new order (the last one's successor only at the end of a pass).
  s.remove(&layer[2]);
  CHECK_FALSE(s.contains(&layer[2]));
  run({0, 1, 3});
  run({0, 1, 3});
  CHECK(run({0, 1, 3}) == 3);
  // One acquire at a time.
  s.acquire(&layer[0]);
  CHECK_THROWS(s.acquire(&layer[1]));
}

TEST_CASE("a hybrid layer split into 2:4 steps adds up to the masked matmul", "[deploy]") {
  // Three row blocks, four input blocks of 128; a quarter and a half of the tiles dense.
  for (double sparsity : {0.25, 0.375}) {
    auto [w, mask] = random_layer({384, 512, 128, 128, sparsity}, 41);
    const at::Tensor wm = masked(w, mask);
    const std::vector<uint8_t> dense = tile_map(mask);
    const deploy::SplitPlan plan = deploy::make_split_plan(dense, 3, 4);
    const std::vector<uint16_t> pool = deploy::gather_split_pool(plan, bf16_bits(wm));
    const int64_t t = deploy::kSplitTile;
    const at::Tensor pool_t =
        at::from_blob(const_cast<uint16_t*>(pool.data()), {static_cast<int64_t>(plan.pool.size()) * t, t}, at::kShort)
            .view(at::kBFloat16)
            .to(at::kDouble);
    // Every pool tile is 2:4: at most two nonzeros in every group of four inputs.
    CHECK((pool_t.ne(0).view({-1, 4}).sum(1).le(2)).all().item<bool>());
    const at::Tensor x = at::randn({7, 512}, at::kDouble);
    at::Tensor y = at::zeros({7, 384}, at::kDouble);
    for (int64_t r = 0; r < 3; ++r) {
      int64_t want = 4;
      for (int64_t k = 0; k < 4; ++k) want += dense[static_cast<size_t>(r * 4 + k)];
      CHECK(plan.counts[static_cast<size_t>(r)] == want);
      for (int64_t j = 0; j < plan.counts[static_cast<size_t>(r)]; ++j) {
        const int32_t tile = plan.steps[static_cast<size_t>((r * plan.max_steps + j) * 2)];
        const int32_t kb = plan.steps[static_cast<size_t>((r * plan.max_steps + j) * 2 + 1)];
        y.slice(1, r * t, (r + 1) * t) += at::matmul(x.slice(1, kb * t, (kb + 1) * t), pool_t.slice(0, tile * t, (tile + 1) * t).t());
      }
    }
    const at::Tensor want = at::matmul(x, wm.to(at::kDouble).t());
    CHECK(at::allclose(y, want, 1e-12, 1e-12));
  }
  CHECK_THROWS_AS(deploy::make_split_plan({1, 0, 1}, 2, 2), std::invalid_argument);
}

TEST_CASE("a hybrid layer planned as 2:4 steps and dense half steps adds up to the masked matmul", "[deploy]") {
  // Three row blocks, four input blocks of 128; a quarter and a half of the
  // tiles dense, then none and all (a pool with no tile holds one of zeros).
  const int64_t t = deploy::kSplitTile;
  for (double sparsity : {0.25, 0.375, 0.5, 0.0}) {
    auto [w, mask] = random_layer({384, 512, 128, 128, sparsity}, 42);
    const at::Tensor wm = masked(w, mask);
    const std::vector<uint8_t> dense = tile_map(mask);
    const deploy::MixedPlan plan = deploy::make_mixed_plan(dense, 3, 4);
    const auto pool = [&](const std::vector<deploy::MixedPlan::Tile>& tiles) {
      std::vector<uint16_t> v = deploy::gather_tiles(tiles, bf16_bits(wm), 3, 4);
      CHECK(v.size() == std::max<size_t>(tiles.size(), 1) * static_cast<size_t>(t * t));
      return at::from_blob(v.data(), {static_cast<int64_t>(v.size()) / t, t}, at::kShort)
          .view(at::kBFloat16)
          .to(at::kDouble);
    };
    const at::Tensor sparse = pool(plan.sparse), dense_pool = pool(plan.dense);
    CHECK((sparse.ne(0).view({-1, 4}).sum(1).le(2)).all().item<bool>());
    const at::Tensor x = at::randn({7, 512}, at::kDouble);
    at::Tensor y = at::zeros({7, 384}, at::kDouble);
    for (int64_t r = 0; r < 3; ++r) {
      int64_t want = 4;
      for (int64_t k = 0; k < 4; ++k) want += dense[static_cast<size_t>(r * 4 + k)];
      CHECK(plan.counts[static_cast<size_t>(r)] == want);
      for (int64_t j = 0; j < plan.max_steps; ++j) {
        const int32_t a = plan.steps[static_cast<size_t>((r * plan.max_steps + j) * 2)];
        const int32_t b = plan.steps[static_cast<size_t>((r * plan.max_steps + j) * 2 + 1)];
        if (j >= plan.counts[static_cast<size_t>(r)]) {
          CHECK((a == -1 && b == -1));
          continue;
        }
        auto out = y.slice(1, r * t, (r + 1) * t);
        if (a >= 0) {
          out += at::matmul(x.slice(1, b * t, (b + 1) * t), sparse.slice(0, a * t, (a + 1) * t).t());
        } else {
          const int64_t d = -1 - a, h = b % 2, half = t / 2;
          const at::Tensor tile = dense_pool.slice(0, d * t, (d + 1) * t).slice(1, h * half, (h + 1) * half);
          out += at::matmul(x.slice(1, b * half, (b + 1) * half), tile.t());
        }
      }
    }
    const at::Tensor want = at::matmul(x, wm.to(at::kDouble).t());
    CHECK(at::allclose(y, want, 1e-12, 1e-12));
  }
  CHECK_THROWS_AS(deploy::make_mixed_plan({1, 0, 1}, 2, 2), std::invalid_argument);
  CHECK_THROWS_AS(deploy::gather_tiles({}, std::vector<uint16_t>(5), 1, 1), std::invalid_argument);
}

// The H100 measurements split_loses_from stands on (docs/benchmarks.md, the
// split kernel): a LLaMA-2-7B block at 25% (half the tiles 2:4) ran 0.64x on
// the split kernel against 0.42x by expansion at 256 tokens and 0.67x against
// 0.78x at 2048; at 45% (90% 2:4) it won at both (0.83x/0.47x, 0.90x/0.83x).
TEST_CASE("prefill_split gives way to expansion where the split kernel measured slower", "[deploy]") {
  const int64_t never = std::numeric_limits<int64_t>::max();
  for (double f : {0.0, 0.25, 0.5, 0.69}) {
    INFO("2:4 fraction " << f);
    CHECK(deploy::split_loses_from(false, f) > 256);
    CHECK(deploy::split_loses_from(false, f) <= 2048);
  }
  for (double f : {0.7, 0.9, 1.0}) CHECK(deploy::split_loses_from(false, f) == never);
  // The mixed kernel reads a dense tile once: kept until measured otherwise.
  for (double f : {0.0, 0.5, 0.9}) CHECK(deploy::split_loses_from(true, f) == never);
}

TEST_CASE("HybridLinear equals the masked dense matmul", "[deploy]") {
  std::vector<at::Device> devices{at::kCPU};
  if (at::hasCUDA()) devices.emplace_back(at::kCUDA, 0);
  for (const auto& device : devices) {
    for (const Case& c :
         {Case{256, 512, 128, 128, 0.45}, Case{192, 384, 64, 64, 0.25}, Case{128, 256, 64, 32, 0.5},
          Case{128, 256, 64, 32, 0.0}, Case{96, 160, 32, 32, 0.35}}) {
      auto [w, m] = random_layer(c, 5);
      const auto p = deploy::pack_layer(w, m);
      deploy::HybridLinear lin(p, device);
      const auto ref_w = masked(w, m).to(at::kFloat);
      for (int64_t tokens : {1, 3, 8, 9, 16, 17, 25, 32, 33, 130, 256}) {
        INFO(device << " " << c.out << "x" << c.in << " tiles " << c.tile_rows << "x" << c.tile_cols
                    << " sparsity " << c.sparsity << " tokens " << tokens << " path "
                    << deploy::path_name(lin.path(tokens)));
        auto x = at::randn({tokens, c.in}, at::kFloat).to(at::kBFloat16);
        const auto ref = at::linear(x.to(at::kFloat), ref_w);
        const auto y = lin.forward(x.to(device)).to(at::kCPU, at::kFloat);
        REQUIRE(y.sizes() == ref.sizes());
        // bf16 output: half an ulp of the largest output, plus fp32 summation order.
        const double tol = 8e-3 * ref.abs().max().item<double>();
        CHECK((y - ref).abs().max().item<double>() <= tol);
        if (device.is_cuda()) {
          // cuSPARSELt only for a layer of 2:4 tiles only (here sparsity 0.5).
          const bool sparse = p.dense_tiles() == 0 && deploy::sparse_supported(p.grid);
          CHECK(lin.path(tokens) ==
                (!deploy::decode_supported(p.grid)     ? deploy::HybridPath::kDense
                 : tokens <= deploy::kDecodeMaxTokens ? deploy::HybridPath::kDecode
                 : sparse                             ? deploy::HybridPath::kSparse
                                                      : deploy::HybridPath::kExpand));
        } else {
          CHECK(lin.path(tokens) == deploy::HybridPath::kDense);
        }
      }
      // On the CPU the layer keeps the masked weight; on the GPU the decode
      // blocks (the packed layer's bytes) and their tile offsets and flags,
      // plus cuSPARSELt's copy for a layer of 2:4 tiles only.
      if (device.is_cpu()) {
        CHECK(lin.device_bytes() == 2 * c.out * c.in);
      } else {
        const int64_t blocks = p.bytes() + p.grid.num_tiles() * 9;
        if (lin.path(256) == deploy::HybridPath::kSparse)
          CHECK(lin.device_bytes() > blocks + c.out * c.in);
        else
          CHECK(lin.device_bytes() == blocks);
      }
      // A clone computes the same in its own memory.
      const auto x = at::randn({4, c.in}, at::kFloat).to(at::kBFloat16).to(device);
      CHECK(at::equal(lin.clone().forward(x), lin.forward(x)));
    }
  }
}

#if PATCH_WITH_CUDA
TEST_CASE("layers that share an expansion pipeline get their weights expanded ahead and the same outputs",
          "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  const at::Device device(at::kCUDA, 0);
  // A chain as in a block: each layer's output is the next one's input.
  const std::vector<Case> chain = {Case{256, 512, 128, 128, 0.45}, Case{512, 256, 128, 128, 0.25},
                                   Case{384, 512, 128, 128, 0.35}, Case{512, 384, 128, 128, 0.45}};
  std::vector<std::shared_ptr<deploy::HybridLinear>> piped;
  std::vector<at::Tensor> ref_w;
  auto pipeline = std::make_shared<deploy::cuda::ExpandPipeline>(device);
  for (size_t i = 0; i < chain.size(); ++i) {
    auto [w, m] = random_layer(chain[i], 11 + i);
    const auto p = deploy::pack_layer(w, m);
    REQUIRE(p.dense_tiles() > 0);
    deploy::HybridOptions overlap;
    overlap.overlap_expansion = true;
    piped.push_back(std::make_shared<deploy::HybridLinear>(p, device, overlap));
    REQUIRE(piped.back()->overlaps_expansion());
    piped.back()->join(pipeline);
    ref_w.push_back(masked(w, m).to(device, at::kFloat));
  }
  // Runs layers `order` of the chain on x (tokens rows), checking each output.
  auto run = [&](const std::vector<size_t>& order, int64_t tokens) {
    auto x = at::randn({tokens, chain[order.front()].in}, at::kFloat).to(device, at::kBFloat16);
    for (size_t i : order) {
      INFO("layer " << i << ", " << tokens << " tokens");
      REQUIRE(piped[i]->path(tokens) == deploy::HybridPath::kExpand);
      const auto ref = at::linear(x.to(at::kFloat), ref_w[i]);
      x = piped[i]->forward(x);
      CHECK((x.to(at::kFloat) - ref).abs().max().item<double>() <= 8e-3 * ref.abs().max().item<double>());
    }
  };
  for (int pass = 0; pass < 3; ++pass) run({0, 1, 2, 3}, 64 + pass * 100);
  // The order they joined in, then the order they ran in: the weights of layers 1-3
  // were expanded ahead in every pass, layer 0's once the last layer knew it came next.
  for (size_t i = 0; i < chain.size(); ++i) {
    INFO("layer " << i);
    CHECK(piped[i]->prefetched() == (i == 0 ? 1 : 3));
  }
  CHECK(pipeline->bytes() == 2 * 2 * 512 * 384);
  // Another order: the pipeline learns it, and the outputs stay right.
  for (int pass = 0; pass < 3; ++pass) run({0, 1, 0, 1}, 48);
  CHECK(piped[0]->prefetched() >= 4);
  // A layer that leaves frees its place: the others go on.
  piped[1].reset();
  for (int pass = 0; pass < 2; ++pass) run({2, 3}, 40);
}

// deploy.prefill_dense_copy: more than kDecodeMaxTokensBesideCopy go to cuBLAS on the kept
// W ⊙ M (a layer of 2:4 tiles only keeps cuSPARSELt from 2048 tokens), the
// decode kernel keeps the rest, and the copy's bytes are counted.
TEST_CASE("HybridLinear with a dense copy for prefill equals the masked dense matmul", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  const at::Device device(at::kCUDA, 0);
  for (const Case& c : {Case{256, 512, 128, 128, 0.45}, Case{128, 256, 64, 32, 0.5}}) {
    auto [w, m] = random_layer(c, 7);
    const auto p = deploy::pack_layer(w, m);
    deploy::HybridLinear plain(p, device), lin(p, device, deploy::HybridOptions{true});
    const bool sparse = p.dense_tiles() == 0 && deploy::sparse_supported(p.grid);
    const auto ref_w = masked(w, m).to(at::kFloat);
    for (int64_t tokens : {1, 16, 17, 33, 256, 2048}) {
      INFO(c.out << "x" << c.in << " sparsity " << c.sparsity << " tokens " << tokens << " path "
                 << deploy::path_name(lin.path(tokens)));
      CHECK(lin.path(tokens) == (tokens <= deploy::kDecodeMaxTokensBesideCopy                      ? deploy::HybridPath::kDecode
                                 : sparse && tokens >= deploy::kSparseMinTokensBesideCopy ? deploy::HybridPath::kSparse
                                                                                          : deploy::HybridPath::kDense));
      auto x = at::randn({tokens, c.in}, at::kFloat).to(at::kBFloat16);
      const auto ref = at::linear(x.to(at::kFloat), ref_w);
      const auto y = lin.forward(x.to(device)).to(at::kCPU, at::kFloat);
      CHECK((y - ref).abs().max().item<double>() <= 8e-3 * ref.abs().max().item<double>());
    }
    CHECK(lin.device_bytes() == plain.device_bytes() + 2 * c.out * c.in);
  }
}
#endif

#if PATCH_WITH_CUDA
// deploy.prefill_split: more than kDecodeMaxTokens tokens go to a CUTLASS
// hybrid kernel (sm_90 only; deploy.split_kernel: mixed or split) for layers
// of 128 x 128 tiles with dense tiles.
TEST_CASE("HybridLinear with the split prefill equals the masked dense matmul", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  const at::Device device(at::kCUDA, 0);
  deploy::HybridOptions split;
  split.prefill_split = true;
  if (!deploy::split_supported(sparsity::TileGrid(384, 512, 128, 128), device)) {
    // Asked for where it cannot run: refused with the layer named.
    auto [w, m] = random_layer({384, 512, 128, 128, 0.45}, 11);
    CHECK_THROWS_WITH(deploy::HybridLinear(deploy::pack_layer(w, m), device, split),
                      Catch::Contains("model.layers.0.mlp.up_proj") && Catch::Contains("sm_90"));
    return;
  }
  for (bool mixed : {true, false}) {
    split.prefill_mixed = mixed;
    for (double sparsity : {0.25, 0.45}) {
      auto [w, m] = random_layer({384, 512, 128, 128, sparsity}, 11);
      const auto p = deploy::pack_layer(w, m);
      REQUIRE(p.dense_tiles() > 0);
      deploy::HybridLinear plain(p, device), lin(p, device, split);
      deploy::HybridLinear copy = lin.clone();
      const auto ref_w = masked(w, m).to(at::kFloat);
      const int64_t loses_from = deploy::split_loses_from(mixed, p.sparse_tile_fraction());
      for (int64_t tokens : {1, 32, 33, 200, 1024}) {
        const auto want = tokens <= deploy::kDecodeMaxTokens ? deploy::HybridPath::kDecode
                          : tokens < loses_from              ? deploy::HybridPath::kSplit
                                                             : deploy::HybridPath::kExpand;
        INFO((mixed ? "mixed" : "split") << " kernel, sparsity " << sparsity << ", " << tokens << " tokens, path "
                                         << deploy::path_name(lin.path(tokens)));
        CHECK(lin.path(tokens) == want);
        CHECK(copy.path(tokens) == want);
        CHECK(plain.path(tokens) == (tokens <= deploy::kDecodeMaxTokens ? want : deploy::HybridPath::kExpand));
        auto x = at::randn({tokens, 512}, at::kFloat).to(at::kBFloat16);
        const auto ref = at::linear(x.to(at::kFloat), ref_w);
        const double tol = 8e-3 * ref.abs().max().item<double>();
        for (auto* k : {&lin, &copy}) {
          const auto y = k->forward(x.to(device)).to(at::kCPU, at::kFloat);
          CHECK((y - ref).abs().max().item<double>() <= tol);
        }
      }
      // The pools beside the decode blocks, a 2:4 tile in 9/16 of a dense
      // tile's bytes; a dense tile as two such tiles (split) or as it is
      // (mixed); plus the step table.
      const int64_t dense = p.dense_tiles(), tiles = p.grid.num_tiles(), tile_bytes = 128 * 128 * 2;
      const int64_t pool = mixed ? (tiles - dense) * tile_bytes * 9 / 16 + dense * tile_bytes
                                 : (tiles + dense) * tile_bytes * 9 / 16;
      CHECK(lin.device_bytes() >= plain.device_bytes() + pool);
      CHECK(lin.device_bytes() <= plain.device_bytes() + pool + 64 * 1024);
    }
  }
  // Other tiles keep their path.
  auto [w, m] = random_layer({256, 512, 64, 32, 0.45}, 12);
  const deploy::HybridLinear other(deploy::pack_layer(w, m), device, split);
  CHECK(other.path(64) == deploy::HybridPath::kExpand);
}
#endif

#if PATCH_WITH_CUDA
TEST_CASE("the decode kernel gives the same y however many warps split a slab", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  const at::Device cuda(at::kCUDA, 0);
  // 6 tile columns (the last one ragged) and 16 tile columns: from one warp
  // per slab to more warps than tile columns, which leaves some idle. 128-column
  // tiles take the kernel without per-block bounds; up to 8 tokens, 16 warps
  // over their 16 tile columns give each warp one group of four blocks, an odd
  // number, so its walk ends on an empty group.
  for (const Case& c : {Case{640, 352, 64, 64, 0.45}, Case{256, 2048, 128, 128, 0.25}}) {
    auto [w, m] = random_layer(c, 11);
    const auto p = deploy::pack_layer(w, m);
    const auto f = deploy::build_decode_format(p);
    const deploy::DecodeFormat dev{f.blocks.to(cuda), f.tile_offset.to(cuda),
                                   f.tile_dense.to(cuda)};
    const auto ref_w = masked(w, m).to(at::kFloat);
    for (int64_t tokens : {1, 5, 16, 29}) {
      const auto x = at::randn({tokens, c.in}, at::kFloat).to(at::kBFloat16);
      const auto ref = at::linear(x.to(at::kFloat), ref_w);
      const double tol = 8e-3 * ref.abs().max().item<double>();
      for (int warps : {1, 2, 3, 4, 8, 16, 0}) {
        INFO(c.out << "x" << c.in << " tokens " << tokens << " warps " << warps);
        auto y = at::empty({tokens, c.out}, at::TensorOptions(cuda).dtype(at::kBFloat16));
        deploy::cuda::decode_matmul(x.to(cuda), dev, p.grid, y, warps);
        CHECK((y.to(at::kCPU, at::kFloat) - ref).abs().max().item<double>() <= tol);
      }
    }
  }
}
#endif

#if PATCH_WITH_CUDA
TEST_CASE("back-to-back decode kernels read and write only after the one before ends", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  const at::Device cuda(at::kCUDA, 0);
  // Up to 8 tokens each launch may start while the one before runs
  // (programmatic dependent launch). Ping-pong between two buffers, so a
  // launch reads what the one before writes and overwrites what it reads; a
  // run synchronized after every launch, each step checked against the
  // masked dense matmul of its input, is the oracle (the kernel is
  // deterministic, so equal to the bit).
  auto [w, m] = random_layer(Case{512, 512, 128, 128, 0.45}, 12);
  const auto p = deploy::pack_layer(w, m);
  const auto f = deploy::build_decode_format(p);
  const deploy::DecodeFormat dev{f.blocks.to(cuda), f.tile_offset.to(cuda), f.tile_dense.to(cuda)};
  const auto ref_w = masked(w, m).to(at::kFloat);
  for (int64_t tokens : {1, 16}) {
    const auto x0 = (at::randn({tokens, 512}, at::kFloat) * 0.05).to(at::kBFloat16).to(cuda);
    const auto chain = [&](bool sync, bool overlap) {
      at::Tensor buf[2] = {x0.clone(), at::empty_like(x0)};
      for (int step = 0; step < 6; ++step) {
        const auto& in = buf[step % 2];
        const auto before = sync ? in.to(at::kCPU, at::kFloat) : at::Tensor();
        deploy::cuda::decode_matmul(in, dev, p.grid, buf[(step + 1) % 2], /*warps=*/0, overlap);
        if (!sync) continue;
        c10::cuda::device_synchronize();
        const auto want = at::linear(before, ref_w);
        const double tol = 8e-3 * want.abs().max().item<double>();
        CHECK((buf[(step + 1) % 2].to(at::kCPU, at::kFloat) - want).abs().max().item<double>() <=
              tol);
      }
      return buf[0].cpu();
    };
    INFO("tokens " << tokens);
    const auto ref = chain(/*sync=*/true, /*overlap=*/false);
    CHECK(ref.isfinite().all().item<bool>());
    CHECK(at::equal(chain(/*sync=*/false, /*overlap=*/true), ref));
    CHECK(at::equal(chain(/*sync=*/false, /*overlap=*/false), ref));
  }
}
#endif

#if PATCH_WITH_CUDA
TEST_CASE("bench-deploy times an OUTxIN shape as one linear on every path", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  deploy::DeployBenchOptions o;
  o.shapes = {"384x512"};
  o.sparsities = {0.25, 0.5};
  o.tokens = {1, 16, 64};
  o.repeats = 1;
  o.min_bytes = 1 << 20;
  o.gemm_tokens = {};
  o.device = at::Device(at::kCUDA, 0);
  std::vector<nlohmann::json> rows;
  deploy::bench_deploy(o, [&](const nlohmann::json& j) { rows.push_back(j); });
  // No block or end-to-end rows: one layer is not a model.
  REQUIRE(rows.size() == 6);
  std::set<std::string> paths;
  for (const auto& r : rows) {
    INFO(r.dump());
    CHECK(r["bench"] == "deploy_layer");
    CHECK(r["out"] == 384);
    CHECK(r["in"] == 512);
    CHECK(r["max_rel_err"].get<double>() <= 8e-3);
    CHECK(r["hybrid_us"].get<double>() > 0);
    paths.insert(r["path"].get<std::string>());
  }
  CHECK(paths == std::set<std::string>{"decode", "expand", "sparse"});
}
#endif

#if PATCH_WITH_CUDA
// The sparse GEMM rows check every kernel's output against the masked dense
// matmul before timing it (bench-deploy stops on a wrong one); here every
// kernel must have run: cuSPARSELt always, the CUTLASS SM90 kernels where the
// build has them and the GPU is a Hopper.
TEST_CASE("bench-deploy's sparse GEMM rows run cuSPARSELt and the CUTLASS kernels on a 2:4 layer", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  deploy::DeployBenchOptions o;
  o.shapes = {"384x512"};
  o.sparsities = {};
  o.tokens = {};
  o.gemm_tokens = {17, 256};
  o.repeats = 1;
  o.device = at::Device(at::kCUDA, 0);
  std::vector<nlohmann::json> rows;
  deploy::bench_deploy(o, [&](const nlohmann::json& j) { rows.push_back(j); });
  std::set<std::string> kernels;
  for (const auto& r : rows) {
    INFO(r.dump());
    CHECK(r["bench"] == "deploy_sparse_gemm");
    CHECK_FALSE(r.contains("error"));
    CHECK(r["max_rel_err"].get<double>() <= 8e-3);
    CHECK(r["s"].get<double>() > 0);
    kernels.insert(r["kernel"].get<std::string>());
  }
  std::set<std::string> want = {"cusparselt"};
#if PATCH_WITH_CUTLASS
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess && prop.major == 9)
    for (auto v : deploy::cutlass_sm90::variants()) want.insert(deploy::cutlass_sm90::variant_name(v));
#endif
  CHECK(kernels == want);
  CHECK(rows.size() == 2 * want.size());
}
#endif

#if PATCH_WITH_CUTLASS
TEST_CASE("the CUTLASS hybrid GEMMs equal the masked dense matmul", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess || prop.major != 9) return;  // the kernels are sm_90a's
  const at::Device cuda(at::kCUDA, 0);
  using deploy::cutlass_sm90::HybridKernel;
  // All dense (0.0) and all 2:4 (0.5) leave one pool of the mixed kernel empty.
  const std::vector<HybridKernel> all = {HybridKernel::kSplit, HybridKernel::kMixed, HybridKernel::kMixed128,
                                         HybridKernel::kMixed64, HybridKernel::kMixedSerial};
  for (HybridKernel kernel : all) {
    for (double sparsity : {0.25, 0.45, 0.5, 0.0}) {
      auto [w, mask] = random_layer({384, 512, 128, 128, sparsity}, 43);
      const at::Tensor wm = masked(w, mask);
      void* stream = nullptr;  // the default stream
      deploy::cutlass_sm90::HybridGemmWeight gemm(bf16_bits(wm), tile_map(mask), 384, 512, kernel, stream);
      for (int64_t tokens : {1, 17, 128, 200, 1024}) {
        const at::Tensor x = at::randn({tokens, 512}, at::TensorOptions().device(cuda)).to(at::kBFloat16);
        at::Tensor y = at::empty({tokens, 384}, x.options());
        gemm.run(x.data_ptr(), y.data_ptr(), tokens, stream);
        const at::Tensor want = at::linear(x.to(at::kFloat), wm.to(cuda).to(at::kFloat));
        const double err = (y.to(at::kFloat) - want).abs().max().item<double>() / want.abs().max().item<double>();
        INFO(deploy::cutlass_sm90::hybrid_kernel_name(kernel) << " kernel, sparsity " << sparsity << ", " << tokens
                                                              << " tokens: relative error " << err);
        CHECK(err <= 8e-3);
      }
    }
  }
  // bench-deploy times each beside cuBLAS at the sparse GEMM rows' token counts.
  deploy::DeployBenchOptions o;
  o.shapes = {"384x512"};
  o.sparsities = {0.45};
  o.tokens = {};
  o.gemm_tokens = {17, 256};
  o.repeats = 1;
  o.device = cuda;
  std::vector<nlohmann::json> rows;
  deploy::bench_deploy(o, [&](const nlohmann::json& j) {
    if (j["bench"] == "deploy_hybrid_gemm") rows.push_back(j);
  });
  REQUIRE(rows.size() == 2 * (all.size() - 1));  // every kernel but kMixed, which picks a width
  std::set<std::string> kernels;
  for (const auto& r : rows) {
    INFO(r.dump());
    CHECK_FALSE(r.contains("error"));
    CHECK(r["max_rel_err"].get<double>() <= 8e-3);
    CHECK(r["speedup"].get<double>() > 0);
    kernels.insert(r["kernel"].get<std::string>());
  }
  CHECK(kernels == std::set<std::string>{"split", "mixed-128", "mixed-64", "mixed-serial"});
  // Shapes the kernels cannot take are refused with the shape named.
  for (HybridKernel kernel : all)
    CHECK_THROWS_WITH(
        deploy::cutlass_sm90::HybridGemmWeight(std::vector<uint16_t>(100 * 128), {0}, 100, 128, kernel, nullptr),
        Catch::Contains("[out 100, in 128]"));
}
#endif

#if PATCH_WITH_CUDA
TEST_CASE("the expand kernel writes exactly W times M from the decode blocks", "[deploy]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  const at::Device cuda(at::kCUDA, 0);
  // Ragged last tile column (352 = 5.5 x 64) and last tile row (48 = 1.5 x 32),
  // all-dense and all-2:4 layers.
  for (const Case& c : {Case{640, 352, 64, 64, 0.45}, Case{48, 96, 32, 64, 0.5},
                        Case{256, 2048, 128, 128, 0.25}, Case{128, 256, 64, 32, 0.0},
                        Case{96, 160, 32, 32, 0.35}}) {
    INFO(c.out << "x" << c.in << " tiles " << c.tile_rows << "x" << c.tile_cols);
    auto [w, m] = random_layer(c, 13);
    const auto p = deploy::pack_layer(w, m);
    const auto f = deploy::build_decode_format(p);
    const deploy::DecodeFormat dev{f.blocks.to(cuda), f.tile_offset.to(cuda),
                                   f.tile_dense.to(cuda)};
    auto out = at::full({c.out, c.in}, 7.0, at::TensorOptions(cuda).dtype(at::kBFloat16));
    deploy::cuda::expand_weight(dev, p.grid, out);
    CHECK(at::equal(out.cpu(), masked(w, m)));
  }
}
#endif

TEST_CASE("patch-train pack writes the packed masked layers of a checkpoint", "[deploy][cli]") {
  test::TempDir dir;
  const std::string model = test::data_path("models/tinystories-656k");
  auto ckpt = io::load_checkpoint(model);
  const auto masks = magnitude_masks(ckpt, 32);
  maskfile::write_mask_file(dir.file("masks.safetensors"), masks);
  const std::string bin = test::train_bin();
  auto r = test::run_command("'" + bin + "' pack -q --model '" + model + "' --masks '" +
                             dir.file("masks.safetensors") + "' --out '" + dir.file("out") + "'");
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  auto summary = nlohmann::json::parse(core::read_file(dir.file("out/pack.json")));
  CHECK(summary["layers"] == masks.layers.size());
  const auto packed = deploy::read_packed(dir.file("out/packed.safetensors"));
  REQUIRE(packed.layers.size() == masks.layers.size());
  for (const auto& layer : masks.layers) {
    const auto* p = packed.find(layer.name);
    REQUIRE(p);
    const auto w = ckpt.tensors.at(layer.name + ".weight").to(at::kBFloat16);
    CHECK(at::equal(deploy::unpack_layer(*p), w * layer.mask(at::kBFloat16)));
  }
  CHECK(packed.sparsity() == Approx(masks.sparsity()));
  CHECK(summary["bytes_ratio"].get<double>() < 1.0);

  // eval --packed runs the layers through HybridLinear: in bfloat16 the same
  // perplexity, to the bit, as the masked model of eval --masks.
  const std::string eval = "'" + bin + "' eval -q --model '" + model + "' --data '" +
                           test::data_path("text/tinystories/tinystories_validation_head.txt") +
                           "' --set model.dtype=bfloat16 --set data.seq_len=128 ";
  const auto [ep, em] = eval_packed_and_masked(eval, dir);
  CHECK(ep["perplexity"].get<double>() == em["perplexity"].get<double>());
  CHECK(ep["sparsity"].get<double>() == Approx(em["sparsity"].get<double>()));
  // Both at once is a usage error.
  auto both =
      test::run_command(eval + "--packed '" + dir.file("out/packed.safetensors") + "' --masks '" +
                        dir.file("masks.safetensors") + "' --out '" + dir.file("eval-both") + "'");
  CHECK(both.exit_code == 2);

  // No mask file: a usage error; an unstructured one: refused with a reason.
  r = test::run_command("'" + bin + "' pack -q --model '" + model + "' --out '" + dir.file("o2") +
                        "'");
  CHECK(r.exit_code == 2);
  CHECK(r.err.find("model.masks") != std::string::npos);
  {
    model::Decoder d(ckpt, model::DecoderOptions{});
    prune::PruneOptions o;
    o.method = prune::Method::kMagnitude;
    o.structure = prune::Structure::kUnstructured;
    o.target_sparsity = 0.35;
    maskfile::write_mask_file(dir.file("unstructured.safetensors"),
                              prune::prune_model(d, {}, o).masks);
  }
  r = test::run_command("'" + bin + "' pack -q --model '" + model + "' --masks '" +
                        dir.file("unstructured.safetensors") + "' --out '" + dir.file("o3") + "'");
  CHECK(r.exit_code == 1);
  CHECK(r.err.find("only hybrid") != std::string::npos);
  CHECK_FALSE(std::filesystem::exists(dir.file("o3/packed.safetensors")));
}

#if PATCH_WITH_CUDA
TEST_CASE("eval --packed on the GPU scores the masked model within bf16 tolerance",
          "[deploy][cli]") {
  if (!at::hasCUDA()) return;  // built with CUDA, run without a GPU (CI)
  test::TempDir dir;
  const std::string model = test::data_path("models/tinystories-656k");
  // Whole 64x64 tiles: the GPU paths take every layer.
  const auto masks = magnitude_masks(io::load_checkpoint(model), 64);
  maskfile::write_mask_file(dir.file("masks.safetensors"), masks);
  const std::string bin = test::train_bin();
  auto r = test::run_command("'" + bin + "' pack -q --model '" + model + "' --masks '" +
                             dir.file("masks.safetensors") + "' --out '" + dir.file("out") + "'");
  REQUIRE(r.exit_code == 0);
  const auto packed = deploy::read_packed(dir.file("out/packed.safetensors"));
  for (const auto& layer : packed.layers) {
    INFO(layer.name);
    deploy::HybridLinear lin(layer, at::Device(at::kCUDA, 0));
    CHECK(lin.path(1) == deploy::HybridPath::kDecode);
    CHECK(lin.path(128) == (layer.dense_tiles() == 0 ? deploy::HybridPath::kSparse
                                                     : deploy::HybridPath::kExpand));
  }
  // Windows of 128 tokens run the expand (or cuSPARSELt) path; the oracle is
  // the masked model through at::linear on the GPU.
  const std::string eval =
      "'" + bin + "' eval -q --model '" + model + "' --data '" +
      test::data_path("text/tinystories/tinystories_validation_head.txt") +
      "' --set model.dtype=bfloat16 --set model.device=cuda --set data.seq_len=128 ";
  const auto evals = eval_packed_and_masked(eval, dir);
  const double ep = evals.first["perplexity"];
  const double em = evals.second["perplexity"];
  INFO("packed " << ep << " masks " << em);
  // bf16 outputs summed in another order: the perplexities agree to well under 1%.
  CHECK(std::abs(ep - em) <= 0.01 * em);
}
#endif

TEST_CASE("bench_deploy_summary.py puts runs side by side, row for row", "[deploy]") {
  test::TempDir dir;
  const auto write = [&](const std::string& name, const std::vector<std::string>& lines) {
    std::ofstream f(dir.file(name));
    for (const auto& l : lines) f << l << "\n";
  };
  // Rows as bench-deploy prints them (LLaMA-2-7B shape, sparsity 0.45).
  const auto row = [](const std::string& bench, nlohmann::json fields) {
    fields["bench"] = bench;
    fields["shape"] = "llama-2-7b";
    fields["target_sparsity"] = 0.45;
    if (fields.contains("dense_us"))
      fields["speedup"] = fields["dense_us"].get<double>() / fields["hybrid_us"].get<double>();
    return fields.dump();
  };
  const auto layer = [&](const std::string& layers, int tokens, double dense, double hybrid) {
    return row("deploy_layer", {{"layers", layers},
                                {"tokens", tokens},
                                {"dense_us", dense},
                                {"hybrid_us", hybrid},
                                {"device_bytes_ratio", 0.606}});
  };
  write("base.jsonl",
        {"[I] a log line, skipped", layer("gate_proj,up_proj", 1, 24.6, 17.2),
         layer("down_proj", 1, 28.0, 16.0),
         row("deploy_block", {{"tokens", 1}, {"dense_us", 130.0}, {"hybrid_us", 82.0}})});
  write("new.jsonl",
        {layer("gate_proj,up_proj", 16, 25.0, 21.1), layer("gate_proj,up_proj", 1, 24.5, 16.5),
         row("deploy_model", {{"prefill_tokens", 2048},
                              {"dense_prefill_ms", 63.1},
                              {"hybrid_prefill_ms", 67.4},
                              {"prefill_speedup", 0.936},
                              {"dense_decode_tokens_per_s", 157.2},
                              {"hybrid_decode_tokens_per_s", 216.9},
                              {"decode_speedup", 1.38}})});
  const std::string script = test::env_or("PATCH_PYTHON", "python3") + " " + test::source_dir() +
                             "/scripts/bench_deploy_summary.py ";
  auto r = test::run_command(script + "base=" + dir.file("base.jsonl") +
                             " new=" + dir.file("new.jsonl"));
  INFO(r.err);
  REQUIRE(r.exit_code == 0);
  std::vector<std::string> rows;
  std::istringstream in(r.out);
  for (std::string l; std::getline(in, l);) rows.push_back(l);
  INFO(r.out);
  const auto has = [&](size_t i, const std::string& text) {
    return rows[i].find(text) != std::string::npos;
  };
  // A header, then one row per (shape, sparsity, tokens, layers) of either
  // file: the model row (no tokens) first, tokens 1 in bench-deploy's order,
  // then tokens 16; "-" where a file lacks the row.
  REQUIRE(rows.size() == 6);
  CHECK(rows[0] == "columns: base | new");
  CHECK(has(1, "end to end"));
  CHECK(has(1, "- | decode 157 -> 217 tok/s (1.38x), prefill 2048 63.1 -> 67.4 ms (0.94x)"));
  CHECK(has(2, "gate_proj,up_proj"));
  CHECK(has(2, "24.6 ->     17.2 us (1.43x) mem 0.61 |     24.5 ->     16.5 us (1.48x) mem 0.61"));
  CHECK(has(3, "down_proj"));
  CHECK(rows[3].substr(rows[3].size() - 4) == " | -");
  CHECK(has(4, "block"));
  CHECK(has(4, "130.0 ->     82.0 us (1.59x) | -"));
  CHECK(has(5, "   16 gate_proj,up_proj"));
  CHECK(has(5, "- |     25.0 ->     21.1 us (1.18x) mem 0.61"));

  write("bad.jsonl", {layer("q_proj", 1, 13.0, 8.0), "{not json"});
  auto bad = test::run_command(script + dir.file("bad.jsonl"));
  CHECK(bad.exit_code != 0);
  CHECK(bad.err.find("bad.jsonl:2: not a JSON line") != std::string::npos);
}
