// CUDA kernel of lm_loss.h: one block per row of logits, two passes over the
// row (log-sum-exp, then the gradient written in place); the row's second
// read mostly hits L2. Memory-bound: 16-byte loads where the row allows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <type_traits>

#include "model/lm_loss.h"
#include "model/lm_loss_math.h"

namespace patch::model::cuda {
namespace {

constexpr int kThreads = 512;

template <typename Acc>
__device__ ce::MaxSum<Acc> block_merge(ce::MaxSum<Acc> a) {
  for (int o = 16; o > 0; o >>= 1) {
    ce::MaxSum<Acc> b;
    b.max = __shfl_xor_sync(0xffffffffu, a.max, o);
    b.sum = __shfl_xor_sync(0xffffffffu, a.sum, o);
    ce::merge(a, b);
  }
  __shared__ Acc smax[kThreads / 32], ssum[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    smax[warp] = a.max;
    ssum[warp] = a.sum;
  }
  __syncthreads();
  ce::MaxSum<Acc> r;
  for (int w = 0; w < kThreads / 32; ++w) ce::merge(r, ce::MaxSum<Acc>{smax[w], ssum[w]});
  return r;
}

// V elements of T per load: 16 bytes when the row's length and start allow.
template <typename T, typename Acc, int V>
__global__ void cross_entropy_rows_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
                                          Acc* __restrict__ loss, int64_t vocab, bool grad) {
  struct alignas(sizeof(T) * V) Pack {
    T v[V];
  };
  T* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const int64_t t = targets[blockIdx.x];
  const bool valid = t >= 0 && t < vocab;
  const Acc zt = valid ? static_cast<Acc>(row[t]) : Acc(0);  // read before pass 2 writes the row
  const int64_t packs = vocab / V;
  Pack* prow = reinterpret_cast<Pack*>(row);
  ce::MaxSum<Acc> a;
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const Pack p = prow[i];
#pragma unroll
    for (int k = 0; k < V; ++k) ce::push(a, static_cast<Acc>(p.v[k]));
  }
  const Acc lse = ce::log_sum_exp(block_merge(a));
  if (threadIdx.x == 0) loss[blockIdx.x] = valid ? lse - zt : Acc(NAN);
  if (!grad) return;
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    Pack p = prow[i];
#pragma unroll
    for (int k = 0; k < V; ++k)
      p.v[k] = static_cast<T>(ce::logit_grad(static_cast<Acc>(p.v[k]), lse, i * V + k == t));
    prow[i] = p;
  }
}

}  // namespace

void cross_entropy_rows_(at::Tensor& logits, const at::Tensor& targets, bool grad, at::Tensor& loss) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "cross_entropy_rows_", [&] {
    using Acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    constexpr int kV = 16 / sizeof(scalar_t);
    const bool wide = vocab % kV == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
    auto kernel = wide ? cross_entropy_rows_kernel<scalar_t, Acc, kV> : cross_entropy_rows_kernel<scalar_t, Acc, 1>;
    kernel<<<rows, kThreads, 0, stream>>>(logits.data_ptr<scalar_t>(), targets.data_ptr<int64_t>(),
                                          loss.data_ptr<Acc>(), vocab, grad);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace patch::model::cuda
