#pragma once
// One-shot pruning of a single linear layer: magnitude, Wanda and SparseGPT
// under three structures (2:4 everywhere, unstructured, hybrid tiles + 2:4).
// The driver (pruner.h) feeds them calibration statistics block by block.
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "sparsity/tile_grid.h"

namespace patch::prune {

enum class Method { kMagnitude, kWanda, kSparseGPT };
enum class Structure { k24, kUnstructured, kHybrid };
Method parse_method(const std::string& name);        // magnitude | wanda | sparsegpt; core::ConfigError
Structure parse_structure(const std::string& name);  // 2:4 | unstructured | hybrid; core::ConfigError
std::string method_name(Method m);
std::string structure_name(Structure s);

// Statistics of a layer's calibration inputs x [tokens, in], accumulated in fp32
// (fp64 for fp64 inputs): sum over tokens of x_j^2 (Wanda) and, when asked, X^T X
// (SparseGPT's Hessian up to a factor the algorithm does not depend on).
struct InputStats {
  InputStats(int64_t in, bool hessian, const at::TensorOptions& opts);
  void add(const at::Tensor& x);  // x [..., in]
  at::Tensor sq_norm;             // [in]
  at::Tensor hessian;             // [in, in]; undefined unless asked for
  int64_t tokens = 0;
};

// What a layer's mask must look like.
struct LayerTarget {
  Structure structure = Structure::k24;
  double sparsity = 0.5;   // unstructured: fraction of weights removed
  sparsity::TileGrid grid;  // hybrid: the tiles
  at::Tensor tile_dense;    // hybrid: uint8 [rows, cols], 1 = dense (no pruning inside)
  // When defined, the keep mask (bool [out, in]) to use as it is: no selection,
  // only SparseGPT's update of the kept weights (reconstruction under a given mask).
  at::Tensor fixed_keep;
};

// Importance scores [out, in] (fp32): |W| and Wanda's |W| * ||X_j||_2.
at::Tensor magnitude_score(const at::Tensor& weight);
at::Tensor wanda_score(const at::Tensor& weight, const InputStats& stats);

// Keep mask (bool [out, in]) from a score: 2:4 keeps each group's best pattern
// (largest kept sum, ties to the lower index); hybrid does so inside sparse
// tiles only; unstructured removes the round(sparsity * n) lowest scores of each
// output row (per_row, Wanda's comparison group) or of the whole layer
// (magnitude), ties broken by position.
at::Tensor keep_from_score(const at::Tensor& score, const LayerTarget& target, bool per_row);

struct SparseGPTOptions {
  double percdamp = 0.01;  // dampening: percdamp * mean(diag H) added to the diagonal
  int64_t blocksize = 128; // columns per lazy-update block (a multiple of 4)
  int max_attempts = 6;    // a failed Cholesky retries with 10x the dampening
  bool update_weights = true;  // false: keep only the mask (a prior)
  // After the column sweep, up to this many conjugate-gradient steps take the
  // kept weights of every row to the least-squares optimum under the mask
  // (refine_least_squares); 0: SparseGPT as published.
  int64_t refine_iters = 0;
};

struct SparseGPTResult {
  at::Tensor keep;      // bool [out, in]
  at::Tensor weight;    // the OBS-updated pruned weight in the compute precision; undefined if !update_weights
  double percdamp = 0;  // the dampening that factorized
};

// SparseGPT (Frantar & Alistarh 2023): columns left to right in blocks, each
// pruned weight's error spread over the later columns through the Cholesky
// factor of the inverse dampened Hessian. 2:4 picks, at each group's first
// column, the two weights of least w^2 / [H^-1]_jj^2; unstructured removes the
// round(sparsity * n) lowest of that saliency per block of columns. Inputs that
// are always zero (dead diagonal) get weight 0 in the update. Computes in fp32 (fp64 for fp64 weights) on the
// weight's device. `name` labels errors and the retry warning.
SparseGPTResult sparsegpt(const at::Tensor& weight, const at::Tensor& hessian, const LayerTarget& target,
                          const SparseGPTOptions& opts, const std::string& name = "layer");

// SparseGPT's sweep freezes each column once it is passed, so its kept weights
// are not the best ones for the mask. Per row, the best are the minimizer of
// (x - w) H (x - w)^T over x with x_j = 0 where keep is false: the linear
// system H_KK x_K = (H w)_K on the kept set K. This solves every row's system
// at once by Jacobi-preconditioned conjugate gradients (one [out, in] x [in, in]
// product per step), from `start` (masked), for at most `iters` steps or until
// every row's residual falls below `tol` of its first. H: symmetric positive
// definite [in, in] (dampened); all in the dtype of `weight`.
at::Tensor refine_least_squares(const at::Tensor& weight, const at::Tensor& start, const at::Tensor& hessian,
                                const at::Tensor& keep, int64_t iters, double tol = 1e-6);

}  // namespace patch::prune
