#pragma once
// y = x · Wᵀ for a hybrid layer (128 x 128 tiles, each dense or 2:4) in one
// CUTLASS SM90 kernel on the tensor cores, y written once. Two kernels:
//   kSplit  the 2:4 tensor cores alone (hybrid_split_plan.h): a 2:4 tile is one
//           wgmma.sp step, a dense tile two (its groups' inputs 0-1, then 2-3);
//   kMixed  a 2:4 tile is one wgmma.sp step, a dense tile two dense wgmma steps
//           of 64 inputs (MixedPlan): the dense tiles read once, at dense speed,
//           one step's instructions in flight while the next is issued; output
//           tiles of 128 x 64 tokens where 128 x 128 ones would leave SMs
//           without a tile (mixed_narrow), else 128 x 128;
//   kMixed128, kMixed64  kMixed with the one tile width;
//   kMixedSerial  kMixed128 with each step's instructions completed before the
//           next is issued.
// bf16 in and out, fp32 accumulation. Plain C++ (no ATen): device pointers,
// streams as void*.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace patch::deploy::cutlass_sm90 {

enum class HybridKernel { kSplit, kMixed, kMixed128, kMixed64, kMixedSerial };
inline const char* hybrid_kernel_name(HybridKernel k) {
  switch (k) {
    case HybridKernel::kSplit: return "split";
    case HybridKernel::kMixed: return "mixed";
    case HybridKernel::kMixed128: return "mixed-128";
    case HybridKernel::kMixed64: return "mixed-64";
    case HybridKernel::kMixedSerial: return "mixed-serial";
  }
  return "?";
}

// Whether kMixed runs `tokens` of a layer with `out` outputs on tiles of 64
// tokens: when tiles of 128 would be fewer than the SMs.
inline bool mixed_narrow(int64_t out, int64_t tokens, int64_t sm_count) {
  return (out / 128) * ((tokens + 127) / 128) < sm_count;
}

class HybridGemmWeight {
 public:
  // w: the masked weight W ⊙ M on the host, bf16 bits [out, in] row-major;
  // tile_dense: [out / 128, in / 128] row-major, 1 for a dense tile, whose 2:4
  // tiles must hold at most two nonzeros in every four consecutive inputs.
  // out and in multiples of 128. Uploads and compresses on `stream`. Throws
  // std::runtime_error (one line: the shape and the CUDA or CUTLASS error), or
  // when the kernels were not built (available() in cutlass_sparse_gemm.h).
  HybridGemmWeight(const std::vector<uint16_t>& w, const std::vector<uint8_t>& tile_dense, int64_t out, int64_t in,
                   HybridKernel kernel, void* stream);
  ~HybridGemmWeight();
  HybridGemmWeight(HybridGemmWeight&&) noexcept;
  HybridGemmWeight& operator=(HybridGemmWeight&&) noexcept;

  // y [tokens, out] = x [tokens, in] · Wᵀ on `stream`, both device bf16,
  // contiguous, 16-byte aligned. Allocates nothing: can be captured in a graph.
  void run(const void* x, void* y, int64_t tokens, void* stream);

  size_t bytes() const;  // device bytes: pools, metadata, step table
  HybridKernel kernel() const { return kernel_; }

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  HybridKernel kernel_;
};

}  // namespace patch::deploy::cutlass_sm90
