#pragma once
// y = x · Wᵀ for a hybrid layer (128 x 128 tiles, each dense or 2:4) on the
// 2:4 tensor cores alone, through a CUTLASS SM90 wgmma.sp kernel whose producer
// follows each row block's step list (hybrid_split_plan.h): a 2:4 tile is one
// step, a dense tile two (its groups' inputs 0-1, then 2-3). bf16 in and out,
// fp32 accumulation, y written once. Plain C++ (no ATen): device pointers,
// streams as void*.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace patch::deploy::cutlass_sm90 {

class HybridSplitWeight {
 public:
  // w: the masked weight W ⊙ M on the host, bf16 bits [out, in] row-major;
  // tile_dense: [out / 128, in / 128] row-major, 1 for a dense tile, whose 2:4
  // tiles must hold at most two nonzeros in every four consecutive inputs.
  // out and in multiples of 128. Uploads and compresses on `stream`. Throws
  // std::runtime_error (one line: the shape and the CUDA or CUTLASS error), or
  // when the kernels were not built (available() in cutlass_sparse_gemm.h).
  HybridSplitWeight(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense, int64_t out,
                    int64_t in, void* stream);
  ~HybridSplitWeight();
  HybridSplitWeight(HybridSplitWeight&&) noexcept;
  HybridSplitWeight& operator=(HybridSplitWeight&&) noexcept;

  // y [tokens, out] = x [tokens, in] · Wᵀ on `stream`, both device bf16,
  // contiguous, 16-byte aligned. Allocates nothing: can be captured in a graph.
  void run(const void* x, void* y, int64_t tokens, void* stream);

  size_t bytes() const;  // device bytes: compressed pool, metadata, step table

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace patch::deploy::cutlass_sm90
