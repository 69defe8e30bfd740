// CUDA AdamW of adamw.h: 28 bytes per float32 logit (read parameter,
// gradient and moments, write three back), four logits per thread access.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>

#include "core/error.h"
#include "sparsity/mask_group.h"
#include "train/adamw.h"

namespace patch::train::cuda {
namespace {

constexpr int kThreads = 256;

struct Args {
  float lr, beta1, beta2, eps, decay, grad_scale, step_size, inv_bias2_sqrt;
};

// PyTorch's fused AdamW, term by term, in float32, with the hardware sqrt
// and division (sparsity/mask_group.h says why).
__device__ __forceinline__ void update(float& p, float g, float& m, float& v, const Args& a) {
  g *= a.grad_scale;
  p -= a.lr * a.decay * p;
  m = a.beta1 * m + (1.0f - a.beta1) * g;
  v = a.beta2 * v + (1.0f - a.beta2) * g * g;
  p -= sparsity::group::update_div(a.step_size * m,
                                   sparsity::group::update_sqrt(v) * a.inv_bias2_sqrt + a.eps);
}

__global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                 float* __restrict__ v, int64_t n, Args a, const float* __restrict__ dev) {
  if (dev) {  // a replayed CUDA graph: this step's values
    a.lr = dev[0];
    a.step_size = dev[1];
    a.inv_bias2_sqrt = dev[2];
    a.grad_scale = dev[3];
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n4 = n / 4;
  auto* p4 = reinterpret_cast<float4*>(p);
  auto* m4 = reinterpret_cast<float4*>(m);
  auto* v4 = reinterpret_cast<float4*>(v);
  const auto* g4 = reinterpret_cast<const float4*>(g);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n4;
       i += stride) {
    float4 pp = p4[i], mm = m4[i], vv = v4[i];
    const float4 gg = g4[i];
    update(pp.x, gg.x, mm.x, vv.x, a);
    update(pp.y, gg.y, mm.y, vv.y, a);
    update(pp.z, gg.z, mm.z, vv.z, a);
    update(pp.w, gg.w, mm.w, vv.w, a);
    p4[i] = pp;
    m4[i] = mm;
    v4[i] = vv;
  }
  // The last n % 4 values (the allocator aligns every tensor to 16 bytes).
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t < n - 4 * n4) update(p[4 * n4 + t], g[4 * n4 + t], m[4 * n4 + t], v[4 * n4 + t], a);
}

}  // namespace

void adamw_update(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                  at::Tensor& exp_avg_sq, const AdamWStep& s) {
  const int64_t n = param.numel();
  if (n == 0) return;
  for (const at::Tensor* t :
       std::initializer_list<const at::Tensor*>{&param, &grad, &exp_avg, &exp_avg_sq})
    core::check(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "adamw_update",
                "CUDA AdamW needs 16-byte aligned tensors");
  const c10::cuda::CUDAGuard guard(param.device());
  const auto [step_size, inv_bias2_sqrt] = adamw_step_factors(s);
  const Args a{static_cast<float>(s.lr),
               static_cast<float>(s.opts.beta1),
               static_cast<float>(s.opts.beta2),
               static_cast<float>(s.opts.eps),
               static_cast<float>(s.opts.weight_decay),
               static_cast<float>(s.grad_scale),
               step_size,
               inv_bias2_sqrt};
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks =
      std::max<int64_t>(1, std::min<int64_t>((n / 4 + kThreads - 1) / kThreads, sms * 8));
  adamw_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
      exp_avg_sq.data_ptr<float>(), n, a, s.device);
  const cudaError_t err = cudaGetLastError();
  core::check(err == cudaSuccess, "adamw_update", cudaGetErrorString(err));
}

}  // namespace patch::train::cuda
