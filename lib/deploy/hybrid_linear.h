#pragma once
// y = x (W ⊙ M)^T for a packed hybrid layer, on the GPU without ever forming
// the dense masked weight:
//   decode (at most 16 tokens): one kernel streams the weight once, each 16x32
//     block in its own format (dense: mma.m16n8k16 on all values; 2:4: the
//     kept values and their positions straight into mma.sp.m16n8k32), so a
//     sparse tile costs 9/16 of a dense tile's bytes; for 9 to 16 tokens a
//     small kernel first lays x out in mma fragment order;
//   prefill (more tokens): the 2:4 tiles on the sparse tensor cores through
//     cuSPARSELt (dense tiles zeroed, which is a valid 2:4 matrix), then a
//     block-sparse tensor-core kernel adds the products of the dense tiles only.
// On the CPU, and for shapes the kernels do not cover, it multiplies by the
// masked dense weight (the reference).
#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "deploy/packed.h"

namespace patch::deploy {

enum class HybridPath { kDecode, kPrefill, kDense };
const char* path_name(HybridPath p);

// Tokens up to which forward() takes the decode kernel.
inline constexpr int64_t kDecodeMaxTokens = 16;

// Tile columns the kernels take: both keep a tile row's column data in shared
// memory.
inline constexpr int64_t kMaxTileColumns = 512;

// The decode kernel needs out % 16 == 0, in % 32 == 0, tiles of 16k x 32k and
// at most kMaxTileColumns tile columns.
bool decode_supported(const sparsity::TileGrid& grid);
// The prefill path needs whole tiles (out % tile_rows == in % tile_cols == 0),
// tile_rows % 64 == 0, tile_cols % 32 == 0 and at most kMaxTileColumns tile
// columns.
bool prefill_supported(const sparsity::TileGrid& grid);

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
// The same from the layer's unpacked weight (unpack_layer), when it is at hand.
DecodeFormat build_decode_format(const PackedLayer& layer, const at::Tensor& weight);
// Reads a DecodeFormat back into the [out, in] bf16 weight by the PTX ISA's
// fragment definitions: the CPU oracle for build_decode_format.
at::Tensor decode_format_weight(const DecodeFormat& fmt, const sparsity::TileGrid& grid);

#if PATCH_WITH_CUDA
namespace cuda {
// y [tokens, out] = x [tokens, in] W^T from the decode format (tokens <= 16),
// by one CTA per 16 rows of `warps` (1 to 16) warps splitting the columns; 0
// picks the number for the layer's shape and the device.
void decode_matmul(const at::Tensor& x, const DecodeFormat& fmt, const sparsity::TileGrid& grid,
                   at::Tensor& y, int warps = 0);
// y += x D^T over the dense tiles only: tiles [n, tile_rows, tile_cols] in
// row-major tile order, band_ptr [rows + 1] their CSR over tile rows, band_cols
// [n] their tile columns.
void dense_tiles_matmul(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& band_ptr,
                        const at::Tensor& band_cols, const sparsity::TileGrid& grid, at::Tensor& y);
// A 2:4 weight [out, in] compressed once for cuSPARSELt; multiply() writes
// y = x W^T, with one matmul plan per token count made (and its algorithm
// searched) on first use.
class SparseGemm {
 public:
  explicit SparseGemm(const at::Tensor& weight);
  SparseGemm(const SparseGemm& other);  // a copy of the compressed weight
  SparseGemm& operator=(const SparseGemm&) = delete;
  ~SparseGemm();
  void multiply(const at::Tensor& x, at::Tensor& y);

 private:
  struct State;
  std::unique_ptr<State> s_;
};
}  // namespace cuda
#endif

class HybridLinear {
 public:
  // Moves the layer's formats to `device` (CUDA: decode blocks, cuSPARSELt's
  // compressed 2:4 part and the dense tiles; CPU: the masked dense weight).
  HybridLinear(const PackedLayer& layer, at::Device device);
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

 private:
  struct Impl;
  explicit HybridLinear(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace patch::deploy
