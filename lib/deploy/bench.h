#pragma once
// patch-train bench-deploy: the hybrid kernels against cuBLAS (at::linear on the
// same masked bf16 weight), per layer shape and end to end. A benchmark, not a
// test: it needs a GPU and prints JSON.
#include <ATen/ATen.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "deploy/hybrid_linear.h"
#include "deploy/packed.h"

namespace patch::deploy {

// A hybrid mask of `grid` whose share of 2:4 tiles is as close to
// 2 * sparsity as whole tiles allow (exactly that many tiles, placed at
// random), with random 2:4 patterns.
maskfile::LayerMask random_layer_mask(const std::string& name, const sparsity::TileGrid& grid,
                                      double sparsity, at::Generator& gen);

struct DeployBenchOptions {
  // Model shapes (model::model_shape), or "OUTxIN" for one linear of that
  // shape alone (no block or end-to-end rows).
  std::vector<std::string> shapes{"llama-2-7b", "llama-3.1-8b"};
  // Of model shapes, only these linears and no block rows; empty: all.
  std::vector<std::string> layers;
  std::vector<double> sparsities{0.0, 0.25, 0.35, 0.45, 0.5};
  std::vector<int64_t> tokens{1, 4, 16, 32, 256, 2048};
  // Sparse GEMM rows: each linear shape as a layer of 2:4 tiles only, cuBLAS
  // on its masked weight against cuSPARSELt and each CUTLASS SM90 kernel, at
  // these token counts (empty: none). s = dense time / sparse time bounds
  // what any hybrid prefill kernel can gain.
  // The same token counts time the hybrid layers of `sparsities` on the 2:4
  // tensor cores alone (dense tiles as two 2:4 halves, CUTLASS builds only).
  std::vector<int64_t> gemm_tokens{256, 2048, 8192};
  int64_t tile_rows = 128, tile_cols = 128;
  int repeats = 15;  // timed graph replays; the median is reported
  int64_t min_bytes =
      1
      << 29;  // each timing cycles through copies of at least this many weight bytes (no L2 reuse)
  bool end_to_end = true;  // also a whole random model of each shape
  double e2e_sparsity = 0.45;
  int64_t e2e_prefill = 2048;
  // Generation rows of the end-to-end model (generate(): KV cache, attention
  // and CUDA-graph decode steps included): prompt tokens (0: none), new tokens
  // per sequence, batch sizes.
  int64_t gen_prompt = 1024, gen_new_tokens = 256;
  std::vector<int64_t> gen_batches{1, 16};
  uint64_t seed = 0;
  at::Device device = at::kCPU;
  HybridOptions hybrid;  // deploy.prefill_dense_copy
};

// Emits one JSON object per (shape, layer, sparsity, tokens), one per (shape,
// layer, gemm_tokens, sparse kernel), one per (shape,
// sparsity, tokens) summing a decoder block's seven linears (unless `layers`
// picks some), and, with end_to_end, the whole model's prefill time and decode
// steps per second, and one generation row per batch size (prefill and decode
// tokens/s of generate(), dense against hybrid).
void bench_deploy(const DeployBenchOptions& o,
                  const std::function<void(const nlohmann::json&)>& emit);

// The layers of a packed file (its own masks and weights), each against cuBLAS
// on the same masked weight at every token count of `o`, and their sum per
// token count (shapes, layers, sparsities and end-to-end options unused).
void bench_packed(const PackedModel& packed, const DeployBenchOptions& o,
                  const std::function<void(const nlohmann::json&)>& emit);

#if PATCH_WITH_CUDA
namespace cuda {
// Median over `repeats` replays of a CUDA graph holding launch(0..n-1) of the
// time per launch, in microseconds.
double graph_time_us(const std::function<void(int)>& launch, int n, int repeats);
// The same for several launch functions, their replays taken in turn (one of
// each per round), so that they share whatever the clock did meanwhile.
std::vector<double> graph_times_us(const std::vector<std::function<void(int)>>& launches, int n, int repeats);
}  // namespace cuda
#endif

}  // namespace patch::deploy
