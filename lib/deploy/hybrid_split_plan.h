#pragma once
// How a hybrid layer runs on 2:4 tensor cores alone: a 2:4 tile is one 2:4
// step, and a dense tile is two, the first keeping inputs 0 and 1 of every
// group of four and the second inputs 2 and 3 (each half is 2:4, and the two
// add up to the tile). Each row block of 128 outputs then runs a list of steps
// (a tile of the pool, the input block it multiplies), all through the same
// wgmma.sp main loop (cutlass_hybrid_gemm.h). A dense tile costs two sparse
// steps: at a fraction f of 2:4 tiles the layer costs (2 - f) / s of a dense
// GEMM, s the sparse GEMM's speed-up.
// Plain C++: the plan and the pool's values are made on the host.
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace patch::deploy {

inline constexpr int64_t kSplitTile = 128;  // the kernel's CTA tile: rows and inputs of a mask tile

struct SplitPlan {
  int64_t row_blocks = 0, k_tiles = 0;
  int64_t max_steps = 0;         // the longest row block's step count
  std::vector<int32_t> counts;   // [row_blocks] steps of each row block (k_tiles + its dense tiles)
  std::vector<int32_t> steps;    // [row_blocks, max_steps, 2]: pool tile, input block (unused steps -1)
  enum class Part : uint8_t { kWhole = 0, kLow = 1, kHigh = 2 };
  struct PoolTile {
    int32_t row_block, k_tile;
    Part part;
  };
  std::vector<PoolTile> pool;  // the 2:4 tiles the steps read, in order
};

// Header-only: the CUTLASS target, which deploy links, uses it too.

// Both plans take a step per tile and one more per dense tile: each row
// block's count into `counts`; returns the largest.
inline int64_t count_steps(const std::vector<uint8_t>& tile_dense, int64_t row_blocks, int64_t k_tiles,
                           std::vector<int32_t>& counts) {
  counts.assign(static_cast<size_t>(row_blocks), 0);
  int64_t max_steps = 0;
  for (int64_t r = 0; r < row_blocks; ++r) {
    int64_t dense = 0;
    for (int64_t k = 0; k < k_tiles; ++k) dense += tile_dense[static_cast<size_t>(r * k_tiles + k)] != 0;
    counts[static_cast<size_t>(r)] = static_cast<int32_t>(k_tiles + dense);
    max_steps = std::max(max_steps, k_tiles + dense);
  }
  return max_steps;
}

// Both plans' argument check: a non-empty grid and a tile map of its size.
inline void check_grid(const char* what, const std::vector<uint8_t>& tile_dense, int64_t row_blocks,
                       int64_t k_tiles) {
  if (row_blocks <= 0 || k_tiles <= 0 || static_cast<int64_t>(tile_dense.size()) != row_blocks * k_tiles)
    throw std::invalid_argument(std::string(what) + ": a tile map of " + std::to_string(tile_dense.size()) +
                                " entries for " + std::to_string(row_blocks) + " x " + std::to_string(k_tiles) +
                                " tiles");
}

// The plan for a layer of [row_blocks x k_tiles] tiles of kSplitTile, tile_dense
// row-major (1: dense). Throws std::invalid_argument on an empty grid.
inline SplitPlan make_split_plan(const std::vector<uint8_t>& tile_dense, int64_t row_blocks, int64_t k_tiles) {
  check_grid("split plan", tile_dense, row_blocks, k_tiles);
  SplitPlan p;
  p.row_blocks = row_blocks;
  p.k_tiles = k_tiles;
  p.max_steps = count_steps(tile_dense, row_blocks, k_tiles, p.counts);
  p.steps.assign(static_cast<size_t>(row_blocks * p.max_steps * 2), -1);
  for (int64_t r = 0; r < row_blocks; ++r) {
    int32_t* out = p.steps.data() + r * p.max_steps * 2;
    for (int64_t k = 0; k < k_tiles; ++k) {
      const bool dense = tile_dense[static_cast<size_t>(r * k_tiles + k)] != 0;
      const SplitPlan::Part parts[2] = {dense ? SplitPlan::Part::kLow : SplitPlan::Part::kWhole,
                                        SplitPlan::Part::kHigh};
      for (int h = 0; h < (dense ? 2 : 1); ++h) {
        *out++ = static_cast<int32_t>(p.pool.size());
        *out++ = static_cast<int32_t>(k);
        p.pool.push_back({static_cast<int32_t>(r), static_cast<int32_t>(k), parts[h]});
      }
    }
  }
  return p;
}

// The pool's values, [pool.size() * kSplitTile, kSplitTile] row-major, from the
// masked weight w [row_blocks * kSplitTile, k_tiles * kSplitTile] (bf16 bits).
// A whole tile is copied as it is; a dense tile's halves keep inputs 0-1 or 2-3
// of each group of four and zero the others.
inline std::vector<uint16_t> gather_split_pool(const SplitPlan& plan, const std::vector<uint16_t>& w) {
  const int64_t in = plan.k_tiles * kSplitTile;
  if (static_cast<int64_t>(w.size()) != plan.row_blocks * kSplitTile * in)
    throw std::invalid_argument("split pool: a weight of " + std::to_string(w.size()) + " values for " +
                                std::to_string(plan.row_blocks * kSplitTile) + " x " + std::to_string(in));
  std::vector<uint16_t> pool(plan.pool.size() * static_cast<size_t>(kSplitTile * kSplitTile), 0);
  for (size_t t = 0; t < plan.pool.size(); ++t) {
    const SplitPlan::PoolTile& pt = plan.pool[t];
    for (int64_t i = 0; i < kSplitTile; ++i) {
      const uint16_t* src = w.data() + (pt.row_block * kSplitTile + i) * in + pt.k_tile * kSplitTile;
      uint16_t* dst = pool.data() + (static_cast<int64_t>(t) * kSplitTile + i) * kSplitTile;
      for (int64_t j = 0; j < kSplitTile; ++j) {
        const int64_t lane = j % 4;  // position in its group of four inputs
        const bool kept = pt.part == SplitPlan::Part::kWhole || (pt.part == SplitPlan::Part::kLow) == (lane < 2);
        if (kept) dst[j] = src[j];
      }
    }
  }
  return pool;
}

// The mixed kernel's plan: each row block's tiles in input order, a 2:4 tile
// one wgmma.sp step over its 128 inputs, a dense tile two dense wgmma steps
// over 64 inputs each (a stage holds a 128 x 64 dense operand in the bytes of
// a compressed 128 x 128 one). A layer with a fraction f of 2:4 tiles then
// costs f / s + (1 - f) of a dense GEMM at best, its dense tiles read once.
struct MixedPlan {
  int64_t row_blocks = 0, k_tiles = 0;
  int64_t max_steps = 0;        // the longest row block's step count
  std::vector<int32_t> counts;  // [row_blocks] steps of each row block (k_tiles + its dense tiles)
  // [row_blocks, max_steps, 2] (unused steps -1): a 2:4 step is (sparse tile,
  // input block of 128), a dense step (-1 - dense tile, input block of 64 = 2k + half).
  std::vector<int32_t> steps;
  struct Tile {
    int32_t row_block, k_tile;
  };
  std::vector<Tile> sparse, dense;  // the tiles of each pool, in order
};

// The mixed plan for [row_blocks x k_tiles] tiles of kSplitTile, tile_dense
// row-major (1: dense). Throws std::invalid_argument on an empty grid.
inline MixedPlan make_mixed_plan(const std::vector<uint8_t>& tile_dense, int64_t row_blocks, int64_t k_tiles) {
  check_grid("mixed plan", tile_dense, row_blocks, k_tiles);
  MixedPlan p;
  p.row_blocks = row_blocks;
  p.k_tiles = k_tiles;
  p.max_steps = count_steps(tile_dense, row_blocks, k_tiles, p.counts);
  p.steps.assign(static_cast<size_t>(row_blocks * p.max_steps * 2), -1);
  for (int64_t r = 0; r < row_blocks; ++r) {
    int32_t* out = p.steps.data() + r * p.max_steps * 2;
    for (int64_t k = 0; k < k_tiles; ++k) {
      const MixedPlan::Tile tile{static_cast<int32_t>(r), static_cast<int32_t>(k)};
      if (tile_dense[static_cast<size_t>(r * k_tiles + k)] == 0) {
        *out++ = static_cast<int32_t>(p.sparse.size());
        *out++ = static_cast<int32_t>(k);
        p.sparse.push_back(tile);
        continue;
      }
      for (int h = 0; h < 2; ++h) {
        *out++ = -1 - static_cast<int32_t>(p.dense.size());
        *out++ = static_cast<int32_t>(2 * k + h);
      }
      p.dense.push_back(tile);
    }
  }
  return p;
}

// The values of `tiles` of the masked weight w [row_blocks * kSplitTile,
// k_tiles * kSplitTile] (bf16 bits), [max(tiles, 1) * kSplitTile, kSplitTile]
// row-major: a pool with no tile holds one of zeros, so that every pool has a
// TMA descriptor.
inline std::vector<uint16_t> gather_tiles(const std::vector<MixedPlan::Tile>& tiles, const std::vector<uint16_t>& w,
                                          int64_t row_blocks, int64_t k_tiles) {
  const int64_t in = k_tiles * kSplitTile;
  if (static_cast<int64_t>(w.size()) != row_blocks * kSplitTile * in)
    throw std::invalid_argument("tile pool: a weight of " + std::to_string(w.size()) + " values for " +
                                std::to_string(row_blocks * kSplitTile) + " x " + std::to_string(in));
  std::vector<uint16_t> pool(std::max<size_t>(tiles.size(), 1) * static_cast<size_t>(kSplitTile * kSplitTile), 0);
  for (size_t t = 0; t < tiles.size(); ++t) {
    for (int64_t i = 0; i < kSplitTile; ++i) {
      const uint16_t* src = w.data() + (tiles[t].row_block * kSplitTile + i) * in + tiles[t].k_tile * kSplitTile;
      std::copy(src, src + kSplitTile, pool.data() + (static_cast<int64_t>(t) * kSplitTile + i) * kSplitTile);
    }
  }
  return pool;
}

}  // namespace patch::deploy
