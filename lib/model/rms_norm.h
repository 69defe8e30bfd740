#pragma once
// RMSNorm as transformers computes it: normalize in (at least) float32, round
// to the input's dtype, then multiply by the weight in that dtype:
//   y = w * (x * rsqrt(mean(x^2) + eps)).to(dtype(x))
// On the CPU (and for a weight that needs a gradient) it is that expression in
// ATen ops, the reference. On CUDA one kernel makes a row's y and keeps the
// row's rsqrt for backward, and one makes x's gradient (the weight is frozen):
// the ATen expression is about seven kernels forward and more backward, each a
// pass over the activations in float32.
#include <ATen/ATen.h>

namespace patch::model {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

namespace cuda {
// y and r [rows] (float32) from x [rows, n] (contiguous), w [n].
void rms_norm_forward(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& y, at::Tensor& r);
// dx [rows, n] from dy, x, w and the forward's r.
void rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& w, const at::Tensor& r,
                       at::Tensor& dx);
}  // namespace cuda

}  // namespace patch::model
