#pragma once
// Tiles of a masked weight [out, in]: tile_rows x tile_cols blocks, the last
// tile row/column smaller when the shape is not a multiple (ragged edges).
#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace patch::sparsity {

class TileGrid {
 public:
  TileGrid() = default;
  // Throws core::Error unless out, in > 0, in % 4 == 0, tiles > 0 and
  // tile_cols % 4 == 0 (a tile never splits a 2:4 group).
  TileGrid(int64_t out, int64_t in, int64_t tile_rows, int64_t tile_cols);

  int64_t out() const { return out_; }
  int64_t in() const { return in_; }
  int64_t tile_rows() const { return tile_rows_; }
  int64_t tile_cols() const { return tile_cols_; }
  int64_t rows() const { return (out_ + tile_rows_ - 1) / tile_rows_; }  // tiles down
  int64_t cols() const { return (in_ + tile_cols_ - 1) / tile_cols_; }    // tiles across
  int64_t num_tiles() const { return rows() * cols(); }
  int64_t numel() const { return out_ * in_; }
  int64_t groups() const { return in_ / 4; }  // 2:4 groups per output row

  int64_t tile_height(int64_t r) const;
  int64_t tile_width(int64_t c) const;
  int64_t tile_count(int64_t r, int64_t c) const { return tile_height(r) * tile_width(c); }
  int64_t max_tile_count() const { return tile_height(0) * tile_width(0); }
  // Weights per tile, int64 [rows, cols] on the CPU.
  at::Tensor counts() const;

  // [rows, cols] per-tile values -> [out, in] (differentiable, any dtype/device).
  at::Tensor expand(const at::Tensor& tiles) const;
  // [out, in] -> per-tile sums [rows, cols] (differentiable).
  at::Tensor reduce_sum(const at::Tensor& x) const;

  bool operator==(const TileGrid& o) const {
    return out_ == o.out_ && in_ == o.in_ && tile_rows_ == o.tile_rows_ && tile_cols_ == o.tile_cols_;
  }
  bool operator!=(const TileGrid& o) const { return !(*this == o); }
  std::string str() const;  // "[out, in] in RxC tiles"

 private:
  int64_t out_ = 0, in_ = 0, tile_rows_ = 1, tile_cols_ = 4;
};

// Throws core::ConfigError (naming mask.tile) when a tile is taller than the
// tallest layer of `shapes` ([out, in] each) or wider than the widest: such a
// tile only wastes memory (a 100000 x 100000 tile would ask for 40 GB).
void check_tile_fits(int64_t tile_rows, int64_t tile_cols, const std::vector<std::pair<int64_t, int64_t>>& shapes);

// A 0/1 mask [out, in] of `dtype` from hard decisions: tile_dense [rows, cols]
// (nonzero = dense, all ones) and pattern [out, in/4] (2:4 pattern index used
// inside sparse tiles). Any dtype, kBool included; lives on tile_dense's device.
at::Tensor build_mask(const TileGrid& grid, const at::Tensor& tile_dense, const at::Tensor& pattern,
                      at::ScalarType dtype = at::kFloat);

}  // namespace patch::sparsity
