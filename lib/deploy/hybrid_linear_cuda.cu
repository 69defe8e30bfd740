// CUDA side of HybridLinear: the decode kernel (mma / mma.sp straight from the
// packed blocks), the dense-tile kernel of prefill, and the cuSPARSELt part.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cusparseLt.h>

#include <array>
#include <map>
#include <memory>

#include "core/error.h"
#include "deploy/hybrid_linear.h"

namespace patch::deploy::cuda {
namespace {

// ---- decode ------------------------------------------------------------------

// Warps per decode CTA: up to 16, as many as let every slab's CTA be resident
// at once (decode_matmul). Both variants fit in 128 registers per thread.
constexpr int kMaxDecodeWarps = 16;

// Blocks per group: NT n-tiles of 8 tokens need NT times the activation
// registers per block, so two tiles take half the blocks per group.
template <int NT>
constexpr int decode_group() {
  return NT == 1 ? 4 : 2;
}

struct DecodeArgs {
  const __nv_bfloat16* x;
  const uint4* xf;  // 9-16 tokens: x in fragment order (frag_x_kernel)
  int tokens, in, out;
  const uint8_t* blocks;
  const int64_t* tile_offset;
  const uint8_t* tile_dense;
  int tile_rows, tile_cols, tiles_across;
  __nv_bfloat16* y;
};

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

__device__ __forceinline__ void cp_async16(void* smem, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// The decode kernel. One CTA per 16 output rows; its warps split the tile
// row's tiles and reduce through shared memory at the end. A warp walks its
// tiles in groups of up to G 16x32 blocks (contiguous in memory), holding two
// groups in registers so that the loads of one are in flight while the other
// is multiplied; per block it only bumps a pointer. NT n-tiles of 8 tokens.

template <int NT>
struct Group {
  static constexpr int G = decode_group<NT>();
  uint4 v0[G], v1[G];
  uint32_t b[G][NT][4];
  int blocks = 0;  // valid blocks in the group
  bool dense = false;
};

struct Walk {  // a warp's position: tile column and group within it
  int tc, chunk;
};

template <int NT>
__device__ __forceinline__ void load_group(Group<NT>& r, const DecodeArgs& a,
                                           const int64_t* tile_off, const uint8_t* tile_dense,
                                           int slab, const Walk& w, int tc_end, int lane) {
  r.blocks = 0;
  if (w.tc >= tc_end) return;
  const int g = lane >> 2, t = lane & 3;
  const int per_tile = min(a.tile_cols, a.in - w.tc * a.tile_cols) / 32;
  r.dense = tile_dense[w.tc] != 0;
  constexpr int G = Group<NT>::G;
  r.blocks = min(G, per_tile - w.chunk * G);
  const int bytes = r.dense ? 1024 : 576;
  const uint8_t* p =
      a.blocks + tile_off[w.tc] + static_cast<int64_t>(slab * per_tile + w.chunk * G) * bytes;
  const int k0 = w.tc * a.tile_cols + w.chunk * G * 32;
#pragma unroll
  for (int u = 0; u < G; ++u) {
    if (u >= r.blocks) break;
    const uint8_t* q = p + u * bytes;
    r.v0[u] = __ldg(reinterpret_cast<const uint4*>(q) + lane);
    if (r.dense)
      r.v1[u] = __ldg(reinterpret_cast<const uint4*>(q + 512) + lane);
    else
      r.v1[u].x = t < 2 ? __ldg(reinterpret_cast<const uint32_t*>(q + 512) + g * 2 + t) : 0u;
    // Two n-tiles take x laid out in fragment order (frag_x_kernel), one
    // 16-byte load per n-tile: eight scattered 4-byte loads per block made the
    // 16-token decode 0.77x of cuBLAS on an H200, fragment order 1.04x
    // (LLaMA-2-7B block). For one n-tile the extra launch costs more than it
    // saves (1 token: 1.42x direct, 1.28x through fragment order).
    if constexpr (NT == 2) {
      const uint4* xf = a.xf + (static_cast<int64_t>(k0 / 32 + u) * 32 + lane) * NT;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const uint4 v = __ldg(xf + nt);
        r.b[u][nt][0] = v.x;
        r.b[u][nt][1] = v.y;
        r.b[u][nt][2] = v.z;
        r.b[u][nt][3] = v.w;
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int n = nt * 8 + g;
        const auto* xr = reinterpret_cast<const uint32_t*>(
            a.x + static_cast<int64_t>(min(n, a.tokens - 1)) * a.in + k0 + u * 32 + 2 * t);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          r.b[u][nt][j] = n < a.tokens ? __ldg(xr + 4 * j) : 0u;  // k + 2t + 8j
      }
    }
  }
}

template <int NT>
__device__ __forceinline__ void mma_group(float (&acc)[NT][4], const Group<NT>& r) {
#pragma unroll
  for (int u = 0; u < Group<NT>::G; ++u) {
    if (u >= r.blocks) break;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if (r.dense) {
        mma_dense(acc[nt], r.v0[u].x, r.v0[u].y, r.v0[u].z, r.v0[u].w, r.b[u][nt][0],
                  r.b[u][nt][1]);
        mma_dense(acc[nt], r.v1[u].x, r.v1[u].y, r.v1[u].z, r.v1[u].w, r.b[u][nt][2],
                  r.b[u][nt][3]);
      } else {
        mma_sparse(acc[nt], r.v0[u], r.b[u][nt], r.v1[u].x);
      }
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

template <int NT>
__global__ void __launch_bounds__(kMaxDecodeWarps * 32) decode_kernel(DecodeArgs a) {
  constexpr int G = Group<NT>::G;
  const int warps = blockDim.x >> 5;
  __shared__ int64_t tile_off[kMaxTileColumns];
  __shared__ uint8_t tile_dense[kMaxTileColumns];
  __shared__ float part[kMaxDecodeWarps][NT][32][4];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = blockIdx.x * 16;
  const int tile_r = row0 / a.tile_rows, slab = (row0 - tile_r * a.tile_rows) / 16;
  for (int i = threadIdx.x; i < a.tiles_across; i += blockDim.x) {
    tile_off[i] = a.tile_offset[tile_r * a.tiles_across + i];
    tile_dense[i] = a.tile_dense[tile_r * a.tiles_across + i];
  }
  __syncthreads();
  const int per_warp = (a.tiles_across + warps - 1) / warps;
  const int tc_end = min(a.tiles_across, (warp + 1) * per_warp);

  float acc[NT][4] = {};
  Group<NT> ga, gb;
  Walk w{warp * per_warp, 0};
  load_group(ga, a, tile_off, tile_dense, slab, w, tc_end, lane);
  advance<G>(w, a);
  while (ga.blocks > 0) {
    load_group(gb, a, tile_off, tile_dense, slab, w, tc_end, lane);
    advance<G>(w, a);
    mma_group(acc, ga);
    load_group(ga, a, tile_off, tile_dense, slab, w, tc_end, lane);
    advance<G>(w, a);
    mma_group(acc, gb);
  }

#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) part[warp][nt][lane][c] = acc[nt][c];
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
template <int NT>
int decode_warps(int64_t slabs, const at::Device& device) {
  static const auto resident = [] {  // CTAs per SM, for 16, 8, 4, 2 and 1 warps
    std::array<int, 5> r{};
    for (int i = 0; i < 5; ++i)
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&r[i], decode_kernel<NT>,
                                                                   (kMaxDecodeWarps >> i) * 32, 0));
    return r;
  }();
  const int sms = at::cuda::getDeviceProperties(device.index())->multiProcessorCount;
  for (int i = 0; i < 5; ++i)
    if (static_cast<int64_t>(resident[i]) * sms >= slabs) return kMaxDecodeWarps >> i;
  return 1;
}

// ---- prefill: dense tiles ------------------------------------------------------

constexpr int kBM = 128, kPad = 8, kTileStages = 3;

struct TilesArgs {
  const __nv_bfloat16* x;
  int tokens, in, out;
  const __nv_bfloat16* tiles;
  const int* band_ptr;
  const int* band_cols;
  int tile_rows, tile_cols;
  __nv_bfloat16* y;
};

// CTA: 128 tokens x kBN weight rows of one tile row, summed over that row's
// dense tiles in kBK-column steps, three stages deep with cp.async; warps of
// 64 x 32. Adds its sum to y, which holds the 2:4 part from cuSPARSELt.
template <int kBN, int kBK>
__global__ void __launch_bounds__(kBN * 2) dense_tiles_kernel(TilesArgs a) {
  // Warps along the weight rows; 16-byte copy chunks per row; rows per copy pass.
  constexpr int kWarpsN = kBN / 32, kChunks = kBK / 8, kPass = kBN * 2 / kChunks;
  extern __shared__ __align__(16) uint8_t tiles_smem[];  // As, then Bs
  auto As = reinterpret_cast<__nv_bfloat16(*)[kBM][kBK + kPad]>(tiles_smem);
  auto Bs = reinterpret_cast<__nv_bfloat16(*)[kBN][kBK + kPad]>(
      tiles_smem + sizeof(__nv_bfloat16) * kTileStages * kBM * (kBK + kPad));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int wm = warp / kWarpsN, wn = warp % kWarpsN;
  const int m0 = blockIdx.x * kBM, n0 = blockIdx.y * kBN;
  const int band = n0 / a.tile_rows, row_in_tile = n0 - band * a.tile_rows;
  const int first = a.band_ptr[band], tiles = a.band_ptr[band + 1] - first;
  const int steps_per_tile = a.tile_cols / kBK, steps = tiles * steps_per_tile;
  if (steps == 0) return;  // no dense tile in this tile row: y holds the 2:4 part already
  // The band's tile columns, so that no copy waits on a lookup.
  __shared__ int band_k0[kMaxTileColumns];
  for (int i = tid; i < tiles; i += blockDim.x) band_k0[i] = a.band_cols[first + i] * a.tile_cols;
  __syncthreads();

  // A thread copies the same 16 bytes of rows tid / kChunks + kPass j in every
  // step: its sources move only by the step's column offset.
  const int cr = tid / kChunks, cc = (tid % kChunks) * 8;
  const __nv_bfloat16* x_src[kBM / kPass];
  bool x_ok[kBM / kPass];
#pragma unroll
  for (int j = 0; j < kBM / kPass; ++j) {
    x_ok[j] = m0 + cr + kPass * j < a.tokens;
    x_src[j] = a.x + (x_ok[j] ? static_cast<int64_t>(m0 + cr + kPass * j) * a.in + cc : 0);
  }
  const int64_t tile_src = static_cast<int64_t>(row_in_tile + cr) * a.tile_cols + cc;
  const int64_t tile_elems = static_cast<int64_t>(a.tile_rows) * a.tile_cols;
  int load_tile = 0, load_ks = 0;  // the next step to copy

  auto load = [&](int stage) {  // an empty group past the last step keeps the count uniform
    if (load_tile < tiles) {
      const int k0 = band_k0[load_tile] + load_ks * kBK;
#pragma unroll
      for (int j = 0; j < kBM / kPass; ++j)
        cp_async16(&As[stage][cr + kPass * j][cc], x_src[j] + k0, x_ok[j]);
      const __nv_bfloat16* tile =
          a.tiles + (first + load_tile) * tile_elems + tile_src + load_ks * kBK;
#pragma unroll
      for (int j = 0; j < kBN / kPass; ++j)
        cp_async16(&Bs[stage][cr + kPass * j][cc], tile + kPass * j * a.tile_cols, true);
      if (++load_ks == steps_per_tile) {
        load_ks = 0;
        ++load_tile;
      }
    }
    cp_async_commit();
  };

  float acc[4][4][4] = {};
  for (int i = 0; i < kTileStages - 1; ++i) load(i);
  for (int step = 0; step < steps; ++step) {
    load((step + kTileStages - 1) % kTileStages);
    cp_async_wait<kTileStages - 1>();
    __syncthreads();
    const int s = step % kTileStages;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      uint32_t af[4][4], bf[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(af[mi], &As[s][wm * 64 + mi * 16 + (lane & 15)][kk + (lane >> 4) * 8]);
#pragma unroll
      for (int np = 0; np < 2; ++np)
        ldmatrix_x4(
            bf[np],
            &Bs[s][wn * 32 + np * 16 + (lane & 7) + (lane >> 4) * 8][kk + ((lane >> 3) & 1) * 8]);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma_dense(acc[mi][ni], af[mi][0], af[mi][1], af[mi][2], af[mi][3],
                    bf[ni >> 1][(ni & 1) * 2], bf[ni >> 1][(ni & 1) * 2 + 1]);
    }
    __syncthreads();
  }

  // y += acc, reading a whole row block of y before writing any of it, so that
  // the reads are in flight together.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
    float2 prev[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int token = m0 + wm * 64 + mi * 16 + g + 8 * h, col = n0 + wn * 32 + ni * 8 + 2 * t;
        prev[ni][h] = token < a.tokens
                          ? __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(
                                a.y + static_cast<int64_t>(token) * a.out + col))
                          : make_float2(0.f, 0.f);
      }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int token = m0 + wm * 64 + mi * 16 + g + 8 * h, col = n0 + wn * 32 + ni * 8 + 2 * t;
        if (token < a.tokens)
          *reinterpret_cast<__nv_bfloat162*>(a.y + static_cast<int64_t>(token) * a.out + col) =
              __floats2bfloat162_rn(prev[ni][h].x + acc[mi][ni][2 * h],
                                    prev[ni][h].y + acc[mi][ni][2 * h + 1]);
      }
  }
}

template <int kBN, int kBK>
void launch_dense_tiles(const TilesArgs& a) {
  constexpr int smem = sizeof(__nv_bfloat16) * kTileStages * (kBM + kBN) * (kBK + kPad);
  C10_CUDA_CHECK(cudaFuncSetAttribute(dense_tiles_kernel<kBN, kBK>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 blocks(static_cast<unsigned>((a.tokens + kBM - 1) / kBM),
                    static_cast<unsigned>(a.out / kBN));
  dense_tiles_kernel<kBN, kBK><<<blocks, kBN * 2, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
                   at::Tensor& y, int warps) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool one_tile = x.size(0) <= 8;
  core::check(warps <= kMaxDecodeWarps, "decode_matmul",
              core::str("at most ", kMaxDecodeWarps, " warps per CTA, got ", warps));
  if (warps <= 0)
    warps = one_tile ? decode_warps<1>(grid.out() / 16, x.device())
                     : decode_warps<2>(grid.out() / 16, x.device());
  DecodeArgs a{reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
               nullptr,
               static_cast<int>(x.size(0)),
               static_cast<int>(grid.in()),
               static_cast<int>(grid.out()),
               fmt.blocks.data_ptr<uint8_t>(),
               fmt.tile_offset.data_ptr<int64_t>(),
               fmt.tile_dense.data_ptr<uint8_t>(),
               static_cast<int>(grid.tile_rows()),
               static_cast<int>(grid.tile_cols()),
               static_cast<int>(grid.cols()),
               reinterpret_cast<__nv_bfloat16*>(y.data_ptr())};
  const dim3 blocks(static_cast<unsigned>(grid.out() / 16));
  auto stream = at::cuda::getCurrentCUDAStream();
  if (one_tile) {
    decode_kernel<1><<<blocks, warps * 32, 0, stream>>>(a);
  } else {
    const int n = static_cast<int>(grid.in() / 32 * 32 * 2);
    auto xf = at::empty({n * 4}, x.options().dtype(at::kInt));
    a.xf = reinterpret_cast<const uint4*>(xf.data_ptr());
    frag_x_kernel<2><<<(n + 255) / 256, 256, 0, stream>>>(a.x, a.tokens, a.in,
                                                          reinterpret_cast<uint4*>(xf.data_ptr()));
    decode_kernel<2><<<blocks, warps * 32, 0, stream>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dense_tiles_matmul(const at::Tensor& x, const at::Tensor& tiles, const at::Tensor& band_ptr,
                        const at::Tensor& band_cols, const sparsity::TileGrid& grid,
                        at::Tensor& y) {
  const c10::cuda::CUDAGuard guard(x.device());
  TilesArgs a{reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()),
              static_cast<int>(x.size(0)),
              static_cast<int>(grid.in()),
              static_cast<int>(grid.out()),
              reinterpret_cast<const __nv_bfloat16*>(tiles.data_ptr()),
              band_ptr.data_ptr<int>(),
              band_cols.data_ptr<int>(),
              static_cast<int>(grid.tile_rows()),
              static_cast<int>(grid.tile_cols()),
              reinterpret_cast<__nv_bfloat16*>(y.data_ptr())};
  // 128 weight rows in 64-column steps where the tiles allow it: on an H200 it
  // cut a 2048-token LLaMA-2-7B gate/up prefill from 347 to 291 us against the
  // 64 x 32 shape, which remains for smaller tiles.
  if (grid.tile_rows() % 128 == 0 && grid.tile_cols() % 64 == 0)
    launch_dense_tiles<128, 64>(a);
  else
    launch_dense_tiles<64, 32>(a);
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
  const auto* h = lt_handle();
  const int64_t tokens = x.size(0);
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

}  // namespace patch::deploy::cuda
