// CUDA kernels of mask_kernels.h. Memory-bound: one pass over W (and the
// incoming gradient) and the logits per call; the noise is regenerated from
// Philox instead of being read, the mask is never stored.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>

#include "core/error.h"
#include "sparsity/mask_group.h"
#include "sparsity/mask_kernels.h"

namespace patch::sparsity::cuda {
namespace {

constexpr int kThreads = 256;

struct Params {
  int64_t rows, groups, cols, tile_rows, tile_cols;
  float scale, inv_tau;
  bool fixed, has_tiles, hard, noise;
  uint64_t key;
  const StepScalars* dev;  // CUDA graphs: this step's values, read in the kernel
  uint64_t layer_hash;
};

// A replayed graph keeps its capture's arguments: the step's values come from
// device memory instead (the eager path passes the same numbers by value).
__device__ __forceinline__ void step_values(Params& p) {
  if (!p.dev) return;
  const StepScalars& d = *p.dev;
  p.scale = d.scale_24;
  p.inv_tau = d.inv_tau_24;
  p.hard = d.hard_24 != 0;
  p.key = layer_key(d.step_key, p.layer_hash, kPatternNoise);
}

Params params_of(const at::Tensor& weight, const GroupSampling& s) {
  Params p;
  p.rows = weight.size(0);
  p.groups = weight.size(1) / 4;
  p.cols = (weight.size(1) + s.tile_cols - 1) / s.tile_cols;
  p.tile_rows = s.tile_rows;
  p.tile_cols = s.tile_cols;
  p.scale = static_cast<float>(s.scale);
  p.inv_tau = static_cast<float>(1.0 / s.tau);
  p.fixed = s.fixed;
  p.has_tiles = s.has_tiles;
  p.hard = s.hard;
  p.noise = s.noise;
  p.key = s.key;
  p.dev = s.device;
  p.layer_hash = s.layer_hash;
  return p;
}

template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};
template <typename T>
struct alignas(2 * sizeof(T)) Vec2 {
  T v[2];
};

// The group's six logits through three aligned pair loads (24 or 12 bytes).
template <typename L>
__device__ __forceinline__ void load6(const L* src, L dst[6]) {
  const auto* pairs = reinterpret_cast<const Vec2<L>*>(src);
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const Vec2<L> pr = pairs[i];
    dst[2 * i] = pr.v[0];
    dst[2 * i + 1] = pr.v[1];
  }
}

template <typename L>
__device__ __forceinline__ void store6(const L src[6], L* dst) {
  auto* pairs = reinterpret_cast<Vec2<L>*>(dst);
#pragma unroll
  for (int i = 0; i < 3; ++i) pairs[i] = Vec2<L>{{src[2 * i], src[2 * i + 1]}};
}

// M24 of group q (and the soft p when sampled): the fixed pattern, or a
// sample from the group's logits and regenerated noise.
template <typename L>
__device__ __forceinline__ void group_mask(const Params& p, const L* logits, const uint8_t* fixed,
                                           int64_t q, float pr[6], float m24[4]) {
  if (p.fixed) {
    const uint32_t bits = group::pattern_bits(fixed[q]);
#pragma unroll
    for (int j = 0; j < 4; ++j) m24[j] = (bits >> j) & 1u ? 1.0f : 0.0f;
  } else {
    L l[6];
    load6(logits + 6 * q, l);
    group::sample<float, L>(l, p.key, static_cast<uint64_t>(q), p.scale, p.inv_tau, p.noise, p.hard,
                            pr, m24);
  }
}

// A block walks a contiguous range of rows (the grid's y axis) and its
// threads the groups of each row (x): a thread's tile column and the tile row
// are tracked, not divided for, so a group costs its sampling and little else.
template <typename W, typename L, typename O>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const W* __restrict__ w, const float* __restrict__ gates,
                   const L* __restrict__ logits, const uint8_t* __restrict__ fixed,
                   O* __restrict__ out, Params p, int rows_per_block) {
  step_values(p);
  const int groups = static_cast<int>(p.groups), tile_rows = static_cast<int>(p.tile_rows);
  const int cols = static_cast<int>(p.cols);
  const int o0 = static_cast<int>(blockIdx.y) * rows_per_block;
  const int o1 = min(o0 + rows_per_block, static_cast<int>(p.rows));
  const int tr0 = o0 / tile_rows;
  for (int grp = blockIdx.x * blockDim.x + threadIdx.x; grp < groups;
       grp += gridDim.x * blockDim.x) {
    const float* gate = gates + tr0 * cols + (4 * grp) / static_cast<int>(p.tile_cols);
    int in_tile = o0 - tr0 * tile_rows;
    for (int o = o0; o < o1; ++o) {
      const int64_t q = static_cast<int64_t>(o) * groups + grp;
      const float t = p.has_tiles ? *gate : 0.0f;
      const Vec4<W> wv = reinterpret_cast<const Vec4<W>*>(w)[q];  // in flight while sampling
      float pr[6], m24[4];
      group_mask(p, logits, fixed, q, pr, m24);
      Vec4<O> ov;
#pragma unroll
      for (int j = 0; j < 4; ++j)
        ov.v[j] = static_cast<O>(static_cast<float>(wv.v[j]) * (t + (1.0f - t) * m24[j]));
      reinterpret_cast<Vec4<O>*>(out)[q] = ov;
      if (++in_tile == tile_rows) {
        in_tile = 0;
        gate += cols;
      }
    }
  }
}

// One warp per (tile column, run of rows_per_task rows): for each row the
// lanes walk the tile's groups, and the tile gradient and squared-norm
// partials of (row, tile column) are reduced in a fixed order (deterministic,
// no atomics). The tile row is tracked, not divided for.
template <typename W, typename G, typename L>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const G* __restrict__ grad, const W* __restrict__ w,
                    const float* __restrict__ gates, L* __restrict__ logits,
                    const uint8_t* __restrict__ fixed, float* __restrict__ dlogits,
                    float* __restrict__ tile_rows, float* __restrict__ sq_rows, Params p,
                    int rows_per_task, group::AdamArgs adam, bool inline_adam, L* __restrict__ m,
                    L* __restrict__ v) {
  step_values(p);
  if (p.dev && inline_adam) {
    const StepScalars& d = *p.dev;
    adam.lr = d.lr;
    adam.inv_bias1 = d.inv_bias1;
    adam.inv_bias2 = d.inv_bias2;
    adam.grad_scale = d.grad_scale;
    adam.round_key = layer_key(d.step_key, p.layer_hash, kRounding);
  }
  const int lane = threadIdx.x & 31;
  const int rows = static_cast<int>(p.rows), cols = static_cast<int>(p.cols);
  const int groups = static_cast<int>(p.groups), trows = static_cast<int>(p.tile_rows);
  const int per_tile = static_cast<int>(p.tile_cols) / 4;
  const int tasks = ((rows + rows_per_task - 1) / rows_per_task) * cols;
  for (int task = (blockIdx.x * blockDim.x + threadIdx.x) / 32; task < tasks;
       task += gridDim.x * blockDim.x / 32) {
    const int chunk = task / cols, c = task - chunk * cols;
    const int o0 = chunk * rows_per_task, o1 = min(o0 + rows_per_task, rows);
    const int g0 = c * per_tile, g1 = min(g0 + per_tile, groups);
    const int tr0 = o0 / trows;
    const float* gate = gates + tr0 * cols + c;
    int in_tile = o0 - tr0 * trows;
    for (int o = o0; o < o1; ++o) {
      const float t = p.has_tiles ? *gate : 0.0f;
      if (++in_tile == trows) {
        in_tile = 0;
        gate += cols;
      }
      float dt = 0.0f, sq = 0.0f;
      for (int grp = g0 + lane; grp < g1; grp += 32) {
        const int64_t q = static_cast<int64_t>(o) * groups + grp;
        // Every load of the group first, so that their latencies overlap
        // instead of each waiting on the sampling before it.
        const Vec4<W> wv = reinterpret_cast<const Vec4<W>*>(w)[q];
        const Vec4<G> gv = reinterpret_cast<const Vec4<G>*>(grad)[q];
        L nm[6] = {}, nv[6] = {};
        if (inline_adam) {
          load6(m + 6 * q, nm);
          load6(v + 6 * q, nv);
        }
        float pr[6], m24[4], dm24[4];
        group_mask(p, logits, fixed, q, pr, m24);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float dm = static_cast<float>(gv.v[j]) * static_cast<float>(wv.v[j]);
          dm24[j] = dm * (1.0f - t);
          dt += dm * (1.0f - m24[j]);
        }
        if (p.fixed) continue;
        float dl[6];
        group::logit_grad<float>(pr, dm24, p.scale, p.inv_tau, dl);
#pragma unroll
        for (int k = 0; k < 6; ++k) sq += dl[k] * dl[k];
        if (inline_adam) {
          L nl[6];
          load6(logits + 6 * q, nl);  // in L1 since group_mask
          group::adam6<L, float>(nl, nm, nv, dl, adam, static_cast<uint64_t>(q));
          store6(nl, logits + 6 * q);
          store6(nm, m + 6 * q);
          store6(nv, v + 6 * q);
        } else {
          auto* dst = reinterpret_cast<float2*>(dlogits + 6 * q);
          dst[0] = make_float2(dl[0], dl[1]);
          dst[1] = make_float2(dl[2], dl[3]);
          dst[2] = make_float2(dl[4], dl[5]);
        }
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        dt += __shfl_xor_sync(0xffffffffu, dt, off);
        sq += __shfl_xor_sync(0xffffffffu, sq, off);
      }
      if (lane == 0) {
        const int64_t at = static_cast<int64_t>(o) * cols + c;
        tile_rows[at] = dt;
        if (sq_rows) sq_rows[at] = sq;
      }
    }
  }
}

__global__ void gumbel_kernel(float* out, int64_t total, uint64_t key) {
  for (int64_t q = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x)
    group::gumbel6(key, static_cast<uint64_t>(q), out + 6 * q);
}

__global__ void logistic_kernel(float* out, int64_t total, uint64_t key) {
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[t] = group::logistic1(key, static_cast<uint64_t>(t));
}

__global__ void gates_kernel(const float* logits, float* out, int64_t total, float scale,
                             float inv_tau, bool hard, bool noise, uint64_t key,
                             const StepScalars* dev, uint64_t layer_hash) {
  if (dev) {
    scale = dev->scale_tile;
    inv_tau = dev->inv_tau_tile;
    hard = dev->hard_tile != 0;
    key = layer_key(dev->step_key, layer_hash, kTileNoise);
  }
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float n = noise ? group::logistic1(key, static_cast<uint64_t>(t)) : 0.0f;
    const float y = 1.0f / (1.0f + expf(-(scale * logits[t] + n) * inv_tau));
    out[total + t] = y;
    out[t] = hard ? (y > 0.5f ? 1.0f : 0.0f) : y;
  }
}

// One warp per tile: the lanes sum the tile's rows, reduced in a fixed order.
__global__ void tile_grad_kernel(const float* partial, const float* soft, float* out,
                                 int64_t out_rows, int64_t rows, int64_t cols, int64_t tile_rows,
                                 float k, const StepScalars* dev) {
  if (dev) k = dev->k_tile;
  const int lane = threadIdx.x & 31;
  for (int64_t t = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
       t < rows * cols; t += static_cast<int64_t>(gridDim.x) * blockDim.x / 32) {
    const int64_t r = t / cols, c = t - r * cols,
                  end = (r + 1) * tile_rows < out_rows ? (r + 1) * tile_rows : out_rows;
    float sum = 0.0f;
    for (int64_t o = r * tile_rows + lane; o < end; o += 32) sum += partial[o * cols + c];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (lane == 0) {
      const float y = soft[t];
      out[t] = sum * y * (1.0f - y) * k;
    }
  }
}

int64_t sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

int blocks_for(int64_t threads) {
  return static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>((threads + kThreads - 1) / kThreads, sm_count() * 16)));
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  core::check(err == cudaSuccess, what, cudaGetErrorString(err));
}

at::Tensor float_gates(const at::Tensor& gates, const GroupSampling& s, const at::Tensor& like) {
  return s.has_tiles ? gates.to(like.device(), at::kFloat).contiguous()
                     : at::zeros({1}, like.options().dtype(at::kFloat));
}

}  // namespace

void gumbel_noise(at::Tensor& out, uint64_t key) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t total = out.numel() / 6;
  if (total == 0) return;
  gumbel_kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), total, key);
  check_launch("gumbel_noise");
}

void logistic_noise(at::Tensor& out, uint64_t key) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t total = out.numel();
  if (total == 0) return;
  logistic_kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), total, key);
  check_launch("logistic_noise");
}

void tile_gates(const at::Tensor& logits, double scale, double tau, bool hard, bool noise,
                uint64_t key, const StepScalars* device, uint64_t layer_hash, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(logits.device());
  auto l = logits.to(at::kFloat).contiguous();
  const int64_t total = l.numel();
  if (total == 0) return;
  gates_kernel<<<blocks_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      l.data_ptr<float>(), out.data_ptr<float>(), total, static_cast<float>(scale),
      static_cast<float>(1.0 / tau), hard, noise, key, device, layer_hash);
  check_launch("tile_gates");
}

void tile_logit_grad(const at::Tensor& partial, const at::Tensor& soft, int64_t tile_rows, double k,
                     const StepScalars* device, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(partial.device());
  auto p = partial.to(at::kFloat).contiguous();
  auto sv = soft.to(at::kFloat).contiguous();
  const int64_t rows = sv.size(0), cols = sv.size(1);
  if (rows * cols == 0) return;
  tile_grad_kernel<<<blocks_for(rows * cols * 32), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<float>(), sv.data_ptr<float>(), out.data_ptr<float>(), p.size(0), rows, cols,
      tile_rows, static_cast<float>(k), device);
  check_launch("tile_logit_grad");
}

void masked_weight_forward(const at::Tensor& weight, const at::Tensor& gates,
                           const at::Tensor& pattern, const GroupSampling& s, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Params p = params_of(weight, s);
  if (p.rows * p.groups == 0) return;
  auto w = weight.contiguous();
  auto g = float_gates(gates, s, weight);
  auto pat = pattern.contiguous();
  const auto stream = at::cuda::getCurrentCUDAStream();
  // About eight blocks per SM in one wave; each walks rows_per_block rows.
  const int64_t gx = std::min<int64_t>((p.groups + kThreads - 1) / kThreads, 64);
  const int64_t target_rows = std::max<int64_t>(1, std::min(sm_count() * 8 / gx, p.rows));
  const int rows_per_block = static_cast<int>(
      std::max((p.rows + target_rows - 1) / target_rows, (p.rows + 65534) / 65535));
  const dim3 grid(static_cast<unsigned>(gx),
                  static_cast<unsigned>((p.rows + rows_per_block - 1) / rows_per_block));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, w.scalar_type(), "masked_weight_forward_cuda", [&] {
        using W = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kBFloat16, at::kHalf, out.scalar_type(), "masked_weight_forward_out", [&] {
              using O = scalar_t;
              if (s.fixed) {
                forward_kernel<W, float, O><<<grid, kThreads, 0, stream>>>(
                    w.data_ptr<W>(), g.data_ptr<float>(), nullptr, pat.data_ptr<uint8_t>(),
                    out.data_ptr<O>(), p, rows_per_block);
              } else if (pat.scalar_type() == at::kBFloat16) {
                forward_kernel<W, c10::BFloat16, O><<<grid, kThreads, 0, stream>>>(
                    w.data_ptr<W>(), g.data_ptr<float>(), pat.data_ptr<c10::BFloat16>(), nullptr,
                    out.data_ptr<O>(), p, rows_per_block);
              } else {
                core::check(pat.scalar_type() == at::kFloat, "mask kernels",
                            "CUDA 2:4 logits must be float32 or bfloat16");
                forward_kernel<W, float, O><<<grid, kThreads, 0, stream>>>(
                    w.data_ptr<W>(), g.data_ptr<float>(), pat.data_ptr<float>(), nullptr,
                    out.data_ptr<O>(), p, rows_per_block);
              }
            });
      });
  check_launch("masked_weight_forward");
}

void masked_weight_backward(const at::Tensor& grad, const at::Tensor& weight,
                            const at::Tensor& gates, const at::Tensor& pattern,
                            const GroupSampling& s, InlineAdam* adam,
                            const at::Tensor& pattern_grad, const at::Tensor& tile_rows,
                            const at::Tensor& sq_rows) {
  const c10::cuda::CUDAGuard guard(weight.device());
  const Params p = params_of(weight, s);
  const int64_t warps = p.rows * p.cols;
  if (warps == 0) return;
  core::check(tile_rows.scalar_type() == at::kFloat, "mask kernels",
              "CUDA mask gradients are float32");
  auto w = weight.contiguous();
  auto gr = grad.contiguous();
  auto g = float_gates(gates, s, weight);
  at::Tensor pat = pattern.is_contiguous() ? pattern : pattern.contiguous();
  const group::AdamArgs args = adam ? adam_args(*adam) : group::AdamArgs{};
  float* dl = pattern_grad.defined() ? pattern_grad.data_ptr<float>() : nullptr;
  float* sq = sq_rows.defined() ? sq_rows.data_ptr<float>() : nullptr;
  const auto stream = at::cuda::getCurrentCUDAStream();
  // About one warp task per resident warp (40 per SM at this kernel's
  // registers), each of rows_per_task rows.
  const int64_t target_tasks = sm_count() * 40;
  const int rows_per_task =
      static_cast<int>(std::max<int64_t>(1, (p.rows * p.cols + target_tasks - 1) / target_tasks));
  const int64_t tasks = (p.rows + rows_per_task - 1) / rows_per_task * p.cols;
  const int blocks = blocks_for(tasks * 32);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, w.scalar_type(), "masked_weight_backward_cuda", [&] {
        using W = scalar_t;
        AT_DISPATCH_FLOATING_TYPES_AND2(
            at::kBFloat16, at::kHalf, gr.scalar_type(), "masked_weight_backward_grad", [&] {
              using G = scalar_t;
              if (s.fixed) {
                backward_kernel<W, G, float><<<blocks, kThreads, 0, stream>>>(
                    gr.data_ptr<G>(), w.data_ptr<W>(), g.data_ptr<float>(), nullptr,
                    pat.data_ptr<uint8_t>(), dl, tile_rows.data_ptr<float>(), nullptr, p,
                    rows_per_task, args, false, nullptr, nullptr);
              } else if (pat.scalar_type() == at::kBFloat16) {
                using L = c10::BFloat16;
                backward_kernel<W, G, L><<<blocks, kThreads, 0, stream>>>(
                    gr.data_ptr<G>(), w.data_ptr<W>(), g.data_ptr<float>(), pat.data_ptr<L>(),
                    nullptr, dl, tile_rows.data_ptr<float>(), sq, p, rows_per_task, args,
                    adam != nullptr, adam ? adam->exp_avg.data_ptr<L>() : nullptr,
                    adam ? adam->exp_avg_sq.data_ptr<L>() : nullptr);
              } else {
                core::check(pat.scalar_type() == at::kFloat, "mask kernels",
                            "CUDA 2:4 logits must be float32 or bfloat16");
                backward_kernel<W, G, float><<<blocks, kThreads, 0, stream>>>(
                    gr.data_ptr<G>(), w.data_ptr<W>(), g.data_ptr<float>(), pat.data_ptr<float>(),
                    nullptr, dl, tile_rows.data_ptr<float>(), sq, p, rows_per_task, args,
                    adam != nullptr, adam ? adam->exp_avg.data_ptr<float>() : nullptr,
                    adam ? adam->exp_avg_sq.data_ptr<float>() : nullptr);
              }
            });
      });
  check_launch("masked_weight_backward");
}

}  // namespace patch::sparsity::cuda
