#pragma once
// Per-element math of rms_norm.h's CUDA kernels, rounding where the ATen
// expression rounds: x̂ = x r in float32 rounded to T, y = x̂ w rounded to T;
// backward, g = dy w rounded to T (autograd's product in T), then in float32
// dx = r g - x r^3 mean(g x), rounded to T.
#include <cmath>

#include "core/host_device.h"

namespace patch::model::rms {

// r = 1 / sqrt(mean(x^2) + eps) from the row's sum of squares.
PATCH_HD float scale(float sum_sq, int n, float eps) {
  const float m = sum_sq / static_cast<float>(n) + eps;
  return 1.0f / sqrtf(m);
}

template <typename T>
PATCH_HD T out(float x, float r, float w) {
  const float xhat = static_cast<float>(static_cast<T>(x * r));
  return static_cast<T>(xhat * w);
}

// The upstream gradient as autograd hands it to the float32 part: dy w in T.
template <typename T>
PATCH_HD float upstream(float dy, float w) {
  return static_cast<float>(static_cast<T>(dy * w));
}

// dx from g (upstream), x, r and mean(g x) over the row.
template <typename T>
PATCH_HD T grad(float g, float x, float r, float mean_gx) {
  return static_cast<T>(g * r - x * r * r * r * mean_gx);
}

}  // namespace patch::model::rms
