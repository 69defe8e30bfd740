#pragma once
// y = x (W ⊙ M)^T for a packed hybrid layer on the GPU, which keeps only the
// layer's decode blocks (each tile in its own format: a sparse tile in 9/16
// of a dense tile's bytes), plus cuSPARSELt's copy for a layer of 2:4 tiles only:
//   decode (at most kDecodeMaxTokens tokens, 16 beside a dense copy): one
//     kernel streams the blocks once (dense: mma.m16n8k16 on all values; 2:4:
//     the kept values and their positions straight into mma.sp.m16n8k32); for
//     9 to 32 tokens a small kernel first lays x out in mma fragment order;
//   more tokens, a layer of 2:4 tiles only: the sparse tensor cores through
//     cuSPARSELt;
//   more tokens, a layer with dense tiles and HybridOptions::prefill_split:
//     the 2:4 tensor cores through the split kernel (SplitGemm);
//   more tokens, a layer with dense tiles otherwise: a kernel expands the blocks into
//     W ⊙ M in scratch memory and cuBLAS multiplies by it. On an H200 that
//     matched cuSPARSELt on the 2:4 tiles plus a block-sparse kernel for the
//     dense ones at 45% sparsity and ran 1.8x as fast at 25% (LLaMA blocks,
//     2048 tokens), with one format on the device instead of three
//     (docs/benchmarks.md, "Prefill: 17 tokens and more").
// On the CPU, and for shapes the kernels do not cover, it multiplies by the
// masked dense weight (the reference).
#include <ATen/ATen.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "deploy/cutlass_hybrid_gemm.h"
#include "deploy/packed.h"
#include "model/decoder.h"

namespace patch::deploy {

enum class HybridPath { kDecode, kSparse, kSplit, kExpand, kDense };
const char* path_name(HybridPath p);

// Tokens the decode kernel takes (one, two or four n-tiles of 8 tokens).
inline constexpr int64_t kDecodeKernelMaxTokens = 32;
// Tokens up to which forward() takes the decode kernel: all it takes. For 17
// to 32 tokens it ran a LLaMA-2-7B block at 45% at 0.89-0.90x cuBLAS, where
// expansion + cuBLAS ran 0.42-0.43x (H100, docs/benchmarks.md).
inline constexpr int64_t kDecodeMaxTokens = kDecodeKernelMaxTokens;
// Beside a dense copy, cuBLAS on the copy takes over from 17 tokens: 0.98-1.01x
// there against the decode kernel's 0.89x.
inline constexpr int64_t kDecodeMaxTokensBesideCopy = 16;
// Tokens from which a layer of 2:4 tiles only keeps cuSPARSELt even beside a
// dense copy: measured 1.30-1.34x cuBLAS at 2048 tokens, 0.92-0.97x at 256
// (LLaMA-2-7B and LLaMA-3.1-8B blocks, H200).
inline constexpr int64_t kSparseMinTokensBesideCopy = 2048;

// The tokens from which expansion + cuBLAS beats prefill_split's kernel on a
// layer whose tiles are a fraction `sparse_fraction` 2:4 (INT64_MAX: never).
// The split kernel costs (2 - f) / s of cuBLAS, s = 1.0-1.1 from 2048 tokens,
// where expansion + cuBLAS runs 0.78-0.83x; so from about 1024 tokens it loses
// below f = 0.7 (H100: 0.67x against 0.78x at 25% and 2048 tokens, 0.90x against
// 0.83x at 45%; at 256 tokens 0.64x against 0.42x). The mixed kernel costs f / s
// + (1 - f) at best and keeps every token count until measured otherwise.
int64_t split_loses_from(bool mixed, double sparse_fraction);

struct HybridOptions {
  // Prefill-heavy serving: keep W ⊙ M dense on the device as well, and give
  // cuBLAS more than kDecodeMaxTokensBesideCopy tokens on it (never slower
  // than dense prefill) at the cost of a dense layer's memory on top of the blocks.
  bool prefill_dense_copy = false;
  // Prefill without a dense copy: while one layer's GEMM runs, a second stream
  // expands the next layer's W ⊙ M (the layers installed together share two
  // layers' worth of scratch memory and learn their order as they run). Off
  // until it has run on a GPU.
  bool overlap_expansion = false;
  // Prefill on the 2:4 tensor cores for every layer of 128 x 128 tiles
  // (sm_90, a build with the CUTLASS kernels): keep the layer as a pool of 2:4
  // tiles beside the decode blocks, a dense tile as two 2:4 halves, and give
  // more than kDecodeMaxTokens tokens to cuda::SplitGemm instead of expansion
  // + cuBLAS, up to where expansion wins (split_loses_from). Layers of other
  // tiles, or of 2:4 tiles only (cuSPARSELt), keep their path. Excludes
  // prefill_dense_copy.
  bool prefill_split = false;
  // prefill_split's kernel: dense tiles on the dense wgmma beside the 2:4
  // tiles' wgmma.sp (mixed), or each as two 2:4 halves (split). Split until
  // the mixed kernel has run on a GPU.
  bool prefill_mixed = false;
};

// Tile columns the decode kernel takes: it keeps a tile row's tile offsets in
// shared memory.
inline constexpr int64_t kMaxTileColumns = 512;

// The decode blocks (decode and expand paths) need out % 16 == 0, in % 32 == 0,
// tiles of 16k x 32k and at most kMaxTileColumns tile columns.
bool decode_supported(const sparsity::TileGrid& grid);
// cuSPARSELt takes a layer of 2:4 tiles only with out % 64 == 0 and in % 32 == 0.
bool sparse_supported(const sparsity::TileGrid& grid);

// The split kernel (HybridOptions::prefill_split) takes 128 x 128 tiles of a
// layer whose out and in are multiples of 128, on an sm_90 GPU, in a build
// with the CUTLASS kernels.
bool split_supported(const sparsity::TileGrid& grid, at::Device device);

// The decode kernel's layout of a layer: per tile, its 16x32 blocks in
// row-major block order; a dense block is 1024 bytes (per lane 16 bytes of
// mma.m16n8k16 A fragments for k 0-15, then 16 for k 16-31, lane-major), a 2:4
// block 576 bytes (per lane the 16-byte mma.sp A fragment of the compressed
// 16x16 values, then 16 32-bit metadata words for the lanes whose
// threadID_in_group is 0 or 1).
struct DecodeFormat {
  at::Tensor blocks;       // uint8 [bytes]
  at::Tensor tile_offset;  // int64 [rows * cols]: byte offset of each tile
  at::Tensor tile_dense;   // uint8 [rows * cols]
};
DecodeFormat build_decode_format(const PackedLayer& layer);  // CPU tensors
// Reads a DecodeFormat back into the [out, in] bf16 weight by the PTX ISA's
// fragment definitions: the CPU oracle for build_decode_format.
at::Tensor decode_format_weight(const DecodeFormat& fmt, const sparsity::TileGrid& grid);

#if PATCH_WITH_CUDA
namespace cuda {
// y [tokens, out] = x [tokens, in] W^T from the decode format (tokens <= 32),
// by one CTA per 16 rows of `warps` (1 to 16) warps splitting the columns; 0
// picks the number for the layer's shape and the device. With `overlap` the
// kernel may start streaming its weights while the kernel before it on the
// stream still runs (a programmatic dependent launch, up to 8 tokens); it
// reads x and writes y only once that one has finished. The decode format
// must not come from the kernel just before (a layer's is copied in once).
void decode_matmul(const at::Tensor& x, const DecodeFormat& fmt, const sparsity::TileGrid& grid,
                   at::Tensor& y, int warps = 0, bool overlap = true);
// w [out, in] bf16 = the layer's W ⊙ M, from its decode blocks.
void expand_weight(const DecodeFormat& fmt, const sparsity::TileGrid& grid, at::Tensor& w);
// A 2:4 weight [out, in] compressed once for cuSPARSELt; multiply() writes
// y = x W^T for any token count (padded to a multiple of 16 with zero rows),
// with one matmul plan per token count made (and its algorithm searched) on
// first use.
class SparseGemm {
 public:
  explicit SparseGemm(const at::Tensor& weight);
  SparseGemm(const SparseGemm& other);  // a copy of the compressed weight
  SparseGemm& operator=(const SparseGemm&) = delete;
  ~SparseGemm();
  void multiply(const at::Tensor& x, at::Tensor& y);
  int64_t bytes() const;  // of the compressed weight

 private:
  struct State;
  std::unique_ptr<State> s_;
};

// A hybrid layer of 128 x 128 tiles in one tensor-core kernel
// (cutlass_hybrid_gemm.h): its 2:4 tiles on wgmma.sp, its dense tiles as two
// 2:4 halves (split) or on the dense wgmma (mixed). The pools are built once
// on the device from the masked weight (CPU bf16 [out, in]) and the tile map
// (CPU uint8 [out / 128, in / 128], 1 dense); multiply() writes y = x W^T for
// any token count, allocating nothing.
class SplitGemm {
 public:
  SplitGemm(const at::Tensor& masked, const at::Tensor& tile_dense, at::Device device,
            cutlass_sm90::HybridKernel kernel = cutlass_sm90::HybridKernel::kSplit);
  SplitGemm(const SplitGemm&) = delete;
  SplitGemm& operator=(const SplitGemm&) = delete;
  ~SplitGemm();
  void multiply(const at::Tensor& x, at::Tensor& y);
  int64_t bytes() const;  // of the pools, the metadata and the step table
  cutlass_sm90::HybridKernel kernel() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
};
}  // namespace cuda
#endif

#if PATCH_WITH_CUDA
namespace cuda {
// The expansions of layers that run one after the other, overlapped with their
// GEMMs: two scratch buffers of the largest layer's W ⊙ M and a second stream.
// acquire() hands out a layer's weight, ready on the current stream (expanded
// there unless the layer before it already had it expanded on the side
// stream), and starts expanding the layer that followed it last time into the
// other buffer; release() marks the buffer free once the reads of it are
// enqueued. Layers must be add()ed before they acquire() and remove()d before
// their formats go. While the current stream is being captured into a CUDA
// graph, acquire() returns an undefined tensor (the caller expands itself).
class ExpandPipeline {
 public:
  explicit ExpandPipeline(at::Device device);
  ExpandPipeline(const ExpandPipeline&) = delete;
  ExpandPipeline& operator=(const ExpandPipeline&) = delete;
  ~ExpandPipeline();
  void add(const void* layer, const DecodeFormat* fmt, const sparsity::TileGrid* grid);
  void remove(const void* layer);
  at::Tensor acquire(const void* layer);
  void release();
  int64_t prefetched(const void* layer) const;  // acquires that found the weight expanded ahead
  int64_t bytes() const;                        // of the two buffers, once allocated

 private:
  struct State;
  std::unique_ptr<State> s_;
};
}  // namespace cuda
#endif

class HybridLinear {
 public:
  // Moves the layer's formats to `device` (CUDA: the decode blocks, and
  // cuSPARSELt's compressed weight for a layer of 2:4 tiles only, or the split
  // kernel's pool (prefill_split); CPU: the masked dense weight). Throws
  // core::Error naming the layer where prefill_split is asked for on a device
  // or build without the split kernel.
  HybridLinear(const PackedLayer& layer, at::Device device, const HybridOptions& options = {});
  HybridLinear(HybridLinear&&) noexcept;
  HybridLinear& operator=(HybridLinear&&) noexcept;
  ~HybridLinear();

  // The same layer in new device memory (benchmarks cycle through copies).
  HybridLinear clone() const;

  // x [..., in] bfloat16 on the layer's device -> [..., out] bfloat16.
  at::Tensor forward(const at::Tensor& x);
  // The path forward() takes for `tokens` rows of x.
  HybridPath path(int64_t tokens) const;
  const std::string& name() const;
  int64_t out() const;
  int64_t in() const;
  at::Device device() const;
  // Bytes the layer keeps on its device, every path's format together.
  int64_t device_bytes() const;
  // Whether the decode kernel may overlap the end of the kernel before it
  // (default on; bench-deploy turns it off to time a layer on its own).
  void set_overlap(bool on);
  // Whether the layer expands its weight for more than kDecodeMaxTokens tokens
  // through an expansion pipeline (HybridOptions::overlap_expansion).
  bool overlaps_expansion() const;
  // Forwards that found the weight expanded ahead by the pipeline.
  int64_t prefetched() const;
#if PATCH_WITH_CUDA
  // Joins the layers that run one after the other on the same device
  // (install_kernels does this for the kernels it installs).
  void join(const std::shared_ptr<cuda::ExpandPipeline>& pipeline);
#endif

 private:
  struct Impl;
  explicit HybridLinear(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Routes each named linear of `decoder` through its kernel (replacing x W^T;
// the bias is still added); the kernels that overlap their expansions share one
// pipeline. Throws core::Error naming `source` and the layer
// when the decoder has no such linear or its weight has another shape.
using NamedKernels = std::vector<std::pair<std::string, std::shared_ptr<HybridLinear>>>;
void install_kernels(model::Decoder& decoder, const NamedKernels& kernels, const std::string& source);
// Every layer of `packed` as a kernel on the decoder's device, installed.
void install_packed(model::Decoder& decoder, const PackedModel& packed, const HybridOptions& options = {});
// Back to the dense weights everywhere.
void remove_kernels(model::Decoder& decoder);

}  // namespace patch::deploy
