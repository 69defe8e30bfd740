#include "sparsity/tile_grid.h"

#include <algorithm>

#include "core/error.h"
#include "sparsity/patterns.h"

namespace patch::sparsity {

TileGrid::TileGrid(int64_t out, int64_t in, int64_t tile_rows, int64_t tile_cols)
    : out_(out), in_(in), tile_rows_(tile_rows), tile_cols_(tile_cols) {
  if (out <= 0 || in <= 0 || in % kGroupSize != 0)
    throw core::Error(core::str("weight shape [", out, ", ", in,
                                "] cannot take a 2:4 mask (expected positive sizes, in a multiple of 4)"));
  if (tile_rows <= 0 || tile_cols <= 0 || tile_cols % kGroupSize != 0)
    throw core::ConfigError(core::str("tile size ", tile_rows, "x", tile_cols,
                                      " is invalid (expected positive rows and cols a multiple of 4)"));
}

int64_t TileGrid::tile_height(int64_t r) const { return std::min(tile_rows_, out_ - r * tile_rows_); }
int64_t TileGrid::tile_width(int64_t c) const { return std::min(tile_cols_, in_ - c * tile_cols_); }

at::Tensor TileGrid::counts() const {
  auto h = at::full({rows()}, tile_rows_, at::kLong);
  auto w = at::full({cols()}, tile_cols_, at::kLong);
  h[rows() - 1] = tile_height(rows() - 1);
  w[cols() - 1] = tile_width(cols() - 1);
  return h.unsqueeze(1) * w.unsqueeze(0);
}

at::Tensor TileGrid::expand(const at::Tensor& tiles) const {
  core::check(tiles.dim() == 2 && tiles.size(0) == rows() && tiles.size(1) == cols(), "TileGrid::expand",
              core::str("expected [", rows(), ", ", cols(), "] tile values for ", str()));
  // One broadcast copy over the padded grid, then a view cut to [out, in].
  auto full = tiles.reshape({rows(), 1, cols(), 1})
                  .expand({rows(), tile_rows_, cols(), tile_cols_})
                  .reshape({rows() * tile_rows_, cols() * tile_cols_});
  return full.narrow(0, 0, out_).narrow(1, 0, in_);
}

at::Tensor TileGrid::reduce_sum(const at::Tensor& x) const {
  core::check(x.dim() == 2 && x.size(0) == out_ && x.size(1) == in_, "TileGrid::reduce_sum",
              core::str("expected a [", out_, ", ", in_, "] tensor"));
  auto padded = at::constant_pad_nd(x, {0, cols() * tile_cols_ - in_, 0, rows() * tile_rows_ - out_}, 0);
  return padded.view({rows(), tile_rows_, cols(), tile_cols_}).sum({1, 3});
}

std::string TileGrid::str() const {
  return core::str("[", out_, ", ", in_, "] in ", tile_rows_, "x", tile_cols_, " tiles");
}

at::Tensor build_mask(const TileGrid& grid, const at::Tensor& tile_dense, const at::Tensor& pattern,
                      at::ScalarType dtype) {
  core::check(pattern.dim() == 2 && pattern.size(0) == grid.out() && pattern.size(1) == grid.groups(),
              "build_mask", core::str("expected a [", grid.out(), ", ", grid.groups(), "] pattern for ", grid.str()));
  // uint8 arithmetic, then one cast, so every dtype (bool included) works.
  auto m24 = expand_patterns(pattern.to(tile_dense.device()), at::kByte);
  auto dense = grid.expand(tile_dense.ne(0).to(at::kByte));
  return at::maximum(dense, m24).to(dtype);
}

void check_tile_fits(int64_t tile_rows, int64_t tile_cols, const std::vector<std::pair<int64_t, int64_t>>& shapes) {
  int64_t max_out = 0, max_in = 0;
  for (const auto& [out, in] : shapes) {
    max_out = std::max(max_out, out);
    max_in = std::max(max_in, in);
  }
  // Columns go up to the widest layer rounded up to whole 2:4 groups.
  if (!shapes.empty() && (tile_rows > max_out || tile_cols > (max_in + 3) / 4 * 4))
    throw core::ConfigError(core::str("mask.tile: [", tile_rows, ", ", tile_cols,
                                      "] is larger than every masked layer (the tallest has ", max_out,
                                      " rows, the widest ", max_in, " columns)"));
}

}  // namespace patch::sparsity
