#pragma once
// y = x · Wᵀ through CUTLASS's SM90 structured-sparse GEMM (wgmma.sp), for a
// bf16 weight W [out, in] that is 2:4 sparse along in. bf16 in and out, fp32
// accumulation. CUTLASS sees it as D = W · Xᵀ with M = out, N = tokens,
// K = in: W is the sparse A (row-major), x the K-major B and y the M-major D.
// Plain C++ (no ATen): pointers are device addresses, streams cudaStream_t
// passed as void*.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace patch::deploy::cutlass_sm90 {

// Kernel configurations: schedule, CTA tile (M x N x K) and cluster (M x N).
enum class Variant {
  kCooperative128x128x128Cluster1x2,
  kPingpong128x128x128Cluster1x2,
  kCooperative128x256x128Cluster1x2,
  kCooperative128x128x128Cluster2x1,
  kCooperative128x128x128StreamK,  // 1x1 cluster, stream-K tile scheduler
  kCooperative128x64x128StreamK,
};

std::vector<Variant> variants();  // those built (none with PATCH_CUTLASS_SCHEDULES=OFF)
const char* variant_name(Variant v);  // e.g. "cutlass_coop_128x128_1x2"

// Whether the kernels were compiled in (nvcc targeting sm_90a, CUDA >= 12.2).
// Without them SparseWeight's constructor throws. They run on sm_90 GPUs only.
bool available();

// One weight, compressed for one variant (the compressed values and the
// metadata), and the GEMM that multiplies by it.
class SparseWeight {
 public:
  // Compresses w (device bf16 [out, in], row-major, at most 2 nonzeros in every
  // 4 consecutive inputs of a row: the compressor keeps the first two it finds)
  // on `stream`; w must stay valid until the stream reaches that point. Throws
  // std::runtime_error (one line: the variant, the shape and the CUTLASS status
  // or CUDA error) when the shape cannot be implemented (the kernels' TMA needs
  // in % 16 == 0, out % 8 == 0 and 16-byte aligned pointers) or a CUDA call fails.
  SparseWeight(const void* w, int64_t out, int64_t in, Variant v, void* stream);
  ~SparseWeight();
  SparseWeight(SparseWeight&&) noexcept;
  SparseWeight& operator=(SparseWeight&&) noexcept;

  // y = x · Wᵀ on `stream`: x device bf16 [tokens, in], y device bf16
  // [tokens, out], both contiguous. The GEMM workspace is owned and grown by the
  // object (the kernels here need none, so run() allocates nothing and can be
  // captured in a CUDA graph). Throws std::runtime_error as above.
  void run(const void* x, void* y, int64_t tokens, void* stream);

  size_t bytes() const;  // device bytes of the compressed values and the metadata
  Variant variant() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace patch::deploy::cutlass_sm90
