// CUDA kernels of rms_norm.h: one block per row. Forward reads the row twice
// (sum of squares, then y), backward three times (sum of g x, then dx); the
// later reads mostly hit L2. The math, with the reference's roundings, is in
// rms_norm_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "model/rms_norm.h"
#include "model/rms_norm_math.h"

namespace patch::model::cuda {
namespace {

constexpr int kThreads = 256;

// The sum of v over the block, in every thread.
__device__ float block_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __shared__ float partial[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call's readers are done with `partial`
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float s = 0.0f;
  for (int w = 0; w < kThreads / 32; ++w) s += partial[w];
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_forward_kernel(const T* __restrict__ x, const T* __restrict__ w, int n, float eps, T* __restrict__ y,
                            float* __restrict__ r) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float v = static_cast<float>(xr[i]);
    ss += v * v;
  }
  const float scale = rms::scale(block_sum(ss), n, eps);
  T* yr = y + row * n;
  for (int i = threadIdx.x; i < n; i += kThreads)
    yr[i] = rms::out<T>(static_cast<float>(xr[i]), scale, static_cast<float>(w[i]));
  if (threadIdx.x == 0) r[row] = scale;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                             const float* __restrict__ r, int n, T* __restrict__ dx) {
  const int64_t row = blockIdx.x;
  const T* dyr = dy + row * n;
  const T* xr = x + row * n;
  float gx = 0.0f;
  for (int i = threadIdx.x; i < n; i += kThreads)
    gx += rms::upstream<T>(static_cast<float>(dyr[i]), static_cast<float>(w[i])) * static_cast<float>(xr[i]);
  const float mean_gx = block_sum(gx) / static_cast<float>(n);
  const float scale = r[row];
  T* dxr = dx + row * n;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    const float g = rms::upstream<T>(static_cast<float>(dyr[i]), static_cast<float>(w[i]));
    dxr[i] = rms::grad<T>(g, static_cast<float>(xr[i]), scale, mean_gx);
  }
}

}  // namespace

void rms_norm_forward(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y, at::Tensor& r) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_forward", [&] {
    rms_norm_forward_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), n, static_cast<float>(eps), y.data_ptr<scalar_t>(),
        r.data_ptr<float>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                       at::Tensor& dx) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int n = static_cast<int>(x.size(1));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm_backward", [&] {
    rms_norm_backward_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
        dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), r.data_ptr<float>(), n,
        dx.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace patch::model::cuda
