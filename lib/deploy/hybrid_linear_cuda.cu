// CUDA side of HybridLinear: the decode kernel (mma / mma.sp straight from the
// packed blocks), the kernel that expands the blocks into W ⊙ M, and the
// cuSPARSELt part.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cusparseLt.h>

#include <algorithm>
#include <array>
#include <map>
#include <memory>
#include <optional>

#include "core/error.h"
#include "deploy/expand_schedule.h"
#include "deploy/hybrid_linear.h"
#if PATCH_WITH_CUTLASS
#include "deploy/cutlass_hybrid_gemm.h"
#include "deploy/cutlass_sparse_gemm.h"
#include "deploy/hybrid_split_plan.h"
#endif

namespace patch::deploy::cuda {
namespace {

// ---- decode ------------------------------------------------------------------

// Warps per decode CTA: up to 16, as many as let every slab's CTA be resident
// at once (decode_matmul). Both variants fit in 128 registers per thread.
constexpr int kMaxDecodeWarps = 16;

// Blocks per group: NT n-tiles of 8 tokens need NT times the activation
// registers per block, so more tiles take fewer blocks per group.
template <int NT>
constexpr int decode_group() {
  return NT == 1 ? 4 : NT == 2 ? 2 : 1;
}

struct DecodeArgs {
  const __nv_bfloat16* x;
  const uint4* xf;  // 9-32 tokens: x in fragment order (frag_x_kernel)
  int tokens, in, out;
  const uint8_t* blocks;
  const int64_t* tile_offset;
  const uint8_t* tile_dense;
  int tile_rows, tile_cols, tiles_across;
  __nv_bfloat16* y;
};

// The layer's part of the arguments (both kernels); decode adds x, tokens and y.
DecodeArgs layer_args(const DecodeFormat& fmt, const sparsity::TileGrid& grid) {
  DecodeArgs a{};
  a.in = static_cast<int>(grid.in());
  a.out = static_cast<int>(grid.out());
  a.blocks = fmt.blocks.data_ptr<uint8_t>();
  a.tile_offset = fmt.tile_offset.data_ptr<int64_t>();
  a.tile_dense = fmt.tile_dense.data_ptr<uint8_t>();
  a.tile_rows = static_cast<int>(grid.tile_rows());
  a.tile_cols = static_cast<int>(grid.tile_cols());
  a.tiles_across = static_cast<int>(grid.cols());
  return a;
}

__device__ __forceinline__ void mma_dense(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                          uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Metadata from the lanes whose threadID_in_group is 0 or 1 (selector 0).
__device__ __forceinline__ void mma_sparse(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                           uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, 0x0;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
}

// The decode kernel. One CTA per 16 output rows; its warps split the tile
// row's tiles and reduce through shared memory at the end. A warp walks its
// tiles in groups of up to G 16x32 blocks of one tile (contiguous in memory),
// holding two groups in registers so that the loads of one are in flight while
// the other is multiplied. A group is all dense or all 2:4, so each kind has
// its own unrolled loads at fixed offsets from one pointer, and with kFull
// (every tile's blocks come in whole groups) no block is bounds-checked. The
// kernel was bound by instruction latency (ncu: 12.3 cycles between a warp's
// instructions), most of them per-block branches and address arithmetic: on
// an H200 at 0.45 and one token, a LLaMA-2-7B block went 1.42x -> 1.54x of
// cuBLAS with these loads. NT n-tiles of 8 tokens.

template <int NT>
struct Group {
  static constexpr int G = decode_group<NT>();
  uint4 v0[G], v1[G];  // v1: a dense block's second half, or in .x a 2:4 block's metadata word
  uint32_t b[G][NT][4];
  int blocks = 0;  // valid blocks in the group
  bool dense = false;
};

// What a lane reads from, fixed for its whole walk.
struct LaneView {
  int values;         // its 16 bytes within a block
  int meta;           // its metadata word within a 2:4 block: lanes 2 and 3 of a quad
                      // read those of lanes 0 and 1, which the mma ignores
  const uint32_t* x;  // one n-tile: its activation row at its column pair
  const uint4* xf;    // two n-tiles: its fragments of the first block
};

struct Walk {  // a warp's position: tile column and group within it
  int tc, chunk;
};

// Weight loads stream past L1 (each byte is read once), leaving L1 to the
// activations that every warp of the SM reads: on an H200 at 0.45 a LLaMA-2-7B
// block went 1.53x -> 1.60x of cuBLAS at 1 token, 1.25x -> 1.34x at 16.
__device__ __forceinline__ uint4 ld_stream(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_stream32(const uint8_t* p) {
  uint32_t v;
  asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

// A group's weights; false past the warp's last tile.
template <int NT, bool kFull>
__device__ __forceinline__ bool load_weights(Group<NT>& r, const DecodeArgs& a,
                                             const uint8_t* const* first, const uint8_t* dense,
                                             const LaneView& view, const Walk& w, int tc_end) {
  constexpr int G = Group<NT>::G;
  r.blocks = 0;
  if (w.tc >= tc_end) return false;
  const int per_tile = min(a.tile_cols, a.in - w.tc * a.tile_cols) / 32;
  r.blocks = kFull ? G : min(G, per_tile - w.chunk * G);
  r.dense = dense[w.tc] != 0;
  if (r.dense) {
    const uint8_t* q = first[w.tc] + w.chunk * G * 1024 + view.values;
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (!kFull && u >= r.blocks) break;
      r.v0[u] = ld_stream(q + u * 1024);
      r.v1[u] = ld_stream(q + u * 1024 + 512);
    }
  } else {
    const uint8_t* q = first[w.tc] + w.chunk * G * 576;
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (!kFull && u >= r.blocks) break;
      r.v0[u] = ld_stream(q + view.values + u * 576);
      r.v1[u].x = ld_stream32(q + view.meta + u * 576);
    }
  }
  return true;
}

// A group's weights and its activations; the kernel's first group takes
// them in two calls (kWeights, then kX) with a wait in between.
template <int NT, bool kFull, bool kWeights = true, bool kX = true>
__device__ __forceinline__ void load_group(Group<NT>& r, const DecodeArgs& a,
                                           const uint8_t* const* first, const uint8_t* dense,
                                           const LaneView& view, const Walk& w, int tc_end) {
  constexpr int G = Group<NT>::G;
  if constexpr (kWeights) {
    if (!load_weights<NT, kFull>(r, a, first, dense, view, w, tc_end)) return;
  } else if (r.blocks == 0) {
    return;
  }
  if constexpr (!kX) return;
  const int kb = w.tc * (a.tile_cols / 32) + w.chunk * G;  // the group's first 32-column block
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (!kFull && u >= r.blocks) break;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if constexpr (NT >= 2) {
        // Two or more n-tiles take x laid out in fragment order (frag_x_kernel), one
        // 16-byte load per n-tile: eight scattered 4-byte loads per block made
        // the 16-token decode 0.77x of cuBLAS on an H200, fragment order 1.04x
        // (LLaMA-2-7B block). For one n-tile the extra launch costs more than
        // it saves (1 token: 1.42x direct, 1.28x through fragment order).
        const uint4 v = __ldg(view.xf + ((kb + u) * 32) * NT + nt);
        r.b[u][nt][0] = v.x;
        r.b[u][nt][1] = v.y;
        r.b[u][nt][2] = v.z;
        r.b[u][nt][3] = v.w;
      } else {
        const uint32_t* xr = view.x + (kb + u) * 16;
#pragma unroll
        for (int j = 0; j < 4; ++j) r.b[u][nt][j] = __ldg(xr + 4 * j);
      }
    }
  }
}

// Accumulator sets: the blocks of a group alternate between them, so that an
// mma does not wait for the one before it and the group's registers are free
// for the next loads sooner (one set: 7B gate/up at 16 tokens 22.7 -> 24.7 us).
constexpr int kDecodeAccumulators = 2;

template <int NT, bool kFull>
__device__ __forceinline__ void mma_group(float (&acc)[kDecodeAccumulators][NT][4],
                                          const Group<NT>& r) {
  constexpr int G = Group<NT>::G, K = kDecodeAccumulators;
  if (r.blocks == 0) return;  // past the warp's last tile
  if (r.dense) {
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (!kFull && u >= r.blocks) break;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mma_dense(acc[(2 * u) % K][nt], r.v0[u].x, r.v0[u].y, r.v0[u].z, r.v0[u].w, r.b[u][nt][0],
                  r.b[u][nt][1]);
        mma_dense(acc[(2 * u + 1) % K][nt], r.v1[u].x, r.v1[u].y, r.v1[u].z, r.v1[u].w,
                  r.b[u][nt][2], r.b[u][nt][3]);
      }
    }
  } else {
#pragma unroll
    for (int u = 0; u < G; ++u) {
      if (!kFull && u >= r.blocks) break;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) mma_sparse(acc[u % K][nt], r.v0[u], r.b[u][nt], r.v1[u].x);
    }
  }
}

template <int G>
__device__ __forceinline__ void advance(Walk& w, const DecodeArgs& a) {
  const int per_tile = min(a.tile_cols, a.in - w.tc * a.tile_cols) / 32;
  if (++w.chunk * G >= per_tile) {
    ++w.tc;
    w.chunk = 0;
  }
}

template <int NT, bool kFull>
__global__ void __launch_bounds__(kMaxDecodeWarps * 32) decode_kernel(DecodeArgs a) {
  constexpr int G = Group<NT>::G, K = kDecodeAccumulators;
  const int warps = blockDim.x >> 5;
  // Per tile column, this slab's first block and the tile's kind.
  __shared__ const uint8_t* first[kMaxTileColumns];
  __shared__ uint8_t dense[kMaxTileColumns];
  __shared__ float part[kMaxDecodeWarps][NT][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = blockIdx.x * 16;
  const int tile_r = row0 / a.tile_rows, slab = (row0 - tile_r * a.tile_rows) / 16;
  for (int i = threadIdx.x; i < a.tiles_across; i += blockDim.x) {
    const int tile = tile_r * a.tiles_across + i;
    const int per_tile = min(a.tile_cols, a.in - i * a.tile_cols) / 32;
    dense[i] = a.tile_dense[tile];
    first[i] = a.blocks + a.tile_offset[tile] +
               static_cast<int64_t>(slab * per_tile) * (dense[i] ? 1024 : 576);
  }
  __syncthreads();
  const int per_warp = (a.tiles_across + warps - 1) / warps;
  const int tc_end = min(a.tiles_across, (warp + 1) * per_warp);

  const int g = lane >> 2, t = lane & 3;
  LaneView view{};
  view.values = lane * 16;
  view.meta = 512 + (g * 2 + (t & 1)) * 4;
  if constexpr (NT >= 2) {
    view.xf = a.xf + lane * NT;
  } else {
    // Columns 2t + 8j of each block, j = 0..3 (the mma B fragment), of token
    // g; a lane past the last token reads it again, for an output column that
    // is never stored (mma columns do not mix).
    view.x =
        reinterpret_cast<const uint32_t*>(a.x + static_cast<int64_t>(min(g, a.tokens - 1)) * a.in) +
        t;
  }

  float acc[K][NT][4] = {};
  Group<NT> ga, gb;
  Walk w{warp * per_warp, 0};
  if constexpr (NT == 1) {
    // Launched as a programmatic dependent (launch_decode_kernel), the kernel
    // may start while the one before it still runs: it reads only the layer's
    // own, fixed data until that one has finished, then lets the next start.
    load_group<NT, kFull, /*kWeights=*/true, /*kX=*/false>(ga, a, first, dense, view, w, tc_end);
#if __CUDA_ARCH__ >= 900  // Hopper's grid dependency control; before it the launch is plain
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;");
#endif
    load_group<NT, kFull, /*kWeights=*/false, /*kX=*/true>(ga, a, first, dense, view, w, tc_end);
  } else {
    load_group<NT, kFull>(ga, a, first, dense, view, w, tc_end);
  }
  advance<G>(w, a);
  while (ga.blocks > 0) {
    load_group<NT, kFull>(gb, a, first, dense, view, w, tc_end);
    advance<G>(w, a);
    mma_group<NT, kFull>(acc, ga);
    load_group<NT, kFull>(ga, a, first, dense, view, w, tc_end);
    advance<G>(w, a);
    mma_group<NT, kFull>(acc, gb);
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float s = 0;
#pragma unroll
      for (int k = 0; k < K; ++k) s += acc[k][nt][c];
      part[warp][nt][lane][c] = s;
    }
  __syncthreads();
  for (int i = threadIdx.x; i < NT * 128; i += blockDim.x) {
    const int nt = i / 128, l = (i / 4) % 32, c = i % 4;
    float s = 0;
    for (int v = 0; v < warps; ++v) s += part[v][nt][l][c];
    // Accumulator c of lane l: row g (+8 for c >= 2), token 2t + (c & 1).
    const int row = (l >> 2) + ((c & 2) ? 8 : 0), token = nt * 8 + 2 * (l & 3) + (c & 1);
    if (token < a.tokens)
      a.y[static_cast<int64_t>(token) * a.out + row0 + row] = __float2bfloat16(s);
  }
}

// x [tokens, in] -> per 32-column block and lane, the lane's mma B fragments
// of every n-tile (NT x 16 bytes; zero past the last token).
template <int NT>
__global__ void frag_x_kernel(const __nv_bfloat16* x, int tokens, int in, uint4* xf) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= in / 32 * 32 * NT) return;
  const int nt = i % NT, lane = (i / NT) % 32, kb = i / (NT * 32);
  const int n = nt * 8 + (lane >> 2), t = lane & 3;
  uint32_t v[4] = {0u, 0u, 0u, 0u};
  if (n < tokens) {
    const auto* xr =
        reinterpret_cast<const uint32_t*>(x + static_cast<int64_t>(n) * in + kb * 32 + 2 * t);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = xr[4 * j];
  }
  xf[i] = make_uint4(v[0], v[1], v[2], v[3]);
}

// Warps per CTA for a layer of `slabs` 16-row slabs: the most (of 16, 8, 4, 2,
// 1) with which all the layer's CTAs are resident at once. More warps split a
// slab's columns finer, but a last, part-filled wave of CTAs costs more: on an
// H200 an 11008x4096 layer took 21.2 us with 8 warps (2.6 waves) and 19.8 us
// with 2 (one wave).
template <int NT, bool kFull>
int decode_warps(int64_t slabs, const at::Device& device) {
  static const auto resident = [] {  // CTAs per SM, for 16, 8, 4, 2 and 1 warps
    std::array<int, 5> r{};
    for (int i = 0; i < 5; ++i)
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r[i], decode_kernel<NT, kFull>,
                                                                   (kMaxDecodeWarps >> i) * 32, 0));
    return r;
  }();
  const int sms = at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
  for (int i = 0; i < 5; ++i)
    if (static_cast<int64_t>(resident[i]) * sms >= slabs) return kMaxDecodeWarps >> i;
  return 1;
}

// Whether `device` runs programmatic dependent launches: Hopper (sm_90) and
// later, and this build's code for it (PATCH_CUDA_ARCHS may leave it out, and
// a PTX-only build JITs code without griddepcontrol). Queried once per device.
bool supports_dependent_launch(const at::Device& device) {
  static std::array<int, 64> cached{};  // 0 unknown, 1 no, 2 yes
  const int index = device.index() < 0 ? 0 : device.index();
  int& c = cached[static_cast<size_t>(index) % cached.size()];
  if (c == 0) {
    cudaFuncAttributes attrs{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attrs, decode_kernel<1, true>));
    c = attrs.ptxVersion >= 90 && attrs.binaryVersion >= 90 ? 2 : 1;
  }
  return c == 2;
}

template <int NT, bool kFull>
void launch_decode_kernel(const DecodeArgs& a, int64_t slabs, const at::Device& device, int warps,
                          bool overlap, cudaStream_t stream) {
  if (warps <= 0) warps = decode_warps<NT, kFull>(slabs, device);
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(slabs));
  config.blockDim = dim3(warps * 32);
  config.stream = stream;
  // Up to 8 tokens a programmatic dependent launch: the kernel may start as
  // the one before it ends (see decode_kernel). On an H200 that made decode
  // steps 2-4% faster (LLaMA-2-7B; 1% LLaMA-3.1-8B); the same two instructions
  // in the 9-16-token kernel made its layers 10-20% slower, even launched plainly.
  cudaLaunchAttribute early{};
  early.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  early.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &early;
  // Programmatic dependent launch exists from sm_90 on (and the kernel's
  // griddepcontrol is compiled only for it); older GPUs launch plainly.
  config.numAttrs = NT == 1 && overlap && supports_dependent_launch(device) ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, decode_kernel<NT, kFull>, a));
}

template <int NT>
void decode_launch(const at::Tensor& x, const DecodeFormat& fmt, const sparsity::TileGrid& grid,
                   at::Tensor& y, int warps, bool overlap) {
  const c10::cuda::CUDAGuard guard(x.device());
  core::check(warps <= kMaxDecodeWarps, "decode_matmul",
              core::str("at most ", kMaxDecodeWarps, " warps per CTA, got ", warps));
  DecodeArgs a = layer_args(fmt, grid);
  a.x = reinterpret_cast<const __nv_bfloat16*>(x.data_ptr());
  a.tokens = static_cast<int>(x.size(0));
  a.y = reinterpret_cast<__nv_bfloat16*>(y.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor xf;
  if constexpr (NT >= 2) {
    const int n = static_cast<int>(grid.in() / 32 * 32 * NT);
    xf = at::empty({n * 4}, x.options().dtype(at::kInt));
    a.xf = reinterpret_cast<const uint4*>(xf.data_ptr());
    frag_x_kernel<NT><<<(n + 255) / 256, 256, 0, stream>>>(a.x, a.tokens, a.in,
                                                           reinterpret_cast<uint4*>(xf.data_ptr()));
  }
  // Whole groups everywhere: the tiles' width and the last tile's are multiples of G blocks.
  const int span = 32 * decode_group<NT>();
  if (grid.tile_cols() % span == 0 && grid.in() % span == 0)
    launch_decode_kernel<NT, true>(a, grid.out() / 16, x.device(), warps, overlap, stream);
  else
    launch_decode_kernel<NT, false>(a, grid.out() / 16, x.device(), warps, overlap, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- expand: the decode blocks back into W ⊙ M ------------------------------------

// One warp per 16x32 block, eight per CTA. A lane holds the block's words at
// fragment positions (decode_format_weight's reading), so it writes each
// 4-byte pair of a dense block, and each 2:4 group's four values (its two kept
// values placed by their metadata nibble) as one 8-byte store.
__global__ void __launch_bounds__(256) expand_kernel(DecodeArgs a, __nv_bfloat16* w) {
  const int64_t block = static_cast<int64_t>(blockIdx.x) * 8 + (threadIdx.x >> 5);
  const int kbs = a.in / 32;
  if (block >= static_cast<int64_t>(a.out / 16) * kbs) return;
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int slab = static_cast<int>(block / kbs), kb = static_cast<int>(block % kbs);
  const int r = slab * 16 / a.tile_rows, c = kb * 32 / a.tile_cols;
  const int tile = r * a.tiles_across + c;
  const int per_tile = min(a.tile_cols, a.in - c * a.tile_cols) / 32;
  const bool dense = a.tile_dense[tile] != 0;
  const int index = (slab - r * a.tile_rows / 16) * per_tile + kb - c * a.tile_cols / 32;
  const uint8_t* q =
      a.blocks + a.tile_offset[tile] + static_cast<int64_t>(index) * (dense ? 1024 : 576);
  // Word j of a lane's 16 bytes: row g + 8 (j & 1), columns 2t + 8 (j >> 1) + {0, 1}.
  __nv_bfloat16* base = w + static_cast<int64_t>(slab * 16 + g) * a.in + kb * 32;
  const uint4 v0 = __ldg(reinterpret_cast<const uint4*>(q) + lane);
  const uint32_t v0w[4] = {v0.x, v0.y, v0.z, v0.w};
  if (dense) {
    const uint4 v1 = __ldg(reinterpret_cast<const uint4*>(q + 512) + lane);
    const uint32_t v1w[4] = {v1.x, v1.y, v1.z, v1.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      __nv_bfloat16* p = base + static_cast<int64_t>(8 * (j & 1)) * a.in + 2 * t + 8 * (j >> 1);
      *reinterpret_cast<uint32_t*>(p) = v0w[j];
      *reinterpret_cast<uint32_t*>(p + 16) = v1w[j];
    }
    return;
  }
  // Compressed columns 2t + 8 (j >> 1) + {0, 1} are group t + 4 (j >> 1)'s two
  // kept values; its nibble is in word g * 2 + (j >> 1), 16 bits up for row g + 8.
  const uint2 meta = __ldg(reinterpret_cast<const uint2*>(q + 512) + g);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t word = (j >> 1) ? meta.y : meta.x;
    const uint32_t nib = (word >> (16 * (j & 1) + 4 * t)) & 0xfu;
    // The group's four values as one 64-bit word: kept value i at 16 * its position.
    const uint64_t four = (static_cast<uint64_t>(v0w[j] & 0xffffu) << (16 * (nib & 3u))) |
                          (static_cast<uint64_t>(v0w[j] >> 16) << (16 * (nib >> 2)));
    __nv_bfloat16* p = base + static_cast<int64_t>(8 * (j & 1)) * a.in + 4 * (t + 4 * (j >> 1));
    *reinterpret_cast<uint64_t*>(p) = four;
  }
}

// ---- cuSPARSELt ------------------------------------------------------------------

void check_lt(cusparseStatus_t s, const char* what) {
  if (s != CUSPARSE_STATUS_SUCCESS)
    throw core::Error(core::str("cuSPARSELt ", what, " failed: ", cusparseLtGetErrorString(s)));
}

// One handle per process, created on first use.
const cusparseLtHandle_t* lt_handle() {
  static cusparseLtHandle_t h;
  static bool ok = [] {
    check_lt(cusparseLtInit(&h), "init");
    return true;
  }();
  (void)ok;
  return &h;
}

}  // namespace

void decode_matmul(const at::Tensor& x, const DecodeFormat& fmt, const sparsity::TileGrid& grid,
                   at::Tensor& y, int warps, bool overlap) {
  core::check(x.size(0) <= kDecodeKernelMaxTokens, "decode_matmul",
              core::str("at most ", kDecodeKernelMaxTokens, " tokens, got ", x.size(0)));
  if (x.size(0) <= 8)
    decode_launch<1>(x, fmt, grid, y, warps, overlap);
  else if (x.size(0) <= 16)
    decode_launch<2>(x, fmt, grid, y, warps, overlap);
  else
    decode_launch<4>(x, fmt, grid, y, warps, overlap);
}

void expand_weight(const DecodeFormat& fmt, const sparsity::TileGrid& grid, at::Tensor& w) {
  core::check(w.is_cuda() && w.scalar_type() == at::kBFloat16 && w.is_contiguous() &&
                  w.sizes() == at::IntArrayRef({grid.out(), grid.in()}),
              "expand_weight",
              core::str("expected a contiguous bf16 CUDA [", grid.out(), ", ", grid.in(),
                        "] tensor, got ", w.sizes()));
  const c10::cuda::CUDAGuard guard(w.device());
  const DecodeArgs a = layer_args(fmt, grid);
  const int64_t blocks = grid.out() / 16 * (grid.in() / 32);
  expand_kernel<<<static_cast<unsigned>((blocks + 7) / 8), 256, 0,
                  at::cuda::getCurrentCUDAStream()>>>(
      a, reinterpret_cast<__nv_bfloat16*>(w.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- expansion pipeline ---------------------------------------------------------

struct ExpandPipeline::State {
  struct Layer {
    const DecodeFormat* fmt = nullptr;
    const sparsity::TileGrid* grid = nullptr;
  };
  at::Device device;
  std::map<const void*, Layer> layers;
  ExpandSchedule schedule;
  int64_t need = 0;      // elements of the largest layer added
  int64_t capacity = 0;  // elements of each buffer
  std::array<at::Tensor, 2> buf;
  std::array<at::cuda::CUDAEvent, 2> ready, freed;  // expansion done (side stream); reads done (main)
  std::optional<c10::cuda::CUDAStream> side;
  int current = -1;  // the buffer acquire() handed out

  explicit State(at::Device d) : device(d) {}
  at::Tensor view(int b, const Layer& l) const {
    return buf[b].narrow(0, 0, l.grid->out() * l.grid->in()).view({l.grid->out(), l.grid->in()});
  }
  // Room in both buffers for every layer's weight (they are replaced when not).
  void reserve() {
    if (need <= capacity) return;
    if (side) side->synchronize();
    for (auto& b : buf) b = at::empty({need}, at::TensorOptions().dtype(at::kBFloat16).device(device));
    schedule.clear_buffers();
    capacity = need;
  }
};

ExpandPipeline::ExpandPipeline(at::Device device) : s_(std::make_unique<State>(device)) {}

ExpandPipeline::~ExpandPipeline() {
  if (s_->side) s_->side->synchronize();  // no expansion still writing a buffer
}

void ExpandPipeline::add(const void* layer, const DecodeFormat* fmt, const sparsity::TileGrid* grid) {
  s_->layers[layer] = {fmt, grid};
  s_->need = std::max(s_->need, grid->out() * grid->in());
  s_->schedule.add(layer);
}

void ExpandPipeline::remove(const void* layer) {
  // An expansion in flight may read the format that goes with the layer.
  if (s_->side) s_->side->synchronize();
  s_->layers.erase(layer);
  s_->schedule.remove(layer);
}

at::Tensor ExpandPipeline::acquire(const void* layer) {
  auto& s = *s_;
  const c10::cuda::CUDAGuard guard(s.device);
  const auto main = at::cuda::getCurrentCUDAStream(s.device.index());
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(main.stream(), &capture));
  if (capture != cudaStreamCaptureStatusNone) return {};
  s.reserve();
  if (!s.side) s.side = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, s.device.index());
  const auto& l = s.layers.at(layer);
  const ExpandSchedule::Plan plan = s.schedule.acquire(layer);
  const int b = plan.buffer;
  // Expanded ahead: wait for it; else an expansion ahead for another layer may still be writing the buffer.
  s.ready[b].block(main);
  if (plan.expand) {
    auto w = s.view(b, l);
    expand_weight(*l.fmt, *l.grid, w);
  }
  s.current = b;
  if (plan.ahead) {
    // The next layer's weight into the other buffer on the side stream, once
    // the reads of that buffer (the GEMM before this one) are done.
    const int o = 1 - b;
    const auto& next = s.layers.at(plan.ahead);
    s.freed[o].block(*s.side);
    {
      const c10::cuda::CUDAStreamGuard on_side(*s.side);
      auto w = s.view(o, next);
      expand_weight(*next.fmt, *next.grid, w);
    }
    s.ready[o].record(*s.side);
  }
  return s.view(b, l);
}

void ExpandPipeline::release() {
  auto& s = *s_;
  if (s.current < 0) return;
  s.freed[s.current].record(at::cuda::getCurrentCUDAStream(s.device.index()));
  s.schedule.release();
  s.current = -1;
}

int64_t ExpandPipeline::prefetched(const void* layer) const {
  return s_->schedule.prefetched(layer);
}

int64_t ExpandPipeline::bytes() const {
  return 2 * s_->capacity * 2;
}

// A = W [out, in] row-major, structured; B = x^T (x row-major [T, in] read as a
// column-major [in, T]); C = D = y^T (y row-major [T, out] as column-major [out, T]).
struct SparseGemm::State {
  int64_t out = 0, in = 0;
  // Algorithm per token count, found by cusparseLtMatmulSearch on first use and
  // shared with copies (the default algorithm is up to 1.5x slower).
  std::shared_ptr<std::map<int64_t, int>> algorithms = std::make_shared<std::map<int64_t, int>>();
  cusparseLtMatDescriptor_t a;
  at::Tensor compressed;
  struct Plan {
    cusparseLtMatDescriptor_t b, c;
    cusparseLtMatmulDescriptor_t mm;
    cusparseLtMatmulAlgSelection_t alg;
    cusparseLtMatmulPlan_t plan;
    at::Tensor workspace;
  };
  std::map<int64_t, Plan> plans;
};

namespace {
void init_structured(cusparseLtMatDescriptor_t* a, int64_t out, int64_t in) {
  check_lt(cusparseLtStructuredDescriptorInit(lt_handle(), a, out, in, in, 16, CUDA_R_16BF,
                                              CUSPARSE_ORDER_ROW, CUSPARSELT_SPARSITY_50_PERCENT),
           "structured descriptor");
}
}  // namespace

SparseGemm::SparseGemm(const SparseGemm& other) : s_(std::make_unique<State>()) {
  s_->out = other.s_->out;
  s_->in = other.s_->in;
  s_->algorithms = other.s_->algorithms;
  init_structured(&s_->a, s_->out, s_->in);
  s_->compressed = other.s_->compressed.clone();
}

SparseGemm::SparseGemm(const at::Tensor& weight) : s_(std::make_unique<State>()) {
  const c10::cuda::CUDAGuard guard(weight.device());
  auto w = weight.contiguous();
  s_->out = w.size(0);
  s_->in = w.size(1);
  const auto* h = lt_handle();
  init_structured(&s_->a, s_->out, s_->in);
  size_t size = 0, buffer = 0;
  check_lt(cusparseLtSpMMACompressedSize2(h, &s_->a, &size, &buffer), "compressed size");
  s_->compressed = at::empty({static_cast<int64_t>(size)}, w.options().dtype(at::kByte));
  auto scratch = at::empty({static_cast<int64_t>(buffer) + 1}, w.options().dtype(at::kByte));
  check_lt(cusparseLtSpMMACompress2(h, &s_->a, 1, CUSPARSE_OPERATION_NON_TRANSPOSE, w.data_ptr(),
                                    s_->compressed.data_ptr(), scratch.data_ptr(),
                                    at::cuda::getCurrentCUDAStream()),
           "compress");
}

int64_t SparseGemm::bytes() const {
  return s_->compressed.numel();
}

SparseGemm::~SparseGemm() {
  for (auto& [tokens, p] : s_->plans) {
    cusparseLtMatmulPlanDestroy(&p.plan);
    cusparseLtMatmulAlgSelectionDestroy(&p.alg);
    cusparseLtMatDescriptorDestroy(&p.b);
    cusparseLtMatDescriptorDestroy(&p.c);
  }
  cusparseLtMatDescriptorDestroy(&s_->a);
}

void SparseGemm::multiply(const at::Tensor& x, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t tokens = x.size(0);
  // cuSPARSELt takes token counts in multiples of 16: zero rows pad the rest.
  if (tokens % 16 != 0) {
    const int64_t padded = (tokens + 15) / 16 * 16;
    const auto xp = at::cat({x, at::zeros({padded - tokens, x.size(1)}, x.options())});
    auto yp = at::empty({padded, y.size(1)}, y.options());
    multiply(xp, yp);
    y.copy_(yp.narrow(0, 0, tokens));
    return;
  }
  const auto* h = lt_handle();
  auto it = s_->plans.find(tokens);
  if (it == s_->plans.end()) {
    // Built in place: the matmul descriptor and plan refer to the descriptors.
    it = s_->plans.emplace(tokens, State::Plan{}).first;
    auto& p = it->second;
    try {
      check_lt(cusparseLtDenseDescriptorInit(h, &p.b, s_->in, tokens, s_->in, 16, CUDA_R_16BF,
                                             CUSPARSE_ORDER_COL),
               "dense descriptor");
      check_lt(cusparseLtDenseDescriptorInit(h, &p.c, s_->out, tokens, s_->out, 16, CUDA_R_16BF,
                                             CUSPARSE_ORDER_COL),
               "output descriptor");
      check_lt(cusparseLtMatmulDescriptorInit(h, &p.mm, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                              CUSPARSE_OPERATION_NON_TRANSPOSE, &s_->a, &p.b, &p.c,
                                              &p.c, CUSPARSE_COMPUTE_32F),
               "matmul descriptor");
      check_lt(cusparseLtMatmulAlgSelectionInit(h, &p.alg, &p.mm, CUSPARSELT_MATMUL_ALG_DEFAULT),
               "algorithm selection");
      auto known = s_->algorithms->find(tokens);
      if (known != s_->algorithms->end())
        check_lt(cusparseLtMatmulAlgSetAttribute(h, &p.alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID,
                                                 &known->second, sizeof(int)),
                 "algorithm id");
      check_lt(cusparseLtMatmulPlanInit(h, &p.plan, &p.mm, &p.alg), "plan");
      size_t ws = 0;
      check_lt(cusparseLtMatmulGetWorkspace(h, &p.plan, &ws), "workspace size");
      p.workspace = at::empty({static_cast<int64_t>(ws) + 1}, x.options().dtype(at::kByte));
      if (known == s_->algorithms->end()) {
        // Searching runs the product with beta 0 into y, which the real call overwrites.
        const float one = 1.0f, zero = 0.0f;
        cudaStream_t stream = at::cuda::getCurrentCUDAStream();
        check_lt(
            cusparseLtMatmulSearch(h, &p.plan, &one, s_->compressed.data_ptr(), x.data_ptr(), &zero,
                                   y.data_ptr(), y.data_ptr(), p.workspace.data_ptr(), &stream, 1),
            "algorithm search");
        int id = 0;
        check_lt(cusparseLtMatmulAlgGetAttribute(h, &p.alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &id,
                                                 sizeof(id)),
                 "algorithm id");
        (*s_->algorithms)[tokens] = id;
      }
    } catch (...) {
      s_->plans.erase(it);
      throw;
    }
  }
  const float alpha = 1.0f, beta = 0.0f;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  check_lt(
      cusparseLtMatmul(h, &it->second.plan, &alpha, s_->compressed.data_ptr(), x.data_ptr(), &beta,
                       y.data_ptr(), y.data_ptr(), it->second.workspace.data_ptr(), &stream, 1),
      "matmul");
}

#if PATCH_WITH_CUTLASS
struct SplitGemm::State {
  std::unique_ptr<cutlass_sm90::HybridGemmWeight> gemm;
};

SplitGemm::SplitGemm(const at::Tensor& masked, const at::Tensor& tile_dense, at::Device device,
                     cutlass_sm90::HybridKernel kernel)
    : s_(std::make_unique<State>()) {
  const c10::cuda::CUDAGuard guard(device);
  const auto w = masked.to(at::kCPU, at::kBFloat16).contiguous();
  const auto td = tile_dense.to(at::kCPU, at::kByte).contiguous();
  const auto* bits = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const auto* flags = td.data_ptr<uint8_t>();
  s_->gemm = std::make_unique<cutlass_sm90::HybridGemmWeight>(
      std::vector<uint16_t>(bits, bits + w.numel()), std::vector<uint8_t>(flags, flags + td.numel()), w.size(0),
      w.size(1), kernel, at::cuda::getCurrentCUDAStream(device.index()).stream());
}

void SplitGemm::multiply(const at::Tensor& x, at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  s_->gemm->run(x.data_ptr(), y.data_ptr(), x.size(0), at::cuda::getCurrentCUDAStream().stream());
}

int64_t SplitGemm::bytes() const {
  return static_cast<int64_t>(s_->gemm->bytes());
}

cutlass_sm90::HybridKernel SplitGemm::kernel() const {
  return s_->gemm->kernel();
}
#else
struct SplitGemm::State {};

SplitGemm::SplitGemm(const at::Tensor&, const at::Tensor&, at::Device, cutlass_sm90::HybridKernel) {
  throw core::Error("split GEMM: built without the CUTLASS kernels");
}

void SplitGemm::multiply(const at::Tensor&, at::Tensor&) {}

int64_t SplitGemm::bytes() const {
  return 0;
}

cutlass_sm90::HybridKernel SplitGemm::kernel() const {
  return cutlass_sm90::HybridKernel::kSplit;
}
#endif

SplitGemm::~SplitGemm() = default;

}  // namespace patch::deploy::cuda

namespace patch::deploy {

bool split_supported(const sparsity::TileGrid& g, at::Device device) {
#if PATCH_WITH_CUTLASS
  if (!device.is_cuda() || !cutlass_sm90::available()) return false;
  if (g.tile_rows() != kSplitTile || g.tile_cols() != kSplitTile || g.out() % kSplitTile || g.in() % kSplitTile)
    return false;
  return at::cuda::getDeviceProperties(device.index())->major == 9;
#else
  (void)g;
  (void)device;
  return false;
#endif
}

}  // namespace patch::deploy
